"""bench/lora_gemm_probe.py's GEMM with the LoRA term in its epilogue (TMA tiles, optionally persistent): in
Triton's interpreter on CPU it gives x·Wᵀ, and x·Wᵀ + s·xa·Bᵀ, for a shape whose row blocks form a ragged last
group and whose tiles take the persistent programs several rounds."""

from __future__ import annotations

import pytest
import torch
from conftest import bench_module

pytest.importorskip("triton")


@pytest.mark.parametrize("persistent", [False, True])
def test_lora_gemm_matches_the_formula(persistent: bool) -> None:
    probe = bench_module("lora_gemm_probe")
    g = torch.Generator().manual_seed(0)
    m, k, n, r, s = 128, 64, 96, 16, 1.5
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    xa, b = torch.randn(m, r, generator=g), torch.randn(n, r, generator=g)
    config = (32, 32, 32, 2, 4, 3, persistent)  # 4 × 3 tiles; groups of 3 row blocks (the last has 1)
    torch.testing.assert_close(probe.lora_gemm(x, w, None, None, s, config), x @ w.t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(probe.lora_gemm(x, w, xa, b, s, config), x @ w.t() + s * xa @ b.t(),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="does not divide"):
        probe.lora_gemm(x[:100], w, None, None, s, config)
