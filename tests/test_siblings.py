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
        calls.append(len(args[1]))
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
    ys = siblings._LoraGroup.apply(x, scales, *(t for i in range(3) for t in (ws[i], as_[i], bs[i])), *biases)
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
    torch.testing.assert_close(results["1"][0], results["0"][0])
    for k, g in results["0"][1].items():
        torch.testing.assert_close(results["1"][1][k], g, msg=k)


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
