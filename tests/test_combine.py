"""`unipeft.combine`: weight-space merges of adapters, checked against explicit formulas."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_engine import randomize

import unipeft
from unipeft import UnipeftError


def _delta(am, name: str) -> dict[tuple, torch.Tensor]:
    """ΔW per (module, span) of every low-rank site of adapter `name`: s·B·A."""
    out = {}
    for path, w in am._wrappers.items():
        for sa in w.sites_of(name):
            key = (path, sa.span)
            out[key] = out.get(key, 0) + float(sa.scale()) * (sa.fn.up.weight @ sa.fn.down.weight).detach()
    return out


def _two_loras(family: str = "llama"):
    am = unipeft.attach(tiny_model(family), "lora", r=4)
    am.add("b", "rslora", r=2, targets=["q", "k"])  # other rank, scale rule and sites
    randomize(am, "default", seed=1)
    randomize(am, "b", seed=2)
    return am


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_linear_combine_is_exactly_the_weighted_sum_of_delta_w(family: str) -> None:
    am = _two_loras(family)
    unipeft.combine(am, {"default": 0.7, "b": -0.4}, method="linear", name="mix")
    a, b, mix = _delta(am, "default"), _delta(am, "b"), _delta(am, "mix")
    assert mix.keys() == a.keys() | b.keys()
    for key, d in mix.items():
        expected = 0.7 * a.get(key, 0) - 0.4 * b.get(key, 0)
        torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-6)
    assert am.recipes["mix"].parts and "mix" not in am.active
    # and each adapted projection computes base + Σ wᵢ·Δᵢ(x): linear in the adapters, so checkable per module
    path = next(iter(am._wrappers))
    wrapper = am._wrappers[path]
    x = torch.randn(3, wrapper.base_layer.weight.shape[1 if family == "llama" else 0])
    outs = {}
    with torch.no_grad():
        for names in ((), ("default",), ("b",), ("mix",)):
            am.activate(*names) if names else am.deactivate()
            outs[names] = wrapper(x)
    base = outs[()]
    expected = base + 0.7 * (outs[("default",)] - base) - 0.4 * (outs[("b",)] - base)
    torch.testing.assert_close(outs[("mix",)], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[("mix",)], base)


def test_svd_combine_error_decreases_with_rank_and_vanishes_at_full_rank() -> None:
    am = _two_loras()
    target = {k: 0.5 * v for k, v in _delta(am, "default").items()}
    for k, v in _delta(am, "b").items():
        target[k] = target.get(k, 0) + 0.5 * v
    errors = []
    for r in (1, 2, 3, 6):
        unipeft.combine(am, {"default": 0.5, "b": 0.5}, method="svd", rank=r, name=f"svd{r}")
        got = _delta(am, f"svd{r}")
        errors.append(sum(float((got[k] - target[k]).norm() ** 2) for k in target) ** 0.5)
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5 * max(float(t.norm()) for t in target.values())  # Σ rᵢ ≤ 6 everywhere: exact


def test_ties_matches_a_reference_implementation() -> None:
    am = _two_loras()
    density = 0.3
    unipeft.combine(am, {"default": 1.0, "b": 0.8}, method="ties", density=density, rank=64, name="t")
    a, b, got = _delta(am, "default"), _delta(am, "b"), _delta(am, "t")
    for key in got:
        zero = torch.zeros_like(got[key])
        tasks = [1.0 * a.get(key, zero), 0.8 * b.get(key, zero)]
        kept = []
        for t in tasks:  # reference TIES, written independently: trim, elect, disjoint mean
            flat = t.flatten().abs()
            k = max(1, round(density * flat.numel()))
            cut = torch.sort(flat, descending=True).values[k - 1]
            kept.append(t * (t.abs() >= cut))
        total = sum(kept)
        elected = torch.sign(total)
        num = sum(k_ * ((torch.sign(k_) == elected) & (k_ != 0)) for k_ in kept)
        cnt = sum(((torch.sign(k_) == elected) & (k_ != 0)).float() for k_ in kept).clamp(min=1)
        torch.testing.assert_close(got[key], num / cnt, rtol=1e-4, atol=1e-5)


def test_bottleneck_adapters_average_parameters_when_shapes_match() -> None:
    am = unipeft.attach(tiny_model("llama"), "houlsby")
    am.add("b", "houlsby")
    randomize(am, "default", seed=1)
    randomize(am, "b", seed=2)
    unipeft.combine(am, {"default": 0.25, "b": 0.75}, name="avg")
    pa, pb, avg = (am.adapter_parameters(n) for n in ("default", "b", "avg"))
    for k, p in avg.items():
        torch.testing.assert_close(p, 0.25 * pa[k] + 0.75 * pb[k])
    am.add("small", "houlsby", r=4)
    with pytest.raises(UnipeftError, match="differ in parameters or shapes"):
        unipeft.combine(am, {"default": 0.5, "small": 0.5}, name="bad")
    with pytest.raises(UnipeftError, match="only by 'linear'"):
        unipeft.combine(am, {"default": 0.5, "b": 0.5}, method="svd", name="bad")


def test_refusals() -> None:
    am = unipeft.attach(tiny_model("llama"), "lora")
    am.add("h", "houlsby")
    am.add("d", "dora")
    am.add("i", "ia3")
    for weights, method, match in [({"default": 1, "h": 1}, "linear", "alone"), ({"d": 1.0}, "linear", "DoRA"),
                                   ({"i": 1.0}, "linear", "alone"), ({"nope": 1.0}, "linear", "no adapter 'nope'"),
                                   ({"default": "x"}, "linear", "must be a number"),
                                   ({"default": 1.0}, "avg", "not one of"),
                                   ({}, "linear", "at least one")]:
        with pytest.raises(UnipeftError, match=match):
            unipeft.combine(am, weights, method=method, name="new")
    assert "new" not in am.recipes


def test_combine_on_real_minilm(minilm_path) -> None:
    from transformers import AutoModel

    am = unipeft.attach(AutoModel.from_pretrained(minilm_path), "lora", r=8)
    am.add("b", "lora", r=4, targets=["q", "v", "o"])
    randomize(am, "default", seed=3)
    randomize(am, "b", seed=4)
    unipeft.combine(am, {"default": 0.5, "b": 0.5}, method="linear", name="lin")
    unipeft.combine(am, {"default": 0.5, "b": 0.5}, method="svd", rank=4, name="low")
    a, b, lin, low = (_delta(am, n) for n in ("default", "b", "lin", "low"))
    for key, d in lin.items():
        torch.testing.assert_close(d, 0.5 * a.get(key, 0) + 0.5 * b.get(key, 0), rtol=1e-4, atol=1e-6)
    assert {k: v.shape for k, v in low.items()} == {k: v.shape for k, v in lin.items()}
    assert all(torch.linalg.matrix_rank(v.float()) <= 4 for v in low.values())
