"""Sibling groups (siblings.py): q/k/v and gate/up trained as one fused LoRA group. The group function against the
explicit formula in fp64, and whole models against the reference path (UNIPEFT_FUSED=0) and against ungrouped
fused projections (UNIPEFT_GROUPS=0)."""

from __future__ import annotations

import pytest
import torch
from conftest import inputs, output_of, tiny_model
from test_engine import randomize
from torch import nn

import unipeft
from unipeft import siblings


def _spy(monkeypatch) -> list[int]:
    """Count group computations (each one serves every member of a group)."""
    calls: list[int] = []
    real = siblings._LoraGroup.apply

    def counted(*args):
        calls.append(len(args[1][0]))  # (the spec: the scales, the sources)
        return real(*args)
    monkeypatch.setattr(siblings._LoraGroup, "apply", counted)
    return calls


@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)])
def test_group_function_matches_the_formula(used: tuple[int, ...]) -> None:
    """k = 3 members with different output widths (GQA), ranks and scales, biases on two: outputs and the gradients
    of x, every A, B and bias against y_i = x·W_iᵀ + b_i + s_i·(x·A_iᵀ)·B_iᵀ differentiated by autograd. With a
    member's output unused, its parameters get no gradient and the others stay exact."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    d_in, outs, ranks, scales = 8, (8, 4, 4), (4, 2, 4), (0.5, 2.0, 1.5)
    x = rand(3, 5, d_in)
    ws = [torch.randn(o, d_in, generator=g, dtype=torch.float64) for o in outs]  # frozen base weights
    as_ = [rand(r, d_in) for r in ranks]
    bs = [rand(o, r) for o, r in zip(outs, ranks)]
    biases = [rand(outs[0]), None, rand(outs[2])]
    expected = [x @ w.t() + (0 if bias is None else bias) + s * (x @ a.t()) @ b.t()
                for w, a, b, s, bias in zip(ws, as_, bs, scales, biases)]
    ys = siblings._LoraGroup.apply(x, (scales, (None,) * 3), *(t for i in range(3) for t in (ws[i], as_[i], bs[i])),
                                   *biases)
    for y, e in zip(ys, expected):
        torch.testing.assert_close(y, e)
    gys = [torch.randn(e.shape, generator=g, dtype=torch.float64) for e in expected]
    leaves = [x, *as_, *bs, biases[0], biases[2]]
    want = torch.autograd.grad([expected[i] for i in used], leaves, [gys[i] for i in used], allow_unused=True)
    got = torch.autograd.grad([ys[i] for i in used], leaves, [gys[i] for i in used], allow_unused=True)
    for name, gg, ww in zip(["x", "A0", "A1", "A2", "B0", "B1", "B2", "b0", "b2"], got, want):
        if ww is None:
            assert gg is None, name
        else:
            torch.testing.assert_close(gg, ww, msg=name)


@pytest.mark.parametrize("family,groups_per_layer", [("llama", 2), ("bert", 1)])
def test_groups_engage_and_match_the_reference(family: str, groups_per_layer: int, monkeypatch) -> None:
    """Llama (q/k/v with GQA, gate/up) and BERT (query/key/value with biases) at 4 × 48 tokens: every group runs
    once per layer and outputs and gradients equal the reference path and the ungrouped fused path."""
    targets = ["q", "k", "v", "o", "gate", "up", "down"] if family == "llama" else ["q", "k", "v", "o", "up", "down"]
    am = unipeft.attach(tiny_model(family), "lora", targets=targets).train()
    randomize(am)
    results = {}
    for fused, groups in (("0", "1"), ("1", "0"), ("1", "1")):
        monkeypatch.setenv("UNIPEFT_FUSED", fused)
        monkeypatch.setenv("UNIPEFT_GROUPS", groups)
        calls = _spy(monkeypatch)
        am.zero_grad(set_to_none=True)
        out = output_of(am(**inputs(batch=4, seq=48)))
        (out ** 2).mean().backward()
        grads = {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}
        results[fused + groups] = (out.detach(), grads)
        assert len(calls) == (2 * groups_per_layer if fused + groups == "11" else 0)
    for key in ("10", "11"):
        torch.testing.assert_close(results[key][0], results["01"][0], rtol=1e-5, atol=1e-6)
        for k, g in results["01"][1].items():
            torch.testing.assert_close(results[key][1][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_groups_follow_the_wrappers() -> None:
    """Groups are linked by module name whenever wrappers change; a group needs two members."""
    am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "v", "down"])

    def members(path: str) -> list[str] | None:
        group = am._wrappers[path].__dict__.get("_unipeft_group")
        names = {id(w): p for p, w in am._wrappers.items()}
        return None if group is None else [names[id(m)] for m in group.members]

    attn = "model.layers.0.self_attn."
    assert members(attn + "q_proj") == [attn + "q_proj", attn + "v_proj"]
    assert members("model.layers.0.mlp.down_proj") is None
    am.add("more", "lora", targets=["k", "gate", "up"])
    assert members(attn + "q_proj") == [attn + "k_proj", attn + "q_proj", attn + "v_proj"]
    assert members("model.layers.0.mlp.gate_proj") == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]


class _CrossAttention(nn.Module):
    """q reads the queries' states, k and v another sequence (as in encoder-decoder cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        attn = torch.softmax(self.q_proj(h) @ self.k_proj(memory).transpose(1, 2), -1)
        return attn @ self.v_proj(memory)


def test_members_reading_different_inputs_turn_their_group_off(monkeypatch) -> None:
    """k called with another tensor than the one q's group computed from: the group is turned off for good and every
    result equals the reference path."""
    torch.manual_seed(0)
    am = unipeft.attach(_CrossAttention().double(), "lora", targets=["q_proj", "k_proj", "v_proj"], r=4).train()
    randomize(am)
    h, memory = torch.randn(2, 40, 16, dtype=torch.float64), torch.randn(2, 40, 16, dtype=torch.float64)
    results = {}
    for flag in ("0", "1", "1"):
        monkeypatch.setenv("UNIPEFT_FUSED", flag)
        am.zero_grad(set_to_none=True)
        out = am(h, memory)
        out.sum().backward()
        results[flag] = (out.detach(), {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()})
    group = am._wrappers["q_proj"].__dict__["_unipeft_group"]
    assert not group.enabled and group.pending is None
    am.add("other", "lora", targets=["q_proj"])  # relinking keeps a group of the same members turned off
    assert am._wrappers["q_proj"].__dict__["_unipeft_group"] is group and not group.enabled
    torch.testing.assert_close(results["1"][0], results["0"][0])
    for k, g in results["0"][1].items():
        torch.testing.assert_close(results["1"][1][k], g, msg=k)


def test_a_shallow_copy_of_a_member_runs_alone(monkeypatch) -> None:
    """nn.DataParallel replicas copy a module's __dict__, group included; a replica is not a member and must not
    compute (or pick up) the originals' outputs."""
    am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v"]).train()
    randomize(am)
    q = am._wrappers["model.layers.0.self_attn.q_proj"]
    replica = q._replicate_for_data_parallel()
    x = torch.randn(2, 48, 32, requires_grad=True)
    calls = _spy(monkeypatch)
    out = replica(x)
    assert not calls and q.__dict__["_unipeft_group"].pending is None
    monkeypatch.setenv("UNIPEFT_FUSED", "0")
    torch.testing.assert_close(out, q(x))


def test_groups_under_gradient_checkpointing_and_without_gradients(monkeypatch) -> None:
    """Recomputation in backward goes through the same calls (same gradients as without checkpointing); without
    gradients nothing is grouped or held."""
    am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v", "gate", "up"]).train()
    randomize(am)
    batch = inputs(batch=4, seq=48)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            am.gradient_checkpointing_enable()
        calls = _spy(monkeypatch)
        am.zero_grad(set_to_none=True)
        am(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({k: p.grad.clone() for k, p in am.adapter_parameters("default").items()})
        assert len(calls) == (8 if checkpointing else 4)  # 2 layers × 2 groups, again in the recompute
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-5, atol=1e-7, msg=k)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        am(**batch)
    assert not calls
    assert all(w.__dict__["_unipeft_group"].pending is None for w in am._wrappers.values())


def _tiny_bart_with_lora():
    """A tiny BART (decoder cross-attention: q reads the decoder, k/v the encoder), LoRA on every q/k/v, training."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                       dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    am = unipeft.attach(T.BartForConditionalGeneration(cfg), "lora", targets=["q_proj", "k_proj", "v_proj"]).train()
    randomize(am)
    return am


def test_cross_attention_under_gradient_checkpointing(monkeypatch) -> None:
    """A tiny BART (decoder cross-attention: q reads the decoder, k/v the encoder) with LoRA on every q/k/v and
    gradient checkpointing: the recompute starts from the group states its forward started with, so it saves the
    same tensors (the first step is where a group turns itself off), and gradients equal the reference path's."""
    am = _tiny_bart_with_lora()
    am.gradient_checkpointing_enable()
    ids = torch.randint(3, 64, (4, 48), generator=torch.Generator().manual_seed(1))
    grads = {}
    for flag in ("1", "1", "0"):  # the first step turns the cross-attention group off mid-segment
        monkeypatch.setenv("UNIPEFT_FUSED", flag)
        am.zero_grad(set_to_none=True)
        am(input_ids=ids, labels=ids).loss.backward()
        grads[flag] = {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}
    groups = {p: w.__dict__["_unipeft_group"] for p, w in am._wrappers.items()}
    assert not groups["model.decoder.layers.0.encoder_attn.q_proj"].enabled
    assert groups["model.decoder.layers.0.self_attn.q_proj"].enabled
    for k, g in grads["0"].items():
        torch.testing.assert_close(grads["1"][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_cross_attention_under_torch_compile(monkeypatch) -> None:
    """Compiled (AOTAutograd), a cross-attention group sees k called with the encoder's states: the group turns
    itself off (the compiler recompiles on that change) and the gradients equal the reference path's."""
    am = _tiny_bart_with_lora()
    ids = torch.randint(3, 64, (4, 48), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(am, backend="aot_eager")
    grads = {}
    for flag, model in (("1", compiled), ("1", compiled), ("0", am)):
        monkeypatch.setenv("UNIPEFT_FUSED", flag)
        am.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[flag] = {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}
    torch._dynamo.reset()
    groups = {p: w.__dict__["_unipeft_group"] for p, w in am._wrappers.items()}
    assert not groups["model.decoder.layers.0.encoder_attn.q_proj"].enabled
    assert groups["model.decoder.layers.0.self_attn.q_proj"].enabled
    for k, g in grads["0"].items():
        torch.testing.assert_close(grads["1"][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_gradient_checkpointing_under_torch_compile() -> None:
    """torch.compile with gradient checkpointing (it raised an internal error on unipeft's checkpoint context): the
    traced segments take no routing context and set the groups aside; loss and gradients equal eager's without
    checkpointing, over two steps, and no graph break comes from unipeft's code."""

    def make():
        am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
        randomize(am)
        return am

    batch = inputs(batch=2, seq=48)

    def steps(am, model):
        out = []
        for _ in range(2):
            am.zero_grad(set_to_none=True)
            loss = model(**batch, labels=batch["input_ids"], use_cache=False).loss
            loss.backward()
            out.append((loss.detach(), {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}))
        return out

    plain = make()
    want = steps(plain, plain)
    am = make()
    am.gradient_checkpointing_enable()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: am(**batch, labels=batch["input_ids"], use_cache=False).loss)()
    ours = [b for b in explained.break_reasons if any("unipeft" in f.filename for f in b.user_stack)]
    assert not ours, [b.reason for b in ours]
    torch._dynamo.reset()
    got = steps(am, torch.compile(am, backend="aot_eager"))
    torch._dynamo.reset()
    for (loss, grads), (want_loss, want_grads) in zip(got, want):
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for k, g in want_grads.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-6, msg=k)
    assert all(not g.suspended for g in am._groups)


@pytest.mark.parametrize("preset", ["prefix", "mam"])
def test_gradient_checkpointing_under_torch_compile_other_presets(preset: str) -> None:
    """Prefix tuning publishes per-call state on its layers inside forward, which a traced checkpointed segment
    refuses; the compiler then breaks the graph there, and the gradients still equal eager's without checkpointing."""
    batch = inputs(batch=2, seq=16)

    def grads(am, model):
        am.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"], use_cache=False).loss.backward()
        return {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}

    plain = unipeft.attach(tiny_model("llama"), preset).train()
    randomize(plain)
    want = grads(plain, plain)
    am = unipeft.attach(tiny_model("llama"), preset).train()
    randomize(am)
    am.gradient_checkpointing_enable()
    torch._dynamo.reset()
    got = grads(am, torch.compile(am, backend="aot_eager"))
    torch._dynamo.reset()
    assert got.keys() == want.keys()
    for k, g in want.items():
        torch.testing.assert_close(got[k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_checkpointing_wraps_transformers_function_and_nests(monkeypatch) -> None:
    """`am.gradient_checkpointing_enable(offload=True)` keeps transformers' activation offloading (its checkpoint
    function is wrapped, not replaced: save_on_cpu still runs) with the same gradients; traced checkpoints that nest
    restore the groups' previous state, not "off"."""
    import transformers.modeling_utils as mu

    from unipeft import checkpointing

    used = []

    class _SaveOnCpu:  # stands in for torch's save_on_cpu (pinned memory needs a GPU)
        def __init__(self, **kw):
            used.append(kw)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(mu, "save_on_cpu", _SaveOnCpu)
    am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v"]).train()
    randomize(am)
    batch = inputs(batch=2, seq=48)

    def grads():
        am.zero_grad(set_to_none=True)
        am(**batch, labels=batch["input_ids"], use_cache=False).loss.backward()
        return {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}

    want = grads()
    am.gradient_checkpointing_enable(offload=True)
    got = grads()
    assert used, "transformers' offloading wrapper ran"
    for k, g in want.items():
        torch.testing.assert_close(got[k], g, rtol=1e-4, atol=1e-6, msg=k)

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    states = []

    def inner(function, *args, **kwargs):
        return function(*args)

    def record():
        states.append([g.suspended for g in am._groups])

    def outer_body():
        checkpointing.checkpoint(am, inner, record)
        record()  # after the nested checkpoint: still inside the outer one

    checkpointing.checkpoint(am, inner, outer_body)
    assert states == [[True] * len(am._groups)] * 2
    assert not any(g.suspended for g in am._groups)


def test_outputs_computed_ahead_never_go_stale(monkeypatch) -> None:
    """A member's output computed ahead is used only with the same x and unchanged weights, and no slot outlives a
    model call, even one that raises."""
    am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v"]).train()
    randomize(am)
    attn = "model.layers.0.self_attn."
    q, k = am._wrappers[attn + "q_proj"], am._wrappers[attn + "k_proj"]
    x = torch.randn(2, 48, 32, requires_grad=True)
    q(x)  # computes k's and v's outputs ahead
    with torch.no_grad():
        next(iter(k.adapters["default"].parameters())).add_(0.5)  # an in-place update before k is called
    got = k(x)
    monkeypatch.setenv("UNIPEFT_FUSED", "0")
    torch.testing.assert_close(got, k(x))
    monkeypatch.setenv("UNIPEFT_FUSED", "1")

    def boom(module, args, out):
        raise RuntimeError("stop")
    handle = am._wrappers[attn + "k_proj"].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="stop"):
        am(**inputs(batch=2, seq=48))
    handle.remove()
    assert all(g.pending is None for g in am._groups)


def test_group_function_supports_double_backward() -> None:
    """create_graph=True (gradient penalties): the second derivative through the group equals the formula's."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=grad)

    x, w0, w1 = rand(2, 6, 8), rand(8, 8, grad=False), rand(4, 8, grad=False)
    a0, a1, b0, b1 = rand(2, 8), rand(2, 8), rand(8, 2), rand(4, 2)
    ys = siblings._LoraGroup.apply(x, ((0.5, 2.0), (None, None)), w0, a0, b0, w1, a1, b1, None, None)
    want = [x @ w0.t() + 0.5 * (x @ a0.t()) @ b0.t(), x @ w1.t() + 2.0 * (x @ a1.t()) @ b1.t()]

    def penalty(outs):
        (gx,) = torch.autograd.grad(sum((o ** 2).sum() for o in outs), x, create_graph=True)
        return torch.autograd.grad((gx ** 2).sum(), (a0, b0, a1, b1))

    for got, expected in zip(penalty(ys), penalty(want)):
        torch.testing.assert_close(got, expected)


def _guard_sources(caplog, fn) -> str:
    import logging

    torch._dynamo.reset()
    torch._logging.set_logs(guards=True)
    try:
        with caplog.at_level(logging.DEBUG):
            out = fn()
    finally:
        torch._logging.set_logs()
        torch._dynamo.reset()
    return out, "\n".join(r.getMessage() for r in caplog.records if "__guards" in r.getMessage()
                          or "GuardManager" in r.getMessage())


def test_compiled_calls_read_cached_plans_and_operands(caplog) -> None:
    """AdaptedModel caches every wrapper's plan for its current state (after each change and on train()/eval()),
    and for a projection whose plan is one plain LoRA on a linear base also the fused path's operands (mode, A, B,
    s: `_warm_lean`). A compiled call reads those instead of the plan, so no guard walks the plan or the `adapters`
    ModuleDicts (~24 of ~60 guard nodes per projection); the result is the eager one. The caches follow eval() and
    a second active adapter (two LoRAs on q/v: no cached operands there, the plan is read), and a LoRA weight
    replaced by a new Parameter is the one a compiled call uses."""
    torch.manual_seed(0)
    am = unipeft.attach(tiny_model("llama"), "lora", r=4, targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
    randomize(am, std=0.05)
    for w in am._wrappers.values():
        key = w.__dict__["_unipeft_plan"][0]
        assert key == (None, ("default",), (), True)
        mode, down, up, s = w.__dict__["_unipeft_lean"]
        sa = w.__dict__["_unipeft_plan"][1][0][0][1]
        assert mode is True and down is sa.fn.down and up is sa.fn.up and s == sa.s
    x = inputs(batch=4, seq=48)  # (enough rows for the merged form: the sibling groups run too)
    want = output_of(am(**x))
    compiled = torch.compile(am, backend="eager")
    got, log = _guard_sources(caplog, lambda: output_of(compiled(**x)))
    assert "_unipeft_lean" in log, "no guard log captured (or the cached operands were not read)"
    assert "_unipeft_plan" not in log and "_modules['adapters']" not in log
    torch.testing.assert_close(got, want)
    am.eval()
    assert all(w.__dict__["_unipeft_plan"][0][-1] is False for w in am._wrappers.values())
    assert all(w.__dict__["_unipeft_lean"][0] is False for w in am._wrappers.values())
    am.train()
    am.add("other", "lora", r=2, targets=["q", "v"])
    am.activate("default", "other")
    randomize(am, "other", std=0.05)
    keys = {w.__dict__["_unipeft_plan"][0][1] for w in am._wrappers.values()}
    assert keys == {("default", "other")}
    q = next(w for p, w in am._wrappers.items() if p.endswith("q_proj"))
    assert [n for n, _ in q.__dict__["_unipeft_plan"][1][0]] == ["default", "other"]
    assert {p.rsplit(".", 1)[-1] for p, w in am._wrappers.items() if "_unipeft_lean" not in w.__dict__} \
        == {"q_proj", "v_proj"}
    want = output_of(am(**x))
    torch._dynamo.reset()
    torch.testing.assert_close(output_of(torch.compile(am, backend="eager")(**x)), want)
    o = next(w for p, w in am._wrappers.items() if p.endswith("o_proj"))  # a cached entry holds modules, so a
    down = o.__dict__["_unipeft_lean"][1]                                  # replaced weight is the one read
    down.weight = torch.nn.Parameter(down.weight.detach() * 3)
    want = output_of(am(**x))
    torch.testing.assert_close(output_of(torch.compile(am, backend="eager")(**x)), want)


def test_cached_operands_of_another_mode_are_not_used() -> None:
    """With LoRA dropout the fused path applies only in eval (dropout is the identity there), so the cached operands
    are made in eval. Switched to training behind AdaptedModel's back (the inner model's train()), a compiled call
    must not use them: dropout then changes the output, which it would not if the eval-made entry were used."""
    torch.manual_seed(0)
    am = unipeft.attach(tiny_model("llama"), "lora", r=4, dropout=0.5, targets=["q", "o", "down"]).eval()
    randomize(am, std=0.5)
    assert all(w.__dict__["_unipeft_lean"][0] is False for w in am._wrappers.values())
    x = inputs(batch=4, seq=48)
    compiled = torch.compile(am, backend="eager")
    with torch.no_grad():
        in_eval = output_of(compiled(**x))
        torch.testing.assert_close(in_eval, output_of(am(**x)))
        am.model.train()  # (bypasses AdaptedModel.train: the cached entries still say eval)
        assert all(w.training and w.__dict__["_unipeft_lean"][0] is False for w in am._wrappers.values())
        in_train = output_of(compiled(**x))
    assert (in_train - in_eval).abs().max() > 1e-3, "dropout did not apply: the eval-made operands were used"
