"""Launch plans (launching._Plan): a call whose signature was seen before launches from its recorded plan. Each test
checks the planned call against the explicit formula in fp64 with fresh data (so a plan that kept an old tensor
would show), that the unplanned path did not run, and what makes a new plan. Triton's interpreter on CPU."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

from unipeft import kernels, launching

pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)


@pytest.fixture
def plans(monkeypatch) -> dict:
    """A fresh plan table for this test (the module's is restored afterwards)."""
    table: dict = {}
    monkeypatch.setattr(launching, "_PLANS", table)
    return table


def _count(monkeypatch, name: str) -> list:
    calls: list = []
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _grads_case(seed: int, n: int, dims, r: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    gs = [torch.randn(n, d, generator=g).to(dtype) for d in dims]
    bs = [torch.randn(d, r, generator=g).to(dtype) for d in dims]
    xa = torch.randn(n, r * len(dims), generator=g).to(dtype)
    return gs, bs, list(xa.split_with_sizes([r] * len(dims), 1))


def _grads_expected(gs, bs, xas, rows, scales, total_rank):
    n = gs[0].shape[0]
    ga_t = torch.zeros(total_rank, n, dtype=torch.float64)
    dbs = []
    for g, b, xa, row, s in zip(gs, bs, xas, rows, scales):
        ga_t[row:row + b.shape[1]] = s * (g.double() @ b.double()).t()
        dbs.append((s * g.double().t() @ xa.double()).reshape(-1))
    return ga_t, torch.cat(dbs)


@pytest.mark.parametrize("dtype,listed", [(torch.float32, 3), (torch.float16, 3), (torch.float32, 2),
                                          (torch.float16, 2)])
def test_lora_grads_second_call_runs_from_its_plan(plans, monkeypatch, dtype, listed) -> None:
    """fp32 (the sums are the result), fp16 (rounded into a new buffer), and a group with one member without a
    gradient (its gaᵀ rows stay zero): the second call with new data takes the plan and is right."""
    unplanned = _count(monkeypatch, "_lora_grads")
    rows, scales = [0, 8, 16][:listed], [0.5, 1.5, 2.0][:listed]
    for seed in (0, 1):
        gs, bs, xas = _grads_case(seed, 70, [40, 24, 24][:listed], 8, dtype)
        ga_t, dbs = kernels.lora_grads(gs, bs, xas, rows, scales, 24)
        want_ga, want_db = _grads_expected(gs, bs, xas, rows, scales, 24)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ga_t.double(), want_ga, rtol=tol, atol=tol)
        torch.testing.assert_close(dbs.double(), want_db, rtol=tol, atol=tol)
        assert ga_t.dtype == dbs.dtype == dtype
    assert len(unplanned) == 1 and len(plans) == 1


def test_a_new_signature_makes_a_new_plan(plans, monkeypatch) -> None:
    """Strides, 16-byte alignment, scales, row offsets and the batch length each select their own plan (Triton
    specializes on some, the arguments carry the rest); every call is right."""
    unplanned = _count(monkeypatch, "_lora_grads")
    gs, bs, xas = _grads_case(0, 64, [32, 16], 8)
    base = dict(rows=[0, 8], scales=[1.0, 2.0])
    wide = torch.randn(64, 33)
    variants = [
        (gs, bs, xas, base),
        ([gs[0].t().contiguous().t(), gs[1]], bs, xas, base),                       # g column-major
        ([wide[:, 1:], gs[1]], [torch.randn(32, 8), bs[1]], xas, base),            # g's pointer 4 bytes off 16
        (gs, bs, xas, dict(rows=[0, 8], scales=[1.0, 3.0])),                        # another scale
        (gs, bs, xas, dict(rows=[8, 0], scales=[1.0, 2.0])),                        # members' rows swapped
        ([g[:40] for g in gs], bs, [x[:40] for x in xas], base),                    # another batch length
    ]
    for i, (g_, b_, x_, kw) in enumerate(variants):
        ga_t, dbs = kernels.lora_grads(g_, b_, x_, kw["rows"], kw["scales"], 16)
        want_ga, want_db = _grads_expected(g_, b_, x_, kw["rows"], kw["scales"], 16)
        torch.testing.assert_close(ga_t.double(), want_ga, rtol=1e-4, atol=1e-4, msg=str(i))
        torch.testing.assert_close(dbs.double(), want_db, rtol=1e-4, atol=1e-4, msg=str(i))
    assert len(unplanned) == len(plans) == len(variants)
    assert {k[0] for k in plans} == {"grads"}


def test_merges_second_call_runs_from_its_plan(plans, monkeypatch) -> None:
    """merged_weights (a q/k/v group: W' rows and the stacked A) and merged_weight (one projection): the second
    call with new weights takes the plan and matches W + s·B·A."""
    group = _count(monkeypatch, "_merged_weights")
    lone = _count(monkeypatch, "_grid_args")
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        ws = [torch.randn(d, 24, generator=g) for d in (40, 16, 16)]
        bs = [torch.randn(d, 8, generator=g) for d in (40, 16, 16)]
        as_ = [torch.randn(8, 24, generator=g) for _ in range(3)]
        w_primes, a_cat = kernels.merged_weights(ws, bs, as_, [0.5, 1.0, 2.0])
        for w_p, w, b, a, s in zip(w_primes, ws, bs, as_, [0.5, 1.0, 2.0]):
            torch.testing.assert_close(w_p.double(), w.double() + s * b.double() @ a.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a_cat, torch.cat(as_))
        one = kernels.merged_weight(ws[0], bs[0], as_[0], 0.7)
        torch.testing.assert_close(one.double(), ws[0].double() + 0.7 * bs[0].double() @ as_[0].double(),
                                   rtol=1e-5, atol=1e-5)
    assert len(group) == 1, "the group's second build came from its plan"
    assert len(lone) == 2, "one argument build for the group's first call, one for the lone projection's"
    assert len(plans) == 2


def test_in_place_merge_is_never_planned(plans) -> None:
    """merged_weight(out=W) (a dequantized 4-bit weight updated in place) takes the unplanned path: a plan recorded
    with W and out as one tensor could not tell them apart later."""
    w, b, a = torch.randn(16, 12), torch.randn(16, 4), torch.randn(4, 12)
    want = w.double() + 2.0 * b.double() @ a.double()
    kernels.merged_weight(w, b, a, 2.0, out=w)
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-5)
    assert not plans


def test_plans_hold_no_tensor(plans) -> None:
    """A plan must not keep a model's weights (or a step's buffers) alive."""
    w, b, a = torch.randn(16, 12), torch.randn(16, 4), torch.randn(4, 12)
    gs, bs, xas = _grads_case(0, 32, [16], 4)
    kernels.merged_weight(w, b, a, 1.0)
    kernels.lora_grads(gs, bs, xas, [0], [1.0], 4)
    refs = [weakref.ref(t) for t in (w, b, a, gs[0], bs[0], xas[0])]
    del w, b, a, gs, bs, xas
    gc.collect()
    assert len(plans) == 2 and all(r() is None for r in refs)


def test_a_refused_launch_drops_every_plan(plans, monkeypatch) -> None:
    """A launcher that rejects its arguments (another Triton's API) turns plans and cached launchers off; the call
    still returns the right result through Triton's own path."""
    monkeypatch.setattr(launching, "_DIRECT", [True])
    w, b, a = torch.randn(16, 12), torch.randn(16, 4), torch.randn(4, 12)
    kernels.merged_weight(w, b, a, 1.0)
    (plan,) = plans.values()

    def refuse(grid, args):
        raise TypeError("launcher API changed")

    plan.launch = refuse
    got = kernels.merged_weight(w, b, a, 1.0)
    torch.testing.assert_close(got.double(), w.double() + b.double() @ a.double(), rtol=1e-5, atol=1e-5)
    assert launching._DIRECT == [False]
    assert len(plans) == 1 and next(iter(plans.values())) is not plan, "dropped, then recorded afresh"
