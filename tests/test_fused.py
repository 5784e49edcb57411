"""The fused LoRA paths (fused.py) against the reference path (UNIPEFT_FUSED=0): outputs and gradients, single
adapter and per-row routed mixed batches, fp32 on CPU. Speed lives in bench/perf_vs_peft.py, not here."""

from __future__ import annotations

import pytest
import torch
from conftest import inputs, output_of, tiny_model
from test_engine import randomize
from torch.nn import functional as F

import unipeft
from unipeft import fused, routed, siblings


def _run(am, monkeypatch, flag: str, seq: int = 7, **kwargs):
    monkeypatch.setenv("UNIPEFT_FUSED", flag)
    am.zero_grad(set_to_none=True)
    out = output_of(am(**inputs(batch=4, seq=seq), **kwargs))
    (out.float() ** 2).mean().backward()
    grads = {k: p.grad.clone() for n in am.recipes for k, p in am.adapter_parameters(n).items() if p.grad is not None}
    return out.detach(), grads


def _same(am, monkeypatch, **kwargs) -> None:
    ref_out, ref_grads = _run(am, monkeypatch, "0", **kwargs)
    out, grads = _run(am, monkeypatch, "1", **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def _forms(monkeypatch) -> list[bool]:
    """Record which form (merged or not) each fused projection call picks."""
    seen: list[bool] = []
    real = fused._merged_pays

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]
    monkeypatch.setattr(fused, "_merged_pays", spy)
    return seen


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("preset", ["lora", "rslora"])
@pytest.mark.parametrize("seq,merged", [(3, False), (48, True)])
def test_fused_lora_matches_reference(family: str, preset: str, seq: int, merged: bool, monkeypatch) -> None:
    """Both forms (few rows: unmerged; many rows: W' = W + s·B·A) against the reference path, training mode."""
    targets = ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else None  # whole Conv1D modules on GPT-2
    am = unipeft.attach(tiny_model(family), preset, **({"targets": targets} if targets else {}))
    randomize(am)
    am.train()
    wrappers = list(am._wrappers.values())
    seen = _forms(monkeypatch)
    _same(am, monkeypatch, seq=seq)
    assert all(w._plan()[2] for w in wrappers), "every LoRA projection took the fused path"
    assert seen and set(seen) == {merged}


@pytest.mark.parametrize("merged,source,compiling", [(False, False, False), (True, False, False),
                                                     (True, True, False), (True, False, True), (True, True, True)])
def test_lora_function_matches_the_formula(merged: bool, source: bool, compiling: bool, monkeypatch) -> None:
    """`_LoraLinear` against y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ differentiated by autograd, fp64: output and the gradients
    of x, W, b, A and B (a dequantizing `source` gives W instead of the tensor argument, always merged). Under a
    compiler, backward builds W'ᵀ by another expression; `compiling` runs that branch."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    g = torch.Generator().manual_seed(0)
    x, w, bias, a, b = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                        for shape in [(3, 5, 8), (6, 8), (6,), (4, 8), (6, 4)])
    s = 0.7
    expected = x @ w.t() + bias + s * (x @ a.t()) @ b.t()
    gy = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(expected, (x, w, bias, a, b), gy)
    if source:
        y = fused._LoraLinear.apply(x, None, bias, a, b, s, True, lambda: w.detach().clone())
        got = torch.autograd.grad(y, (x, bias, a, b), gy)
        want = want[:1] + want[2:]
    else:
        y = fused._LoraLinear.apply(x, w, bias, a, b, s, merged, None)
        got = torch.autograd.grad(y, (x, w, bias, a, b), gy)
    torch.testing.assert_close(y, expected)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww)
    b_frozen = b.detach()  # B not trained: the merged form skips x·Aᵀ, the other gradients stay exact
    y = fused._LoraLinear.apply(x, None if source else w, bias, a, b_frozen, s, merged,
                                (lambda: w.detach().clone()) if source else None)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(torch.autograd.grad(y, a, gy)[0], want[-2])
    if source:
        assert torch.equal(w, w.detach().clone()), "the dequantized copy is updated in place, never W itself"


def test_merged_form_is_picked_by_bytes_moved() -> None:
    """Many rows relative to the weight take the merged form; few rows (decoding) do not."""
    assert fused._merged_pays(8192, 2048, 2048, True) and fused._merged_pays(8192, 2048, 2048, False)
    assert not fused._merged_pays(32, 2048, 2048, True) and not fused._merged_pays(32, 2048, 2048, False)
    assert fused._merged_pays(2048, 2048, 2048, False) and not fused._merged_pays(2048, 2048, 2048, True)


def test_fused_routed_mixed_batch_matches_reference(monkeypatch) -> None:
    am = unipeft.attach(tiny_model("llama"), "lora", r=4)
    am.add("b", "lora", r=2, alpha=8)  # another rank and scale: padded and folded into the stacks
    am.add("c", "lora", r=4, targets=["q", "v"])  # sites on fewer modules: other rows get the zero slot
    for n in am.recipes:
        randomize(am, n, seed=len(n))
    names = ["b", "__base__", "default", "c"]
    _same(am, monkeypatch, adapter_names=names)
    monkeypatch.setenv("UNIPEFT_FUSED", "1")
    with torch.no_grad():  # cached stacks follow in-place weight changes (optimizer steps)
        before = output_of(am(**inputs(batch=4), adapter_names=names))
        next(iter(am.adapter_parameters("b").values())).add_(1.0)
        after = output_of(am(**inputs(batch=4), adapter_names=names))
        monkeypatch.setenv("UNIPEFT_FUSED", "0")
        reference = output_of(am(**inputs(batch=4), adapter_names=names))
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-6)


def test_routed_cache_checks_weight_versions_once_per_call(monkeypatch) -> None:
    """Decoding reuses each layer's gathered rows: the adapters' version counters are compared at the first step of
    a `generate` (one Routing), not at every step; a later call compares them again and sees in-place changes."""
    am = unipeft.attach(tiny_model("llama"), "lora", r=4)
    am.add("b", "lora", r=4)
    randomize(am, "default", seed=1)
    randomize(am, "b", seed=2)
    checks = []
    real = routed._fresh
    monkeypatch.setattr(routed, "_fresh", lambda v: checks.append(1) or real(v))
    ids = inputs(batch=2, seq=4)["input_ids"]
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False,
              pad_token_id=0, adapter_names=["b", "default"])
    with torch.no_grad():
        first = am.generate(input_ids=ids, **kw)
        checks.clear()
        again = am.generate(input_ids=ids, **kw)
        assert len(checks) == len(am._wrappers), "one check per layer for the whole generate, not one per step"
        assert torch.equal(first, again)
        names = kw["adapter_names"]
        before = output_of(am(input_ids=ids, adapter_names=names))  # fills the cache for this batch
        for p in am.adapter_parameters("b").values():
            p.mul_(-3.0)  # in place, between calls: the next call must see it
        changed = output_of(am(input_ids=ids, adapter_names=names))
        monkeypatch.setenv("UNIPEFT_FUSED", "0")
        reference = output_of(am(input_ids=ids, adapter_names=names))
    assert not torch.allclose(before[0], changed[0])
    torch.testing.assert_close(changed, reference, rtol=1e-5, atol=1e-6)


def test_routed_cache_rechecks_after_its_call_ends(monkeypatch) -> None:
    """The Routing stays on the layers after its call; a later call that bypasses the AdaptedModel (`am.model(...)`)
    must not trust the finished call's check and sees an in-place weight change."""
    am = unipeft.attach(tiny_model("llama"), "lora", r=4)
    am.add("b", "lora", r=4)
    randomize(am, "default", seed=1)
    randomize(am, "b", seed=2)
    ids = inputs(batch=2, seq=4)["input_ids"]
    with torch.no_grad():
        am(input_ids=ids, adapter_names=["b", "default"])
        for p in am.adapter_parameters("b").values():
            p.mul_(-3.0)
        direct = output_of(am.model(input_ids=ids))  # same Routing object, its call over
        monkeypatch.setenv("UNIPEFT_FUSED", "0")
        reference = output_of(am.model(input_ids=ids))
    torch.testing.assert_close(direct, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routed", [False, True])
def test_fused_paths_call_hooked_bases(routed: bool, monkeypatch) -> None:
    """The fused paths read a plain nn.Linear's weight directly — but a base with hooks, or with a forward set on the
    instance (accelerate's offloading wraps `module.forward` to bring the weight in first), is called, and the
    delta added after; results equal the reference path's either way."""
    am = unipeft.attach(tiny_model("llama"), "lora", r=4)
    am.add("b", "lora", r=4)
    randomize(am, "default", seed=1)
    randomize(am, "b", seed=2)
    layers = [w for p, w in am._wrappers.items() if p.endswith(("q_proj", "o_proj"))]
    seen = []
    layers[0].base_layer.register_forward_hook(lambda mod, args, out: seen.append("hook"))
    plain_forward = layers[1].base_layer.forward
    layers[1].base_layer.forward = lambda *a, **k: seen.append("forward") or plain_forward(*a, **k)
    kwargs = {"adapter_names": ["b", "default", "default", "b"]} if routed else {}
    _same(am, monkeypatch, seq=40, **kwargs)  # enough rows for the merged form (and q/k/v groups) to apply
    assert seen.count("hook") == 2 and seen.count("forward") == 2  # once per run: reference and fused


def test_paths_the_fused_code_must_not_take() -> None:
    """DoRA, dropout while training, learned scales and fused-projection chunks stay on the reference path."""
    cases = [("dora", {}), ("lora", {"dropout": 0.1}), ("lora", {"learn_scale": True})]
    for preset, kw in cases:
        am = unipeft.attach(tiny_model("llama"), preset, **kw).train()
        assert not any(w._plan()[2] for w in am._wrappers.values()), (preset, kw)
    am = unipeft.attach(tiny_model("gpt2"), "lora").train()  # q/v chunks of c_attn
    assert not any(w._plan()[2] for w in am._wrappers.values())
    am = unipeft.attach(tiny_model("llama"), "lora", dropout=0.1).eval()  # dropout is the identity in eval
    assert all(w._plan()[2] for w in am._wrappers.values())
    assert fused.enabled()


def test_fused_under_autocast_matches_reference(monkeypatch) -> None:
    am = unipeft.attach(tiny_model("llama"), "lora")
    randomize(am)
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("UNIPEFT_FUSED", flag)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[flag] = output_of(am(**inputs())).float()
    torch.testing.assert_close(outs["1"], outs["0"], rtol=2e-2, atol=2e-2)


def test_both_forms_on_real_smollm2_match_the_reference(smollm2_path, monkeypatch) -> None:
    """The real SmolLM2-135M (GQA: k/v are 576 → 192) at 2 × 320 tokens: the byte rule picks the merged form for
    q/k/v/o and the unmerged one for gate/up/down, and q/k/v run as one sibling group; outputs and LoRA gradients
    equal the reference path. The model
    runs in fp64, so each projection agrees to ~1e-15; what is left is Llama's RMSNorm, which computes in fp32 even
    for fp64 inputs, and rounds the two paths' (1e-16-apart) inputs differently now and then (observed: loss 1e-9,
    gradients ≤ 1e-6 relative)."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float64)
    torch.manual_seed(0)
    am = unipeft.attach(model, "lora", r=8, targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
    randomize(am, std=0.02)  # a real model stays in its working regime (large random adapters make it chaotic)
    ids = torch.randint(5, 4000, (2, 320), generator=torch.Generator().manual_seed(0))
    seen = _forms(monkeypatch)
    groups: list[int] = []
    real_group = siblings._LoraGroup.apply
    monkeypatch.setattr(siblings._LoraGroup, "apply", lambda *a: (groups.append(len(a[1][0])), real_group(*a))[1])
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("UNIPEFT_FUSED", flag)
        am.zero_grad(set_to_none=True)
        logits = am(input_ids=ids).logits  # the loss in fp64 too (transformers' own loss casts logits to fp32)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        results[flag] = (loss.detach(), {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()})
    torch.testing.assert_close(results["1"][0], results["0"][0], rtol=1e-7, atol=0.0)
    for k, g in results["0"][1].items():
        assert ((results["1"][1][k] - g).norm() / g.norm()).item() < 1e-5, k
    assert set(seen) == {True, False}
    assert groups == [3] * model.config.num_hidden_layers  # q/k/v as one group per layer (gate/up: unmerged, alone)


@pytest.mark.parametrize("groups", ["1", "0"])
def test_fused_path_compiles_without_graph_breaks_and_matches_eager(groups: str, monkeypatch) -> None:
    """torch.compile: the fused projections — q/k/v and gate/up as sibling groups, or each alone — trace into one
    graph (no breaks), and the traced forward and backward (AOTAutograd, where backward takes the compiler branches:
    W' rebuilt by another expression, the group's gradients without writes into slices) give eager's loss and
    gradients; the groups stay on afterwards."""
    monkeypatch.setenv("UNIPEFT_GROUPS", groups)
    am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
    randomize(am)
    batch = inputs(batch=4, seq=48)  # enough rows for the merged form
    traced, real = [], siblings._LoraGroup.forward
    monkeypatch.setattr(siblings._LoraGroup, "forward", staticmethod(lambda ctx, *a: traced.append(1) or real(ctx, *a)))

    def step(model):
        am.zero_grad(set_to_none=True)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}

    explained = torch._dynamo.explain(lambda: am(**batch, labels=batch["input_ids"]).loss)()
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert len(traced) == (2 * len(am.model.model.layers) if groups == "1" else 0), "one group per q/k/v, gate/up"
    assert all(g.enabled for g in am._groups)
    torch._dynamo.reset()
    eager_loss, eager_grads = step(am)
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    codes = []  # the traced forward and backward graphs (AOTAutograd, run as traced: aot_eager with a look inside)

    def keep(gm, _):
        codes.append(gm.code)
        return make_boxed_func(gm.forward)

    loss, grads = step(torch.compile(am, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep)))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for k, g in eager_grads.items():
        assert ((grads[k] - g).norm() / g.norm()).item() < 1e-5, k
    # the group backward accumulates dx through unipeft::addmm_acc (kept in place): k, v, ga; up, ga per layer —
    # except layer 0's q/k/v, whose input (the frozen embeddings) needs no dx
    n_acc = sum(code.count("unipeft.addmm_acc") for code in codes)
    assert n_acc == (5 * len(am.model.model.layers) - 3 if groups == "1" else 0)


def _count_grads_calls(monkeypatch) -> list[int]:
    """Members per grads-kernel call, through either entry: `kernels.lora_grads` (the unmerged form) or
    `kernels.lora_grads_buffer` (overlap.lora_backward: the merged form and the groups)."""
    from unipeft import kernels

    calls: list[int] = []
    for name in ("lora_grads", "lora_grads_buffer"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda gs, *a, real=real: calls.append(len(gs)) or real(gs, *a))
    return calls


@pytest.mark.parametrize("merged,compiling", [(False, False), (True, False), (True, True)])
def test_lora_function_through_the_grads_kernel(merged: bool, compiling: bool, monkeypatch) -> None:
    """`_LoraLinear`'s backward with the Triton grads kernel (kernels.lora_grads; under a compiler its custom op)
    computing s·(g·B)ᵀ and dB from one read of g: every gradient against the formula differentiated by autograd
    (fp32 in Triton's interpreter, compared in fp64)."""
    from unipeft import kernels

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    monkeypatch.setattr(kernels, "grads_available", lambda g, ranks: True)
    calls = _count_grads_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x, w, bias, a, b = (torch.randn(*shape, generator=g, requires_grad=True)
                        for shape in [(3, 50, 24), (70, 24), (70,), (6, 24), (70, 6)])
    s = 0.7
    xd, wd, bd, ad, bbd = (t.double() for t in (x, w, bias, a, b))
    expected = xd @ wd.t() + bd + s * (xd @ ad.t()) @ bbd.t()
    gy = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(expected, (x, bias, a, b), gy)
    y = fused._LoraLinear.apply(x, w.detach(), bias, a, b, s, merged, None)
    got = torch.autograd.grad(y, (x, bias, a, b), gy.float())
    assert calls == [1], "one kernel call for dA's s·(g·B)ᵀ and dB"
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg.double(), ww.double(), rtol=1e-4, atol=1e-4)


def test_group_backward_through_the_grads_kernel(monkeypatch) -> None:
    """The sibling groups' backward (q/k/v, gate/up) and the lone projections (o, down) with the Triton grads
    kernel: one call per group or projection, and the LoRA gradients equal the reference path's."""
    from unipeft import kernels

    am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
    randomize(am)
    ref_out, ref_grads = _run(am, monkeypatch, "0", seq=48)
    monkeypatch.setattr(kernels, "grads_available", lambda g, ranks: True)
    calls = _count_grads_calls(monkeypatch)
    out, grads = _run(am, monkeypatch, "1", seq=48)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)
    assert calls == [1, 2, 1, 3] * len(am.model.model.layers), "per layer: down, gate/up, o, q/k/v (backward order)"


def test_group_forward_builds_its_weights_in_one_launch(monkeypatch) -> None:
    """With the W' kernel available, a sibling group's forward builds every member's W' in one launch
    (kernels.merged_weights: q/k/v, gate/up), the lone projections one each; outputs and LoRA gradients equal the
    reference path's."""
    from unipeft import kernels

    am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
    randomize(am)
    ref_out, ref_grads = _run(am, monkeypatch, "0", seq=48)
    monkeypatch.setattr(kernels, "available", lambda t: True)
    groups, lone = [], []
    real_group, real_lone = kernels.merged_weights, kernels.merged_weight
    monkeypatch.setattr(kernels, "merged_weights", lambda ws, *a: groups.append(len(ws)) or real_group(ws, *a))
    monkeypatch.setattr(kernels, "merged_weight", lambda *a, **kw: lone.append(1) or real_lone(*a, **kw))
    out, grads = _run(am, monkeypatch, "1", seq=48)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)
    layers = len(am.model.model.layers)
    assert groups == [3, 2] * layers, "per layer: q/k/v, then gate/up, each one call"
    assert len(lone) == 2 * 2 * layers, "o and down: forward, and again in backward for dx"


def test_grads_kernel_on_real_smollm2(smollm2_path, monkeypatch) -> None:
    """The real SmolLM2-135M (fp32, 2 × 320 tokens): LoRA gradients with the Triton grads kernel in every group
    and lone projection equal the cuBLAS-path gradients (the kernel runs in Triton's interpreter on CPU)."""
    import transformers as T

    from unipeft import kernels

    model = T.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model.model.layers = model.model.layers[:4]  # the real weights of the first four layers: the interpreter is slow
    torch.manual_seed(0)
    am = unipeft.attach(model, "lora", r=8, targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
    randomize(am, std=0.02)
    ids = torch.randint(5, 4000, (2, 320), generator=torch.Generator().manual_seed(0))
    calls = _count_grads_calls(monkeypatch)
    results = []
    for on in (False, True):
        monkeypatch.setattr(kernels, "grads_available", lambda g, ranks, on=on: on)
        am.zero_grad(set_to_none=True)
        loss = am(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append({k: p.grad.clone() for k, p in am.adapter_parameters("default").items()})
    assert calls == [1, 1, 1, 1, 3] * 4, "per layer: down, up, gate (unmerged, alone), o, q/k/v (a group)"
    for k, g in results[0].items():
        assert ((results[1][k] - g).norm() / g.norm()).item() < 1e-4, k


@pytest.mark.parametrize("merged", [False, True])
def test_lora_function_double_backward(merged: bool) -> None:
    """Gradients of gradients (create_graph=True, e.g. gradient penalties) through `_LoraLinear` match finite
    differences in fp64 — including dB, whose xa is recomputed from x and A there (the saved xa is detached)."""
    g = torch.Generator().manual_seed(2)
    x, w, a, b = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                  for shape in [(2, 3, 5), (4, 5), (2, 5), (4, 2)])
    assert torch.autograd.gradgradcheck(lambda x, a, b: fused._LoraLinear.apply(x, w.detach(), None, a, b, 0.7,
                                                                                merged, None), (x, a, b))


def _lora_nodes(loss: torch.Tensor) -> list:
    """Every `_LoraLinear` backward node in loss's graph."""
    seen, todo, found = set(), [loss.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_LoraLinearBackward":
            found.append(node)
        todo.extend(n for n, _ in node.next_functions)
    return found


def _recompute_run(am, ids, monkeypatch, flag: str | None):
    if flag is None:
        monkeypatch.delenv("UNIPEFT_RECOMPUTE", raising=False)
    else:
        monkeypatch.setenv("UNIPEFT_RECOMPUTE", flag)
    am.zero_grad(set_to_none=True)
    loss = am(input_ids=ids, labels=ids).loss
    kept = [node.saved_tensors[0] is not None for node in _lora_nodes(loss)]  # (x, or None when recomputed)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}, kept


def test_down_proj_input_recomputed_instead_of_kept(smollm2_path, monkeypatch) -> None:
    """The default on the real SmolLM2-135M (fp32, four layers): down_proj's input act(gate)·up is not kept for
    backward — its LoRA node saves no x — and is recomputed from the operands the product's own node keeps; the
    loss and every LoRA gradient are bit for bit those of `UNIPEFT_RECOMPUTE=0`, which keeps x. Unset means on.
    Under saved-tensor hooks (checkpointing, offloading) x is kept."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model.model.layers = model.model.layers[:4]
    am = unipeft.attach(model, "lora", r=8, targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
    randomize(am, std=0.02)
    ids = torch.randint(5, 4000, (2, 96), generator=torch.Generator().manual_seed(0))
    loss0, grads0, kept0 = _recompute_run(am, ids, monkeypatch, "0")
    loss1, grads1, kept1 = _recompute_run(am, ids, monkeypatch, None)
    assert kept0 and all(kept0), "with UNIPEFT_RECOMPUTE=0 every lone projection keeps its input"
    assert len(kept1) == len(kept0) and kept1.count(False) == len(model.model.layers), "one per layer: down_proj"
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys()
    for k in grads0:
        assert torch.equal(grads0[k], grads1[k]), k
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        _, grads2, kept2 = _recompute_run(am, ids, monkeypatch, "1")
    assert all(kept2), "saved-tensor hooks manage what is kept: x is kept"
    for k in grads0:
        assert torch.equal(grads0[k], grads2[k]), k


def test_recomputed_input_supports_double_backward(monkeypatch) -> None:
    """Gradients of gradients through `_LoraLinear` whose x is recomputed from a product's saved operands match
    finite differences in fp64 (the recomputed x carries the operands' history)."""
    monkeypatch.setenv("UNIPEFT_RECOMPUTE", "1")
    g = torch.Generator().manual_seed(3)
    p, q, w, a, b = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                     for shape in [(2, 3, 5), (2, 3, 5), (4, 5), (2, 5), (4, 2)])

    def fn(p, q, a, b):
        x = p * q
        assert fused._product_node(x) is not None
        return fused._LoraLinear.apply(x, w.detach(), None, a, b, 0.7, True, None)
    assert torch.autograd.gradcheck(fn, (p, q, a, b))
    assert torch.autograd.gradgradcheck(fn, (p, q, a, b))
