"""bench/grads_probe.py's variants of the grads kernel (dB as xaᵀ·g, g never transposed; g tiles loaded by TMA), made
from the product kernel's source: in Triton's interpreter on CPU their gaᵀ and dB's equal the product kernel's and the
explicit formulas, for a three-member group with ragged widths (rows and columns past the ends read as zeros), in
fp32 (sums are the result) and fp16 (rounded by the last-arriving programs); and both under a swept configuration."""

from __future__ import annotations

import pytest
import torch
from conftest import bench_module

pytest.importorskip("triton")


@pytest.mark.parametrize(("kind", "dtype", "config"), [("notrans", torch.float32, None),
                                                       ("notrans", torch.float16, None),
                                                       ("notrans", torch.float16, (32, 16, 32, 4, 2)),
                                                       ("tma", torch.float32, None), ("tma", torch.float16, None),
                                                       ("tma", torch.float16, (32, 16, 32, 4, 2))])
def test_variant_matches_the_product_kernel_and_the_formulas(kind: str, dtype: torch.dtype,
                                                             config: tuple | None) -> None:
    """config: a swept tile configuration (rows per program, columns per step, columns per program — which
    change the grid, the counters' layout and the constexprs — warps, stages), for both kernels."""
    probe = bench_module("grads_probe")
    g = torch.Generator().manual_seed(0)
    # (TMA needs 16-byte row strides: widths of 8 elements' multiples, still ragged against every tile)
    n, r, widths = 150, 4, [72, 40, 88] if kind == "tma" else [70, 40, 90]
    gs = [torch.randn(n, d, generator=g).to(dtype) for d in widths]
    bs = [(torch.randn(d, r, generator=g) * 0.3).to(dtype) for d in widths]
    xas = [torch.randn(n, r, generator=g).to(dtype) for _ in widths]
    offs, scales, total = [0, r, 2 * r], [2.0, 0.5, 1.5], 3 * r
    want = probe.run(gs, bs, xas, offs, scales, total)
    got = probe.run(gs, bs, xas, offs, scales, total, kind, config)
    if config is not None:
        torch.testing.assert_close(probe.run(gs, bs, xas, offs, scales, total, None, config).float(), want.float(),
                                   rtol=2e-3, atol=2e-2)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    n_db = sum(d * r for d in widths)
    ga_t = got[n_db:].view(total, n).float()
    at = 0
    for i, (gi, bi, xi, s) in enumerate(zip(gs, bs, xas, scales)):
        gi, bi, xi = gi.double(), bi.double(), xi.double()
        db = got[at:at + bi.numel()].view(bi.shape).double()
        at += bi.numel()
        torch.testing.assert_close(db, s * gi.t() @ xi, **tol)
        torch.testing.assert_close(ga_t[i * r:(i + 1) * r].double(), (s * gi @ bi).t(), **tol)
