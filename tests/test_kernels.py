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


def test_compiled_op_is_registered_and_matches_the_formula() -> None:
    """The kernel as the custom op torch.compile graphs call (`unipeft::merged_weight`, a triton_op): called outside a
    compiler it runs the same kernel; `tag` (forward 0, backward 1) only keeps the compiler from merging calls."""
    assert hasattr(torch.ops.unipeft, "merged_weight")
    g = torch.Generator().manual_seed(3)
    w, b, a = torch.randn(50, 70, generator=g), torch.randn(50, 6, generator=g), torch.randn(6, 70, generator=g)
    expected = w.double() + 1.5 * (b.double() @ a.double())
    for tag in (0, 1):
        torch.testing.assert_close(kernels.compiled_merged_weight(w, b, a, 1.5, tag).double(), expected,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shapes/dtypes disagree"):
        kernels.compiled_merged_weight(w, b, a.t().contiguous(), 1.0)


def test_lora_function_compiler_branch_through_the_kernel(monkeypatch) -> None:
    """`_LoraLinear` as a compiled graph runs it — W' from the custom op in forward and, tagged, in backward — against
    y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ differentiated by autograd (fp32 tensors, compared in fp64)."""
    from unipeft import fused

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(kernels, "available", lambda t: True)
    calls = []
    real = kernels.compiled_merged_weight
    monkeypatch.setattr(kernels, "compiled_merged_weight",
                        lambda *args, **kw: calls.append(kw.get("tag", 0)) or real(*args, **kw))
    g = torch.Generator().manual_seed(1)
    x, w, a, b = (torch.randn(*shape, generator=g, requires_grad=True) for shape in [(2, 5, 16), (12, 16), (4, 16),
                                                                                       (12, 4)])
    expected = x.double() @ w.double().t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    gy = torch.randn(expected.shape, generator=g)
    want = torch.autograd.grad(expected, (x, a, b), gy.double())
    y = fused._LoraLinear.apply(x, w.detach(), None, a, b, 0.5, True, None)
    got = torch.autograd.grad(y, (x, a, b), gy)
    assert calls == [0, 1], "forward builds W' with tag 0, backward again with tag 1"
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg.double(), ww.double(), rtol=1e-4, atol=1e-4)


def test_launch_arithmetic_matches_triton() -> None:
    """The grid and rank-chunk sizes come from plain integer arithmetic (Triton's helpers cost µs per call from
    Python); the numbers must be Triton's."""
    import triton

    for x in range(0, 300):
        assert kernels._next_power_of_2(x) == triton.next_power_of_2(x)
        for y in (1, 16, 64, 128):
            assert kernels._cdiv(x, y) == triton.cdiv(x, y)
