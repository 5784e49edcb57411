"""bench/da_probe.py's candidate kernel for dA = gaᵀ·x (split over rows with fp32 atomics, the last arriving program
of a column block rounding it), run in Triton's interpreter on CPU in fp32 against torch.mm: several row splits and
column blocks, ragged edges, a rank below the tile's, strided x, and one buffer reused by consecutive calls (the
kernel leaves it zeroed)."""

from __future__ import annotations

import pytest
import torch
from conftest import bench_module

pytest.importorskip("triton")


@pytest.mark.parametrize("r, n, d", [(5, 70, 40), (16, 64, 32), (20, 33, 17)])
def test_da_matches_the_product_and_leaves_its_buffer_zeroed(r: int, n: int, d: int) -> None:
    probe = bench_module("da_probe")
    g = torch.Generator().manual_seed(r + n + d)
    ga_t = torch.randn(r, n, generator=g)
    x_t = torch.randn(d, n, generator=g)
    x = x_t.t()  # strided (column-major) x
    cfg = dict(bk=16, bd=16, rows_per_program=32, warps=1, stages=1)
    blocks = -(-d // 16)
    buf = torch.zeros(r * d + blocks)
    for _ in range(2):  # the second call reuses the buffer the first left zeroed
        got = probe.da(ga_t, x, buf, **cfg)
        torch.testing.assert_close(got, ga_t @ x, rtol=1e-5, atol=1e-4)
        assert torch.count_nonzero(buf) == 0
