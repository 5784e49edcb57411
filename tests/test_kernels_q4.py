"""The 4-bit weight kernel (kernels_q4.py) under TRITON_INTERPRET=1 on CPU: its dequantization against
bitsandbytes' own dequantize_4bit (NF4, FP4, double-quantized absmax decoded first), and W' = dequant(W) + s·B·A
against addmm_ on that dequantized W, as the fused QLoRA path computes it. fp32 and fp16 (the interpreter does not
run bf16)."""

from __future__ import annotations

import os

import pytest
import torch

from unipeft import kernels_q4, launching

pytest.importorskip("triton")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py turns it on unless the environment says otherwise
    pytest.skip("these tests run Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)


def _quantized(m: int, n: int, quant_type: str, nested: bool, dtype: torch.dtype, blocksize: int = 64):
    """(packed codes, decoded fp32 absmax, bitsandbytes' own dequantization in `dtype`)."""
    g = torch.Generator().manual_seed(m * n)
    w = torch.randn(m, n, generator=g).to(dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    return packed, absmax.float(), bnb_functional.dequantize_4bit(packed, state)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantization_equals_bitsandbytes(quant_type: str, nested: bool, dtype: torch.dtype) -> None:
    """Without B and A the kernel gives bitsandbytes' dequantized weight bit for bit (odd row count and a width
    that is not a multiple of the tile: masked tiles)."""
    m, n = 70, 192
    packed, absmax, expected = _quantized(m, n, quant_type, nested, dtype)
    got = kernels_q4.q4_weight(packed, absmax, kernels_q4.table(quant_type, packed.device), (m, n), 64, dtype)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_double_quantized_absmax_decoded_in_the_kernel(quant_type: str, dtype: torch.dtype) -> None:
    """Given the double-quantized absmax as bitsandbytes stores it (`Nested`: uint8 codes, their 256-value table,
    one scale per 256 blocks, the offset as a tensor), the kernel decodes it itself: bitsandbytes' dequantization
    bit for bit, and W' bit for bit the W' built from the absmax decoded beforehand (both absmax modes; a second
    call launches from its plan)."""
    m, n = 70, 192
    g = torch.Generator().manual_seed(n)
    w = torch.randn(m, n, generator=g).to(dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    s2 = state.state2
    nested = kernels_q4.Nested(state.absmax, s2.code, s2.absmax, state.offset, s2.blocksize)
    decoded = (bnb_functional.dequantize_blockwise(state.absmax, s2).float() + state.offset).float()
    codes = kernels_q4.table(quant_type, packed.device)
    expected = bnb_functional.dequantize_4bit(packed, state)
    for rows in (True, False):
        kernels_q4.TILE["rows"] = rows
        try:
            for _ in range(2):
                assert torch.equal(kernels_q4.q4_weight(packed, nested, codes, (m, n), 64, dtype), expected)
                b, a = torch.randn(m, 16, generator=g).to(dtype), torch.randn(16, n, generator=g).to(dtype)
                got = kernels_q4.q4_weight(packed, nested, codes, (m, n), 64, dtype, b, a, 0.5)
                assert torch.equal(got, kernels_q4.q4_weight(packed, decoded, codes, (m, n), 64, dtype, b, a, 0.5))
        finally:
            kernels_q4.TILE["rows"] = True


def test_a_malformed_double_quantized_absmax_is_refused() -> None:
    packed, _, _ = _quantized(32, 64, "nf4", False, torch.float32)
    bad = kernels_q4.Nested(torch.zeros(32, dtype=torch.int32), torch.zeros(256), torch.ones(1), torch.zeros(()), 256)
    with pytest.raises(ValueError, match="double-quantized absmax"):
        kernels_q4.q4_weight(packed, bad, kernels_q4.table("nf4", packed.device), (32, 64), 64, torch.float32)


@pytest.mark.parametrize("rows,n", [(True, 192), (False, 192), (True, 160)])
def test_both_absmax_modes_equal_the_formula(monkeypatch, rows: bool, n: int) -> None:
    """The absmax per (row, block) broadcast over the block, or gathered per element, give the
    dequantization formula table[code]·absmax[element // blocksize] bit for bit — also where the width is not a
    multiple of the tile (160 = 128 + 32), and where blocks of 128 span rows (the broadcast then turns itself
    off). The reference is the formula on the packed codes, not bitsandbytes: its CPU dequantization scales the
    blocks wrongly when the width is not a multiple of the block size (see docs/quantization.md)."""
    monkeypatch.setitem(kernels_q4.TILE, "rows", rows)
    for quant_type, blocksize in (("nf4", 64), ("fp4", 128)):
        m = 48
        packed, absmax, _ = _quantized(m, n, quant_type, True, torch.float32, blocksize)
        table = bnb_functional.get_4bit_type(quant_type, device="cpu").float()
        flat = packed.flatten().long()
        codes = torch.stack([flat >> 4, flat & 15], 1).flatten()[:m * n]
        expected = (table[codes] * absmax.repeat_interleave(blocksize)[:m * n]).view(m, n)
        got = kernels_q4.q4_weight(packed, absmax, kernels_q4.table(quant_type, packed.device), (m, n), blocksize,
                                   torch.float32)
        assert torch.equal(got, expected), (rows, n, blocksize)


def test_an_odd_width_is_not_built_by_the_kernel() -> None:
    """A row's codes must start on a byte: an odd input width is refused by `available` (so quant.dequantizer keeps
    bitsandbytes' path) and by the kernel itself."""
    packed = torch.zeros(3 * 33 // 2 + 1, dtype=torch.uint8)
    assert not kernels_q4.available(packed.to("meta"), torch.float32, "nf4", 64, (3, 33))
    with pytest.raises(ValueError, match="odd input width"):
        kernels_q4.q4_weight(packed, torch.ones(2), kernels_q4.table("nf4", packed.device), (3, 33), 64,
                             torch.float32)


@pytest.mark.parametrize("quant_type,r,blocksize", [("nf4", 16, 64), ("fp4", 40, 128), ("nf4", 4, 64)])
def test_merged_weight_equals_addmm_on_the_dequantized_weight(quant_type: str, r: int, blocksize: int) -> None:
    """W' = dequant(W) + s·B·A: fp32 against the fp64 formula on bitsandbytes' dequantized W; fp16 against addmm_
    with fp32 accumulation and one rounding. Ranks below one chunk, two chunks; a second call of the same signature
    launches from its plan and gives the same numbers for new B."""
    m, n = 96, 256
    g = torch.Generator().manual_seed(r)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-3)):
        packed, absmax, w = _quantized(m, n, quant_type, True, dtype, blocksize)
        codes = kernels_q4.table(quant_type, packed.device)
        for _ in range(2):
            b, a = torch.randn(m, r, generator=g).to(dtype), torch.randn(r, n, generator=g).to(dtype)
            got = kernels_q4.q4_weight(packed, absmax, codes, (m, n), blocksize, dtype, b, a, 0.5)
            expected = (w.double() + 0.5 * (b.double() @ a.double())).to(dtype)
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert any(k[0] == "q4" for k in launching._PLANS)


def test_mismatched_lora_shapes_are_refused() -> None:
    packed, absmax, _ = _quantized(32, 64, "nf4", False, torch.float32)
    codes = kernels_q4.table("nf4", packed.device)
    with pytest.raises(ValueError, match="do not fit"):
        kernels_q4.q4_weight(packed, absmax, codes, (32, 64), 64, torch.float32, torch.zeros(32, 8),
                             torch.zeros(4, 64), 1.0)


def test_fused_qlora_step_through_the_kernel_matches_the_bitsandbytes_path(monkeypatch) -> None:
    """A QLoRA training step on a 4-bit tiny Llama (NF4, double quant, fp32) with every weight built by the kernel
    — W' in one pass, in forward and again in backward, where the sibling groups' dx then takes its low-rank part
    from W' instead of a GEMM of its own — equals the step
    through bitsandbytes' dequantization and addmm_ (UNIPEFT_Q4_KERNEL=0). (The kernel is CUDA-only outside the
    interpreter: `available` is widened to CPU here.) Every input width is a multiple of the 64-element block:
    bitsandbytes 0.50's CPU dequantization scales every block of a narrower weight by the first block's absmax
    (measured: a 32 × 32 NF4 weight dequantized 0.044 away from its original at most, against 0.007 here)."""
    import transformers as T
    from conftest import output_of
    from test_engine import randomize

    import unipeft
    from unipeft import quant

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = quant.quantize(T.LlamaForCausalLM(cfg), "nf4", double_quant=True, compute_dtype=torch.float32)
    am = unipeft.attach(model, "lora", targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
    randomize(am)
    real_available, real_weight = kernels_q4.available, kernels_q4.q4_weight
    monkeypatch.setattr(kernels_q4, "available", lambda packed, *a: real_available(packed.to("meta"), *a)
                        if packed.is_cuda else not kernels_q4.envflags.off("UNIPEFT_Q4_KERNEL"))
    calls: list[bool] = []
    monkeypatch.setattr(kernels_q4, "q4_weight", lambda *a, **k: calls.append(len(a) > 6) or real_weight(*a, **k))
    decodes: list[int] = []
    real_decoded = quant._decoded_absmax
    monkeypatch.setattr(quant, "_decoded_absmax", lambda state: decodes.append(1) or real_decoded(state))
    batch = {"input_ids": torch.randint(1, 64, (2, 64), generator=torch.Generator().manual_seed(1))}
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("UNIPEFT_Q4_KERNEL", flag)
        am.zero_grad(set_to_none=True)
        out = output_of(am(**batch))
        out.pow(2).mean().backward()
        results[flag] = (out.detach(), {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()})
        if flag == "1":  # per layer: 7 W' in forward and 7 in backward (the groups' dx through W' too), but none
            assert calls == [True] * 25, calls  # in backward for layer 0's q/k/v: their input needs no gradient
            assert decodes == []  # the double-quantized absmax decoded in the kernel, never before it
        else:
            assert len(decodes) == 14  # bitsandbytes' path: once per projection and step
    torch.testing.assert_close(results["1"][0], results["0"][0], rtol=1e-5, atol=1e-6)
    for k, g in results["0"][1].items():
        torch.testing.assert_close(results["1"][1][k], g, rtol=1e-4, atol=1e-6)
