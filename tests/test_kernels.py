"""The Triton kernel (kernels.py) under TRITON_INTERPRET=1 on CPU against the explicit formula W + s·B·A in fp64.
(The interpreter runs fp32 and fp16 correctly, not bf16; the GPU check in bench/kernel_check.py covers bf16 and
the cached launch path.)"""

from __future__ import annotations

import os

import pytest
import torch

from unipeft import kernels

pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py turns it on unless the environment says otherwise
    pytest.skip("these tests run Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)


@pytest.mark.parametrize("m,n,r", [(70, 130, 16), (33, 17, 4), (128, 64, 40)])
def test_merged_weight_matches_the_formula(m: int, n: int, r: int) -> None:
    """Ranks below one tile (masked), exactly one tile, and two chunks; shapes that are not tile multiples."""
    g = torch.Generator().manual_seed(m)
    w, b, a = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(m, n), (m, r), (r, n)])
    expected = w + 0.7 * (b @ a)
    got = kernels.merged_weight(w.float(), b.float(), a.float(), 0.7)
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    half = kernels.merged_weight(w.half(), b.half(), a.half(), 0.7)  # fp32 accumulation, one rounding to fp16
    reference = torch.addmm(w.half().float(), b.half().float(), a.half().float(), alpha=0.7).half()
    torch.testing.assert_close(half, reference, rtol=1e-3, atol=1e-3)


def test_merged_weight_takes_strided_inputs_and_works_in_place() -> None:
    g = torch.Generator().manual_seed(0)
    w_t = torch.randn(40, 24, generator=g)  # transformers' Conv1D stores d_in × d_out: W is its transpose
    b, a = torch.randn(24, 8, generator=g), torch.randn(8, 40, generator=g)
    expected = w_t.t().double() + 2.0 * (b.double() @ a.double())
    torch.testing.assert_close(kernels.merged_weight(w_t.t(), b, a, 2.0).double(), expected, rtol=1e-5, atol=1e-5)
    w = w_t.t().contiguous()
    out = kernels.merged_weight(w, b, a, 2.0, out=w)  # a dequantized 4-bit weight is updated in place
    assert out.data_ptr() == w.data_ptr()
    torch.testing.assert_close(w.double(), expected, rtol=1e-5, atol=1e-5)


def test_merged_weight_refuses_mismatched_operands() -> None:
    with pytest.raises(ValueError, match="shapes/dtypes disagree"):
        kernels.merged_weight(torch.zeros(4, 6), torch.zeros(4, 2), torch.zeros(3, 6), 1.0)
    with pytest.raises(ValueError, match="shapes/dtypes disagree"):
        kernels.merged_weight(torch.zeros(4, 6), torch.zeros(4, 2).half(), torch.zeros(2, 6), 1.0)
    with pytest.raises(ValueError, match="out must match W"):
        kernels.merged_weight(torch.zeros(4, 6), torch.zeros(4, 2), torch.zeros(2, 6), 1.0,
                              out=torch.zeros(4, 6).half())


def test_triton_path_only_for_cuda_tensors_and_can_be_turned_off(monkeypatch) -> None:
    assert not kernels.available(torch.zeros(2))  # CPU: the PyTorch ops are the path (and the reference)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert kernels.available(torch.zeros(2)) == kernels._HAS_TRITON
    assert not kernels.available(torch.zeros(2, dtype=torch.float64))  # the kernel would round W to fp32
    monkeypatch.setenv("UNIPEFT_TRITON", "0")
    assert not kernels.available(torch.zeros(2))
