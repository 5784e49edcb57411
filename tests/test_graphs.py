"""graph_layers: the layers of a training step replayed from recorded graphs (graphs.py).

CUDA graphs need a GPU, so these tests use `emulate=True`: the same bookkeeping — one recording per input signature,
static inputs and outputs handed from layer to layer, gradients flowing back through each replayed layer and
accumulating into the adapters — with each "replay" re-running the recorded function. Every test checks the result
against the model without graphs and that the layers really were replayed (`stack.replayed`). Real replay on the GPU
is checked against eager by bench/graph_check.py (bench/results/graph_check_*.json)."""

from __future__ import annotations

import copy
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import inputs, tiny_model
from test_engine import PRESETS, randomize

import unipeft
from unipeft import UnipeftError, graphs


def _stack(model):
    hf = model.model if isinstance(model, unipeft.AdaptedModel) else model
    return hf.__dict__[graphs._STACK]


def _steps(model, batches, *, micro: int = 2, lr: float = 0.05) -> tuple[list[float], list[dict]]:
    """SGD steps of `micro` accumulated micro-batches; losses and every trainable parameter's gradient per step."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=lr)
    losses, grads = [], []
    for batch in batches:
        for k in range(micro):
            b = {key: v.roll(k, 0) for key, v in batch.items()}
            loss = model(**b, labels=b["input_ids"]).loss
            loss.backward()
            losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in params.items()})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def _adapted(preset: str = "lora", layers: int = 3, **kw) -> unipeft.AdaptedModel:
    model = tiny_model("llama")
    if layers != 2:
        cfg = copy.deepcopy(model.config)
        cfg.num_hidden_layers = layers
        torch.manual_seed(0)
        model = type(model)(cfg)
    am = unipeft.attach(model, preset, **kw)
    randomize(am)
    return am


def _assert_same(a: tuple, b: tuple, exact: bool = True) -> None:
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(a[0]), torch.tensor(b[0]), **tol)
    for ga, gb in zip(a[1], b[1]):
        assert ga.keys() == gb.keys()
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], **tol, msg=n)


def test_replayed_layers_train_like_eager_with_accumulation() -> None:
    batches = [inputs(batch=2, seq=9, seed=s) for s in range(3)]
    eager, graphed = _adapted(), _adapted()  # (built twice from one seed: a deepcopy would share prefix wiring)
    assert unipeft.graph_layers(graphed, emulate=True) == 3
    expected = _steps(eager, batches)
    got = _steps(graphed, batches)
    _assert_same(got, expected)
    stack = _stack(graphed)
    assert stack.captures == 1 and stack.replayed == 3  # every layer replayed, recorded once for 6 forwards


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_replays_like_eager(preset: str) -> None:
    eager, graphed = _adapted(preset), _adapted(preset)
    unipeft.graph_layers(graphed, emulate=True)
    batches = [inputs(batch=2, seq=9, seed=s) for s in range(2)]
    _assert_same(_steps(graphed, batches), _steps(eager, batches), exact=False)
    assert _stack(graphed).replayed == 3


def test_two_forwards_then_one_backward_are_not_overwritten() -> None:
    """The second forward must not replay over the first one's saved activations before its backward ran."""
    eager, graphed = _adapted(), _adapted()
    unipeft.graph_layers(graphed, emulate=True)
    b1, b2 = inputs(batch=2, seq=9, seed=1), inputs(batch=2, seq=9, seed=2)
    for am in (graphed, eager):
        am(**b1, labels=b1["input_ids"]).loss.backward()  # (graphed: recorded)
        am.zero_grad(set_to_none=True)
        loss = am(**b1, labels=b1["input_ids"]).loss + am(**b2, labels=b2["input_ids"]).loss
        loss.backward()
    assert _stack(graphed).replayed == 0  # the second forward ran eagerly
    for (n, p), q in zip(graphed.named_parameters(), eager.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=n)
    loss = graphed(**b2, labels=b2["input_ids"]).loss  # a forward whose graph was dropped unused ...
    del loss
    graphed(**b1, labels=b1["input_ids"]).loss.backward()  # ... does not block the next one
    assert _stack(graphed).replayed == 3


class _Chain(torch.nn.Module):
    """Three tanh(Linear) layers; `scales` hands each layer its own extra input (like per-layer masks)."""

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.lin(h)) * scale

    def __init__(self, scales: bool = False) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([self.Layer() for _ in range(3)])
        self.scales = scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = torch.ones(8)
        for i, layer in enumerate(self.layers):
            x = layer(x, torch.full((8,), float(i + 1)) if self.scales else one)
        return x


def test_a_backward_after_a_later_replay_is_an_error() -> None:
    torch.manual_seed(0)
    net = _Chain()
    unipeft.graph_layers(net, layers="layers", emulate=True)
    x1, x2 = torch.randn(4, 8), torch.randn(4, 8)
    net(x1).sum().backward()  # records
    loss = net(x1).sum()
    loss.backward(retain_graph=True)
    net(x2).sum().backward()  # replays over loss's activations
    with pytest.raises(RuntimeError, match="a later forward replayed this layer"):
        loss.backward()


def test_hooks_inside_a_layer_make_it_run_eagerly() -> None:
    am = _adapted()
    unipeft.graph_layers(am, emulate=True)
    seen = []
    mlp = am.model.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    b = inputs(batch=2, seq=9)
    am(**b, labels=b["input_ids"]).loss.backward()
    assert _stack(am).captures == 0 and _stack(am).replayed == 0 and len(seen) == 1  # no recording with hooks
    handle.remove()
    am(**b, labels=b["input_ids"]).loss.backward()
    assert _stack(am).replayed == 3
    handle = mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape))  # added after recording
    am(**b, labels=b["input_ids"]).loss.backward()
    assert _stack(am).replayed == 2 and len(seen) == 2  # only the hooked layer ran its own forward


def test_a_deep_copy_runs_its_own_layers_eagerly() -> None:
    model = tiny_model("llama")
    unipeft.graph_layers(model, emulate=True)
    b = inputs(batch=2, seq=9)
    model(**b, labels=b["input_ids"]).loss.backward()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.model.layers.parameters():
            p.zero_()
    out, ref = twin(**b).logits, model(**b).logits
    assert not torch.equal(out, ref)  # the copy's own (zeroed) layers ran, not the original's
    unipeft.graph_layers(twin, emulate=True)  # and it can be graphed itself
    twin(**b, labels=b["input_ids"]).loss.backward()
    assert _stack(twin).replayed == 2


def test_parameter_gradients_are_fresh_tensors_not_graph_buffers() -> None:
    am = _adapted()
    unipeft.graph_layers(am, emulate=True)
    batch = inputs(batch=2, seq=9)
    am(**batch, labels=batch["input_ids"]).loss.backward()
    buffers = {g.data_ptr() for e in _stack(am).entries for g in e.grad_params if g is not None}
    grads = [p.grad for p in am.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.data_ptr() not in buffers for g in grads)


def test_a_leaf_input_gets_its_own_gradient() -> None:
    """inputs_embeds that is a leaf: its .grad must not be the graph's buffer (the next replay rewrites that)."""
    am = _adapted()
    unipeft.graph_layers(am, emulate=True)
    ids = inputs(batch=2, seq=9)["input_ids"]
    emb = am.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    am(inputs_embeds=emb, labels=ids).loss.backward()
    first = emb.grad.clone()
    am(inputs_embeds=emb.detach().roll(1, 0).requires_grad_(True), labels=ids.roll(1, 0)).loss.backward()
    assert torch.equal(emb.grad, first)  # not rewritten by the second call's replay
    assert _stack(am).replayed == 3
    flat = emb.detach().flatten().requires_grad_(True)  # a leaf reaching the layers through a view
    am(inputs_embeds=flat.view_as(emb), labels=ids).loss.backward()
    kept = flat.grad.clone()
    other = emb.detach().roll(1, 0).flatten().requires_grad_(True)
    am(inputs_embeds=other.view_as(emb), labels=ids.roll(1, 0)).loss.backward()  # the same signature: a replay
    assert _stack(am).replayed == 3 and torch.equal(flat.grad, kept)


def test_an_odd_batch_runs_eagerly_and_keeps_the_recording() -> None:
    eager, graphed = _adapted(), _adapted()
    unipeft.graph_layers(graphed, emulate=True)
    batches = [inputs(batch=2, seq=s) for s in (5, 5, 3, 5)]  # e.g. a last, shorter batch
    replayed = []
    params = [p for p in graphed.parameters() if p.requires_grad]
    for b in batches:
        graphed(**b, labels=b["input_ids"]).loss.backward()
        replayed.append(_stack(graphed).replayed)
        torch.optim.SGD(params, lr=0.05).step()
        graphed.zero_grad(set_to_none=True)
    _assert_same(_steps(_adapted(), batches, micro=1), _steps(eager, batches, micro=1))
    assert replayed == [3, 3, 0, 3] and _stack(graphed).captures == 1


def test_a_new_shape_twice_in_a_row_records_up_to_max_captures_then_warns() -> None:
    eager, graphed = _adapted(), _adapted()
    unipeft.graph_layers(graphed, emulate=True, max_captures=1)
    batches = [inputs(batch=2, seq=s) for s in (5, 5, 6, 6, 6, 7, 7, 7)]
    with pytest.warns(UserWarning, match="input shapes changed 2 times"):
        got = _steps(graphed, batches, micro=1)
    _assert_same(got, _steps(eager, batches, micro=1))
    stack = _stack(graphed)
    assert stack.captures == 2 and stack.replayed == 0  # 5, then 6 (its second call); 7 stays eager
    b = inputs(batch=2, seq=6)
    graphed(**b, labels=b["input_ids"]).loss.backward()
    assert stack.replayed == 3  # the recorded shape still replays


def test_calls_graphs_cannot_take_run_eagerly() -> None:
    am = _adapted()
    unipeft.graph_layers(am, emulate=True)
    batch = inputs(batch=2, seq=9)
    with torch.no_grad():  # inference
        am(**batch)
    assert _stack(am).replayed == 0 and _stack(am).captures == 0
    am.model.model.gradient_checkpointing = False
    am.gradient_checkpointing_enable()
    am(**batch, labels=batch["input_ids"]).loss.backward()
    assert _stack(am).replayed == 0
    am.model.gradient_checkpointing_disable()
    am(**batch, labels=batch["input_ids"]).loss.backward()
    assert _stack(am).replayed == 3


def test_routed_calls_run_eagerly_and_match() -> None:
    am = _adapted()
    am.add("b", "lora", r=4)
    randomize(am, "b", seed=3)
    unipeft.graph_layers(am, emulate=True)
    batch = inputs(batch=2, seq=9)
    out = am(**batch, adapter_names=["default", "b"]).logits.sum()
    assert _stack(am).replayed == 0
    unipeft.graph_layers(am, enable=False)
    torch.testing.assert_close(out, am(**batch, adapter_names=["default", "b"]).logits.sum(), rtol=0, atol=0)


def test_adapter_changes_record_again() -> None:
    am = _adapted()
    unipeft.graph_layers(am, emulate=True)
    batch = inputs(batch=2, seq=9)

    def loss() -> torch.Tensor:
        return am(**batch, labels=batch["input_ids"]).loss

    first = loss()
    am.merge("default")  # merged weights, no delta: a stale recording would add the delta twice
    merged = loss()
    torch.testing.assert_close(merged, first, rtol=1e-5, atol=1e-6)
    am.unmerge()
    am.add("b", "lora", r=4)
    randomize(am, "b", seed=5)
    am.activate("b")
    graphed_b = loss()
    assert _stack(am).captures == 3 and _stack(am).replayed == 3
    unipeft.graph_layers(am, enable=False)
    torch.testing.assert_close(graphed_b, loss(), rtol=0, atol=0)


def test_layers_with_their_own_inputs_get_their_own_copies() -> None:
    """A model handing each layer a different extra tensor (like per-layer masks) must not share one static copy."""
    torch.manual_seed(0)
    eager = _Chain(scales=True)
    for layer in eager.layers:
        layer.lin.bias.requires_grad_(False)
    graphed = copy.deepcopy(eager)
    unipeft.graph_layers(graphed, layers="layers", emulate=True)
    x = torch.randn(4, 8)
    results = []
    for net in (eager, graphed, graphed, graphed):
        out = net(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), [lay.lin.weight.grad.clone() for lay in net.layers]))
        net.zero_grad(set_to_none=True)
    stack = _stack(graphed)
    assert not stack.shared and stack.replayed == 3
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=0)
        for g, ref in zip(grads, results[0][1]):
            torch.testing.assert_close(g, ref, rtol=0, atol=0)


def test_use_cache_is_off_in_graphed_training_calls_unless_asked() -> None:
    am = _adapted()
    unipeft.graph_layers(am, emulate=True)
    batch = inputs(batch=2, seq=9)
    out = am(**batch, labels=batch["input_ids"])
    assert getattr(out, "past_key_values", None) is None and _stack(am).replayed == 3
    out = am(**batch, labels=batch["input_ids"], use_cache=True)  # a cache object: the layers run eagerly
    assert out.past_key_values is not None and _stack(am).replayed == 0



def test_a_layer_that_cannot_be_recorded_warns_and_runs_eagerly() -> None:
    class Layer(torch.nn.Module):
        def forward(self, h: torch.Tensor) -> SimpleNamespace:  # not a pytree: nothing a replay could return
            return SimpleNamespace(h=h * 2)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x).h
            return x

    net = Net()
    unipeft.graph_layers(net, layers="blocks", emulate=True)
    x = torch.ones(2, requires_grad=True)
    with pytest.warns(UserWarning, match="recording the layers failed"):
        out = net(x)
    assert torch.equal(out, x * 4) and _stack(net).replayed == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused once: no second attempt, no second warning
        assert torch.equal(net(x), x * 4)


def test_disable_and_detach_put_the_layers_back() -> None:
    am = _adapted()
    layer = am.model.model.layers[0]
    own = lambda *a, **k: type(layer).forward(layer, *a, **k)  # noqa: E731 - an instance forward set by someone else
    layer.forward = own
    n_hooks = len(am.model.model._forward_pre_hooks)
    unipeft.graph_layers(am, emulate=True)
    assert layer.forward is not own and len(am.model.model._forward_pre_hooks) == n_hooks + 1
    assert unipeft.graph_layers(am, enable=False) == 0
    assert layer.forward is own and len(am.model.model._forward_pre_hooks) == n_hooks
    del layer.forward
    unipeft.graph_layers(am, emulate=True)
    model = am.detach()
    assert graphs._STACK not in model.__dict__ and not any("forward" in m.__dict__ for m in model.modules())


def test_bad_requests_are_one_line_errors() -> None:
    with pytest.raises(UnipeftError, match="on cpu; move it to a CUDA GPU"):
        unipeft.graph_layers(tiny_model("llama"))
    with pytest.raises(UnipeftError, match="does not know where 'Net' keeps its layers|name the layer list"):
        unipeft.graph_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), emulate=True)
    with pytest.raises(UnipeftError, match="has no module 'model.blocks'"):
        unipeft.graph_layers(tiny_model("llama"), layers="model.blocks", emulate=True)
    with pytest.raises(UnipeftError, match="not a non-empty nn.ModuleList"):
        unipeft.graph_layers(tiny_model("llama"), layers="model.norm", emulate=True)


def test_on_smollm2_replayed_training_matches_eager(smollm2_path) -> None:
    """The real 30-layer SmolLM2-135M (GQA): LoRA steps with the layers replayed equal the eager ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    batch = dict(tok(["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is the question."],
                     padding="max_length", max_length=16, return_tensors="pt"))
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    am = unipeft.attach(model, "lora", r=8, targets=["q", "k", "v", "o", "gate", "up", "down"])
    randomize(am, std=0.02)
    start = {n: p.detach().clone() for n, p in am.named_parameters() if p.requires_grad}
    eager = _steps(am, [batch, batch], lr=1e-3)
    with torch.no_grad():
        for n, p in am.named_parameters():
            if n in start:
                p.copy_(start[n])
    assert unipeft.graph_layers(am, emulate=True) == 30
    _assert_same(_steps(am, [batch, batch], lr=1e-3), eager)
    assert _stack(am).replayed == 30 and _stack(am).captures == 1


def test_train_cli_cuda_graphs(monkeypatch, tiny_llama, tmp_path, capsys) -> None:
    """`unipeft train --cuda-graphs`: a one-line error without a GPU; with replay emulated, the run trains like the
    plain one (batches padded to one shape) and its layers were replayed."""
    from test_train_cli import cli

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog, again and again. " * 30)
    common = ["train", "--model", tiny_llama, "--data", str(corpus), "--max-steps", "4", "--batch-size", "2",
              "--max-length", "32", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = cli(*common, "--cuda-graphs", "--out", str(tmp_path / "cpu"), expect=2, capsys=capsys)
    assert text.strip().count("\n") == 0 and "CUDA GPU" in text and "Traceback" not in text
    assert not (tmp_path / "cpu" / "results.json").exists()

    real, replays = graphs.graph_layers, []
    monkeypatch.setattr(graphs, "graph_layers", lambda m, **kw: real(m, **kw, emulate=True))
    apply = graphs._Replay.apply
    monkeypatch.setattr(graphs._Replay, "apply", lambda *a: replays.append(1) or apply(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli(*common, "--cuda-graphs", "--out", str(tmp_path / "g"), capsys=capsys)
        cli(*common, "--out", str(tmp_path / "e"), capsys=capsys)
    assert len(replays) >= 2 * 3  # 2 layers, at least 3 of the 4 steps replayed

    def losses(run: str) -> list[float]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r and "step" in r]

    got, expected = losses("g"), losses("e")
    assert len(got) == len(expected) >= 1
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_a_4bit_base_replays_like_eager() -> None:
    """QLoRA: LoRA on an NF4-quantized base (bitsandbytes' CPU path, fp32 compute) with the layers replayed."""
    pytest.importorskip("bitsandbytes")

    def make() -> unipeft.AdaptedModel:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = unipeft.quantize(tiny_model("llama"), "nf4", compute_dtype=torch.float32)
        am = unipeft.attach(model, "lora", r=4)
        randomize(am)
        return am

    eager, graphed = make(), make()
    unipeft.graph_layers(graphed, emulate=True)
    batches = [inputs(batch=2, seq=9, seed=s) for s in range(2)]
    _assert_same(_steps(graphed, batches), _steps(eager, batches))
    assert _stack(graphed).replayed == 2


def test_recording_aliases_swap_trainable_parameters_for_leaves_over_the_same_memory() -> None:
    """While CUDA graphs are recorded, the layers' trainable parameters are aliases (new leaves, same storage; one per
    shared parameter), so the recording keeps no autograd node of the parameters themselves; afterwards — also after
    an error — every module holds its own parameters again. (On the GPU: bench/graph_check.py, and no
    AccumulateGrad stream warning in the graphed step.)"""
    am = _adapted("lora", layers=2)
    layers = list(am.model.model.layers)
    fns = [m for n, m in layers[1].named_modules() if n.endswith(".fn")]
    tied = next(m for n, m in layers[0].named_modules() if n.endswith(".fn.down"))
    fns[-1]._modules["extra"] = tied  # one Parameter, two homes (in two layers)
    before = {(id(m), n): p for layer in layers for m in layer.modules() for n, p in m._parameters.items()}
    trainable = {id(p) for p in before.values() if p is not None and p.requires_grad}
    frozen = {id(p) for p in before.values() if p is not None and not p.requires_grad}
    x = torch.randn(2, 5, am.model.config.hidden_size)
    with graphs._recording_aliases(layers, True) as originals:
        inside = {(id(m), n): p for layer in layers for m in layer.modules() for n, p in m._parameters.items()}
        for key, p in inside.items():
            orig = before[key]
            if orig is None or not orig.requires_grad:
                assert p is orig  # frozen weights are not touched
                continue
            assert p is not orig and originals[id(p)] is orig
            assert p.data_ptr() == orig.data_ptr() and p.requires_grad and p.grad_fn is None
        assert len(originals) == len(trainable)  # the tied Parameter has one alias
        assert {id(p) for p in originals.values()} == trainable and not frozen & set(originals)
        pos = torch.arange(5).unsqueeze(0)
        out = layers[0](x, position_embeddings=am.model.model.rotary_emb(x, pos))
        h = out[0] if isinstance(out, tuple) else out
        wrt = [p for p in layers[0].parameters() if p.requires_grad]
        grads = torch.autograd.grad(h.sum(), wrt, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    after = {(id(m), n): p for layer in layers for m in layer.modules() for n, p in m._parameters.items()}
    assert all(after[k] is before[k] for k in before)
    assert all(p.grad is None for p in am.parameters())  # the aliases' gradients never reached the parameters
    with pytest.raises(RuntimeError, match="boom"):
        with graphs._recording_aliases(layers, True):
            raise RuntimeError("boom")
    assert all(p is before[(id(m), n)] for layer in layers for m in layer.modules() for n, p in m._parameters.items())
    with graphs._recording_aliases(layers, False) as originals:
        assert originals == {}
        assert all(p is before[(id(m), n)] for layer in layers for m in layer.modules()
                   for n, p in m._parameters.items())
