"""Composition blocks (Stack, Average, Fuse) against their formulas, with routing, training and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import inputs, output_of, tiny_model
from test_engine import randomize

import unipeft
from unipeft import Average, Fuse, Stack, UnipeftError


def _three(preset: str = "pfeiffer", family: str = "llama"):
    am = unipeft.attach(tiny_model(family), preset)
    am.add("b", preset)
    am.add("c", preset)
    for i, n in enumerate(("default", "b", "c")):
        randomize(am, n, seed=i + 1, std=0.2)
    return am


def _site(am, name: str):
    """The first wrapper and the single site adapter `name` has there."""
    path = next(p for p, w in am._wrappers.items() if any(True for _ in w.sites_of(name)))
    w = am._wrappers[path]
    return w, next(iter(w.sites_of(name)))


def _wrapper_out(am, w, x, *units):
    with torch.no_grad():
        am.activate(*units)
        return w(x)


def test_stack_feeds_each_output_into_the_next() -> None:
    """pfeiffer is a sequential bottleneck after the FFN: Stack(a, b) = b(a(h)) with a(h) = h + f_a(h)."""
    am = _three()
    w, sa = _site(am, "default")
    sb = next(iter(w.sites_of("b")))
    x = torch.randn(2, 5, w.base_layer.in_features)
    with torch.no_grad():
        h = w.base_layer(x)
        h1 = h + sa.fn(h)
        expected = h1 + sb.fn(h1)
    torch.testing.assert_close(_wrapper_out(am, w, x, Stack("default", "b")), expected, rtol=1e-5, atol=1e-6)
    y = inputs()
    with torch.no_grad():
        am.activate(Stack("default", "b"))
        stacked = output_of(am(**y))
        am.activate("default", "b")
        torch.testing.assert_close(stacked, output_of(am(**y)))


def test_average_is_the_weighted_mean_of_outputs_and_equals_linear_combine_for_lora() -> None:
    am = _three()
    w, sa = _site(am, "default")
    sb, sc = (next(iter(w.sites_of(n))) for n in ("b", "c"))
    x = torch.randn(2, 5, w.base_layer.in_features)
    with torch.no_grad():
        h = w.base_layer(x)
        expected = h + 0.5 * sa.fn(h) + 0.2 * sb.fn(h) - 0.3 * sc.fn(h)
    got = _wrapper_out(am, w, x, Average("default", "b", "c", weights=[0.5, 0.2, -0.3]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    lora = _three("lora")
    y = inputs()
    with torch.no_grad():
        lora.activate(Average("default", "b", weights=[0.7, -0.4]))
        averaged = output_of(lora(**y))
        unipeft.combine(lora, {"default": 0.7, "b": -0.4}, name="lin")
        lora.activate("lin")
        torch.testing.assert_close(averaged, output_of(lora(**y)), rtol=1e-5, atol=1e-6)


def test_nested_blocks() -> None:
    am = _three()
    w, sa = _site(am, "default")
    sb, sc = (next(iter(w.sites_of(n))) for n in ("b", "c"))
    x = torch.randn(3, w.base_layer.in_features)
    with torch.no_grad():
        h = w.base_layer(x)
        ab = h + sa.fn(h)
        ab = ab + sb.fn(ab)
        expected = h + 0.25 * (ab - h) + 0.75 * sc.fn(h)
    got = _wrapper_out(am, w, x, Average(Stack("default", "b"), "c", weights=[0.25, 0.75]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_fuse_is_attention_over_the_adapter_outputs() -> None:
    am = _three()
    fuse = Fuse("default", "b", "c")
    am.add_fusion(fuse)
    w, _ = _site(am, "default")
    layer = w.fusions[fuse.name]
    with torch.no_grad():
        for lin in (layer.query, layer.key, layer.value):
            lin.weight.normal_(0, 0.3)
    x = torch.randn(2, 4, w.base_layer.in_features)
    with torch.no_grad():
        h = w.base_layer(x)
        deltas = [next(iter(w.sites_of(n))).fn(h) for n in ("default", "b", "c")]
        q = h @ layer.query.weight.T
        scores = torch.stack([((h + d) @ layer.key.weight.T * q).sum(-1) for d in deltas], -1) / math.sqrt(h.shape[-1])
        alpha = torch.softmax(scores, -1)
        expected = h + sum(alpha[..., i:i + 1] * (d @ layer.value.weight.T) for i, d in enumerate(deltas))
    torch.testing.assert_close(_wrapper_out(am, w, x, fuse), expected, rtol=1e-5, atol=1e-6)


def test_fresh_fusion_starts_close_to_the_mean_and_trains_only_its_own_layers() -> None:
    am = _three()
    fuse = Fuse("default", "b", "c")
    am.add_fusion(fuse)
    y = inputs()
    with torch.no_grad():
        am.activate(Average("default", "b", "c"))
        mean = output_of(am(**y))
    am.activate(fuse)
    out = output_of(am(**y))
    assert (out - mean).abs().max() < 0.05 * mean.abs().max()
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in am.fusion_parameters(fuse).values())
    assert all(p.grad is None and not p.requires_grad for n in ("default", "b", "c")
               for p in am.adapter_parameters(n).values())


def test_blocks_under_per_row_routing_equal_single_runs() -> None:
    am = _three("pfeiffer")
    am.add_fusion(Fuse("default", "c"))
    units = [Stack("default", "b"), "__base__", Average("b", "c", weights=[0.3, 0.7]), Fuse("default", "c")]
    y = inputs(batch=4)
    with torch.no_grad():
        mixed = output_of(am(**y, adapter_names=units))
        for i, u in enumerate(units):
            if u == "__base__":
                am.deactivate()
            else:
                am.activate(u)
            alone = output_of(am(**{k: v[i:i + 1] for k, v in y.items()}))
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-6)


def test_parallel_sublayer_adapters_average_on_bert() -> None:
    am = _three("parallel", "bert")
    y = inputs()
    with torch.no_grad():
        am.activate(Average("default", "b", weights=[1.0, 1.0]))
        both = output_of(am(**y))
        am.activate("default", "b")
        torch.testing.assert_close(both, output_of(am(**y)), rtol=1e-5, atol=1e-6)


def test_refusals() -> None:
    am = _three("lora")
    am.add("i", "ia3", targets=["k", "v"])
    am.add("p", "prefix")
    am.add("h", "houlsby")
    cases = [(lambda: am.activate(Average("default", "i")), "additive"),
             (lambda: am.activate(Stack("default", "p")), "does not act on an output"),
             (lambda: am.add_fusion(Fuse("default", "b")), "sublayer outputs"),
             (lambda: am.activate(Fuse("h", "default")), "no fusion"),
             (lambda: am.activate(Average("default", "b", weights=[1.0])), "2 members but 1 weights"),
             (lambda: am.activate(Stack("default", "nope")), "no adapter 'nope'"),
             (lambda: am.activate(["default", "b"]), "separate arguments")]
    for fn, match in cases:
        with pytest.raises(UnipeftError, match=match):
            fn()
    am.activate(Stack("default", "b"))
    with pytest.raises(UnipeftError, match="part of Stack"):
        am.remove("b")
    with pytest.raises(UnipeftError, match="part of an active block"):
        am.merge("b")


def test_blocks_on_real_minilm(minilm_path) -> None:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["a fine film", "a dull mess"], padding=True, return_tensors="pt")
    am = unipeft.attach(AutoModel.from_pretrained(minilm_path), "houlsby")
    am.add("task", "houlsby")
    am.add("lora_o", "lora", targets=["o", "down"])
    for n in am.recipes:
        randomize(am, n, seed=len(n), std=0.05)
    am.add_fusion(Fuse("default", "task", "lora_o"))
    for unit in (Stack("default", "task"), Average("default", "lora_o", weights=[0.5, 0.5]),
                 Fuse("default", "task", "lora_o")):
        am.activate(unit)
        am.zero_grad(set_to_none=True)
        out = am(**batch).last_hidden_state
        assert torch.isfinite(out).all()
        out.pow(2).mean().backward()
        trained = am.fusion_parameters(unit) if isinstance(unit, Fuse) else {
            k: p for n in unipeft.compose.adapter_names(unit) for k, p in am.adapter_parameters(n).items()}
        assert trained and all(p.grad is not None for p in trained.values()), unit


def test_a_composition_saves_and_loads_whole(tmp_path) -> None:
    am = _three()
    fuse = Fuse("default", "b", "c")
    am.add_fusion(fuse)
    with torch.no_grad():
        for p in am.fusion_parameters(fuse).values():
            p.add_(torch.randn_like(p) * 0.1)
    am.activate(Average(Stack("default", "b"), fuse, weights=[0.4, 0.6]))
    y = inputs()
    with torch.no_grad():
        expected = output_of(am(**y))
    am.save(tmp_path / "saved")
    again = unipeft.load(tiny_model("llama"), tmp_path / "saved")
    assert again.active == am.active and list(again.fusions) == [fuse.name]
    with torch.no_grad():
        torch.testing.assert_close(output_of(again(**y)), expected)
    (tmp_path / "saved" / f"fusion-{fuse.name}.safetensors").write_bytes(b"garbage")
    fresh = tiny_model("llama")
    with pytest.raises(UnipeftError, match="truncated or corrupt"):
        unipeft.load(fresh, tmp_path / "saved")
    assert not any(getattr(m, "_unipeft_wrapper", False) for m in fresh.modules())


def test_dora_is_additive_for_average() -> None:
    am = unipeft.attach(tiny_model("llama"), "dora", targets=["o", "down"])
    am.add("b", "lora", targets=["o", "down"])
    randomize(am, "default", seed=1)
    randomize(am, "b", seed=2)
    w, _ = _site(am, "default")
    x = torch.randn(2, w.base_layer.in_features)
    outs = {u: _wrapper_out(am, w, x, u) for u in ("default", "b")}
    base = _wrapper_out(am, w, x)
    got = _wrapper_out(am, w, x, Average("default", "b", weights=[0.5, 2.0]))
    torch.testing.assert_close(got, base + 0.5 * (outs["default"] - base) + 2.0 * (outs["b"] - base),
                               rtol=1e-5, atol=1e-6)


def test_detach_with_a_fusion_restores_the_model_bit_exactly() -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    am = unipeft.attach(model, "pfeiffer")
    am.add("b", "pfeiffer")
    am.add_fusion(Fuse("default", "b"), train_modules=["lm_head"])
    am.activate(Fuse("default", "b"))
    plain = am.detach()
    after = plain.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not am.fusions and not am.recipes
