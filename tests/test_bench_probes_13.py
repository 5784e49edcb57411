"""The thirteenth session's bench probe on CPU: dx_order_probe.py's orders of a sibling group's dx (frozen GEMMs then
the low-rank GEMM, the low-rank GEMM first, W' rebuilt) all compute Σ_i g_i·(W_i + s·B_i·A_i) (fp32; the W'
build through the Triton kernel in its interpreter)."""

from __future__ import annotations

import pytest
import torch
from conftest import bench_module


@pytest.mark.parametrize(("members", "d_out"), [(3, 48), (2, 80)])
def test_dx_orders_compute_the_formula(members: int, d_out: int) -> None:
    pytest.importorskip("triton")
    probe = bench_module("dx_order_probe")
    torch.manual_seed(members)
    s = 2.0
    layers = probe._layers(members, d_out, "cpu", torch.float32, s, n=40, h=32, r=4, layers=2)
    fns = probe._variants(layers, s)
    assert {"current", "current_interleaved", "lowrank_first", "rebuild"} <= set(fns)
    for name in ("current", "current_interleaved", "lowrank_first", "rebuild"):
        for ly in layers:
            ly["dx"].fill_(float("nan"))  # every element must be written by the order itself
        fns[name]()
        for ly in layers:
            torch.testing.assert_close(ly["dx"].double(), probe.expected_dx(ly, s), rtol=1e-4, atol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")
    fns["frozen"]()
    for ly in layers:  # the frozen part alone: Σ g_i·W_i
        want = sum(g.double() @ w.double() for g, w in zip(ly["gs"], ly["ws"]))
        torch.testing.assert_close(ly["dx"].double(), want, rtol=1e-4, atol=1e-4)
