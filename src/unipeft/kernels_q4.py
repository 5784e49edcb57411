"""Triton kernel for a 4-bit base's weight on the fused QLoRA path (bitsandbytes NF4 / FP4 storage).

q4_weight:  W' = dequant(W) + s·B·A, or dequant(W) alone, in one pass over the packed weight.
  The fused path's 4-bit projection (fused.py, merged form) dequantizes W through bitsandbytes' op — a launch
  through its Python implementation, 0.5 byte read and 2 written per weight — and then adds s·B·A in place with
  addmm_ (2 bytes read and 2 written again, one more launch). Here one kernel reads the packed codes and the
  decoded absmax, looks each code up in the format's 16-value table, scales it and rounds it to W's dtype (the
  value bitsandbytes' dequantization gives), adds s·B·A accumulated in fp32 and rounds once — the numbers addmm_
  gives on that dequantized W: 0.5 + 2 bytes per weight, one launch, from a launch plan after the first call
  (launching.py). Without B and A it is the plain dequantization a sibling group's backward reads for dx.

Layout (bitsandbytes 0.50; the tests compare against its own dequantize_4bit): the weight's d_out × d_in elements
row-major, two per byte, the first in the high nibble; one absmax per `blocksize` consecutive elements (decoded
first where double-quantized: quant.dequantizer does that once per call); a code's value from
`bitsandbytes.functional.get_4bit_type(quant_type)`.

Eager CUDA calls only (`available`): under torch.compile the bitsandbytes path runs. Tests run the kernel under
`TRITON_INTERPRET=1` on CPU (fp32, fp16) against bitsandbytes' dequantization and the explicit formula.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import envflags, launching
from .kernels import _DTYPES, _HAS_TRITON, _cdiv, _int_spec, _kernel, _next_power_of_2

tl = None  # triton.language, bound on first use (kernels._kernel)

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}  # (quant type, device) -> its 16 code values, fp32
_NAMES = ("BLOCK", "BM", "BN", "BR", "NR", "LORA", "IEEE", "ROWS", "NESTED", "BLOCK2")


class Nested(NamedTuple):
    """A double-quantized absmax as bitsandbytes stores it, decoded inside the kernel: absmax[i] =
    code[q[i]]·scale[i // blocksize] + offset. Decoding it beforehand is two more launches per weight (bitsandbytes'
    blockwise dequantization through its Python op, then the offset added), each a few µs of GPU and tens of µs of
    host time, 224 of them in a QLoRA step of the harness model."""

    q: torch.Tensor  # uint8, one per 4-bit block
    code: torch.Tensor  # fp32, its 256 values
    scale: torch.Tensor  # fp32, one per `blocksize` entries of q
    offset: torch.Tensor  # fp32, one element (a tensor: reading it on the host would synchronize)
    blocksize: int


def available(packed: torch.Tensor, dtype: torch.dtype, quant_type: str, blocksize: int,
              shape: tuple[int, ...]) -> bool:
    """Whether the kernel builds this weight: CUDA, eager, a known 4-bit format, a power-of-2 block size, an even
    input width (a row's codes start on a byte), 16/32-bit output, int32 offsets; `UNIPEFT_Q4_KERNEL=0` (or
    `UNIPEFT_TRITON=0`) turns it off."""
    return (_HAS_TRITON and packed.is_cuda and not torch.compiler.is_compiling() and len(shape) == 2
            and shape[1] % 2 == 0 and quant_type in ("nf4", "fp4") and dtype in _DTYPES and blocksize > 0
            and blocksize & (blocksize - 1) == 0 and 2 * packed.numel() < 2**31
            and not envflags.off("UNIPEFT_TRITON") and not envflags.off("UNIPEFT_Q4_KERNEL"))


def table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 values of a 4-bit code (bitsandbytes' own table), fp32, cached per device."""
    key = (quant_type, device)
    t = _TABLES.get(key)
    if t is None:
        from bitsandbytes.functional import get_4bit_type

        t = _TABLES[key] = get_4bit_type(quant_type, device="cpu").float().to(device)
    return t


def _q4_kernel(q_ptr, absmax_ptr, table_ptr, code2_ptr, scale2_ptr, offset_ptr, b_ptr, a_ptr, out_ptr, M, N, R, s,
               sbm, sbr, sar, san, som, son,
               BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, NR: tl.constexpr,
               LORA: tl.constexpr, IEEE: tl.constexpr, ROWS: tl.constexpr, NESTED: tl.constexpr,
               BLOCK2: tl.constexpr):
    """One (BM × BN) tile of W' = dequant(W) [+ s·B·A]. The packed bytes are read as a (BM × BN/2) tile (N even:
    a row's codes start on a byte), split into high and low nibble and interleaved back into element order; a
    code's value is gathered from the 16-entry table (a tree of selects on the code's bits was measured within 5%
    of it, bench/q4_probe.py at its first run). ROWS reads one absmax per (row, block) and
    broadcasts it over the block (N and BN multiples of BLOCK), else one gather per element. NESTED: the absmax is
    double-quantized (`Nested`) and decoded here, code2[q]·scale2[block // BLOCK2] rounded, then + offset rounded
    (bitsandbytes' two roundings: launched with FMA contraction off). The dequantized value
    is rounded to the output dtype (bitsandbytes' value), then the LoRA term (rank chunks of BR, fp32
    accumulation) is added and the sum rounded once."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rh = tl.program_id(1) * (BN // 2) + tl.arange(0, BN // 2)
    mm, mn = rm < M, rn < N
    mask = mm[:, None] & mn[None, :]
    byte = tl.load(q_ptr + rm[:, None] * (N // 2) + rh[None, :], mask=mm[:, None] & (rh < N // 2)[None, :],
                   other=0).to(tl.int32)
    code = tl.reshape(tl.join(byte >> 4, byte & 15), (BM, BN))
    value = tl.load(table_ptr + code)
    if ROWS:
        rb = tl.program_id(1) * (BN // BLOCK) + tl.arange(0, BN // BLOCK)
        block = rm[:, None] * (N // BLOCK) + rb[None, :]
        smask = mm[:, None] & (rb < N // BLOCK)[None, :]
    else:
        block = (rm[:, None] * N + rn[None, :]) // BLOCK
        smask = mask
    if NESTED:
        qa = tl.load(absmax_ptr + block, mask=smask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + qa) * tl.load(scale2_ptr + block // BLOCK2, mask=smask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=smask, other=0.0)
    if ROWS:
        w = tl.reshape(tl.reshape(value, (BM, BN // BLOCK, BLOCK)) * scale[:, :, None], (BM, BN))
    else:
        w = value * scale
    w = w.to(out_ptr.dtype.element_ty).to(tl.float32)
    if LORA:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for i in tl.static_range(NR):
            kr = i * BR + tl.arange(0, BR)
            bt = tl.load(b_ptr + rm[:, None] * sbm + kr[None, :] * sbr, mask=mm[:, None] & (kr[None, :] < R),
                         other=0.0)
            at = tl.load(a_ptr + kr[:, None] * sar + rn[None, :] * san, mask=(kr[:, None] < R) & mn[None, :],
                         other=0.0)
            if IEEE:
                acc += tl.dot(bt, at, input_precision="ieee")
            else:
                acc += tl.dot(bt, at)
        w = w + s * acc
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, w.to(out_ptr.dtype.element_ty), mask=mask)


def q4_weight(packed: torch.Tensor, absmax: torch.Tensor | Nested, codes: torch.Tensor, shape: tuple[int, int],
              blocksize: int, dtype: torch.dtype, b: torch.Tensor | None = None, a: torch.Tensor | None = None,
              s: float = 0.0) -> torch.Tensor:
    """dequant(W) (+ s·B·A when B and A are given: B d_out × r, A r × d_in, in `dtype`) as a new contiguous
    d_out × d_in tensor of `dtype`. `packed`: the uint8 codes, `absmax`: fp32, one per block, or a double-quantized
    one (`Nested`), `codes`: `table()`."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    lora = b is not None
    nested = isinstance(absmax, Nested)
    tensors = [packed, absmax.q if nested else absmax, codes, *(absmax[1:4] if nested else (out, out, out)),
               b if lora else out, a if lora else out, out]
    key = ("q4", launching._signature(tensors), float(s), blocksize, lora, absmax.blocksize if nested else 0)
    plan = launching._PLANS.get(key)
    if plan is not None and plan.ready() and plan(tensors):
        return out
    if shape[1] % 2:
        raise ValueError(f"q4_weight: a {shape} weight has an odd input width; the kernel reads a row's codes "
                         "from whole bytes")
    if lora and (b.shape != (shape[0], a.shape[0]) or a.shape[1] != shape[1] or not b.dtype == a.dtype == dtype):
        raise ValueError(f"q4_weight: B {tuple(b.shape)} {b.dtype} and A {tuple(a.shape)} {a.dtype} do not fit a "
                         f"{shape} {dtype} weight")
    if nested and (absmax.q.dtype != torch.uint8 or absmax.offset.numel() != 1 or absmax.blocksize <= 0):
        raise ValueError("q4_weight: a double-quantized absmax needs uint8 codes, one offset and a block size")
    grid, args = _grid_args(packed, absmax, codes, b, a, out, float(s), blocksize)
    launch_key = _launch_key(args)
    launching._launch(_kernel(_q4_kernel), grid, args, launch_key, _NAMES, TILE["warps"], options=_OPTIONS)
    launching._plan(key, launch_key, _kernel(_q4_kernel), grid, args, tensors, _NAMES, TILE["warps"],
                    options=_OPTIONS)
    return out


# The tile, warps and absmax mode: the fastest of 48 variants in bench/q4_probe.py on an H200 (q4_probe_1.json):
# W' of a 2048 × 2048 NF4 weight in 8.3 GPU µs against 11.7 for bitsandbytes' dequantization + addmm_ (19.5
# against 27.0 at 5632 × 2048); dequantization alone as fast as bitsandbytes'. The absmax broadcast is what
# matters (44–54 µs without it).
TILE = dict(bm=64, bn=128, warps=4, rows=True)
_OPTIONS = dict(enable_fp_fusion=False)  # (a double-quantized absmax decoded with bitsandbytes' two roundings)


def _grid_args(packed, absmax, codes, b, a, out, s: float, blocksize: int, bm: int | None = None,
               bn: int | None = None, rows: bool | None = None) -> tuple[tuple[int, int, int], tuple]:
    m, n = out.shape
    bm, bn = bm or TILE["bm"], bn or TILE["bn"]
    rows = (TILE["rows"] if rows is None else rows) and n % blocksize == 0 and bn % blocksize == 0
    lora = b is not None
    r = a.shape[0] if lora else 0
    br = max(16, min(64, _next_power_of_2(max(r, 1))))
    b_, a_ = (b, a) if lora else (out, out)  # (never read without LoRA)
    nested = isinstance(absmax, Nested)
    double = (absmax.q, absmax.code, absmax.scale, absmax.offset) if nested else (absmax, out, out, out)
    args = (packed, double[0], codes, *double[1:], b_, a_, out, m, n, r, s, *(b.stride() if lora else (0, 0)),
            *(a.stride() if lora else (0, 0)), *out.stride(),
            blocksize, bm, bn, br, max(1, _cdiv(r, br)), lora, out.dtype == torch.float32, rows, nested,
            absmax.blocksize if nested else 1)
    return (_cdiv(m, bm), _cdiv(n, bn), 1), args


def _launch_key(args: tuple) -> tuple:
    """What Triton specializes the kernel on: the pointers' dtypes and 16-byte alignment, every int argument's
    value class (kernels._int_spec), and the constexprs."""
    tensors = args[:9]
    return ("q4", tensors[0].device, *(t.dtype for t in tensors), *(t.data_ptr() % 16 == 0 for t in tensors),
            *(_int_spec(v) for v in args[9:12]), *(_int_spec(v) for v in args[13:19]), *args[19:])
