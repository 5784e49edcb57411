"""Triton kernels for decoding with a different LoRA adapter per batch row (routed.py; optional extra
`unipeft[kernels]`); the batched-GEMM path in routed.py is the reference.

routed_lora:  each row's delta (x·A_sᵀ)·B_sᵀ read from the stacked adapters at the row's slot s — no per-row copies
  of the weights — as a shrink split over input columns (fp32 partial sums) and an expand that adds the delta to y.
  At 32 rows × 32 adapters (r = 16) on the H200: 3.8–4.5 µs per projection against 10.7–17.3 µs for bmm + baddbmm
  on gathered rows (GPU time from a CUDA graph, bench/routed_probe.py). Used under torch.compile (decoding steps
  compiled with CUDA graphs); eager decoding is host-bound and a Triton launch costs more host time than the two
  aten launches it replaces. Under torch.compile this is the custom op `unipeft::routed_lora`; launches share
  kernels.py's cache of compiled kernels. Tests run the kernels under `TRITON_INTERPRET=1` on CPU.
"""

from __future__ import annotations

import contextlib

import torch

from . import envflags
from .kernels import _DTYPES, _HAS_OP, _HAS_TRITON, _cdiv, _int_spec, _kernel, _launch, _next_power_of_2

tl = None  # triton.language, bound by kernels._kernel on first use (the interpreter patches it in these globals)


def _shrink_kernel(x_ptr, a_ptr, slot_ptr, part_ptr, D_IN, R, T, KS, sxn, sxd, sas, sar, sak,
                   BK: tl.constexpr, BR: tl.constexpr):
    """Token row m = pid0, input columns [pid1·BK, +BK): this chunk's part of x_m·A_sᵀ (s = slots[m // T]), fp32,
    to part[m, pid1, :BR]. A is read from the stack at slot s — no per-row copies."""
    m, ks = tl.program_id(0).to(tl.int64), tl.program_id(1)  # (int64 offsets: m times a row stride)
    slot = tl.load(slot_ptr + m // T)
    rr = tl.arange(0, BR)
    rk = ks * BK + tl.arange(0, BK)
    mk = rk < D_IN
    xk = tl.load(x_ptr + m * sxn + rk * sxd, mask=mk, other=0.0).to(tl.float32)
    ak = tl.load(a_ptr + slot * sas + rr[:, None] * sar + rk[None, :] * sak, mask=(rr[:, None] < R) & mk[None, :],
                 other=0.0).to(tl.float32)
    tl.store(part_ptr + (m * KS + ks) * BR + rr, tl.sum(ak * xk[None, :], axis=1))


def _expand_kernel(y_ptr, b_ptr, slot_ptr, part_ptr, out_ptr, D_OUT, R, T, KS, syn, syd, sbs, sbn, sbr, son, sod,
                   BN: tl.constexpr, BR: tl.constexpr, KP: tl.constexpr):
    """Token row m = pid0, output columns [pid1·BN, +BN): out = y + (Σ parts)·B_sᵀ, B_s read from the stack."""
    m = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + m // T)
    rr = tl.arange(0, BR)
    kp = tl.arange(0, KP)
    parts = tl.load(part_ptr + (m * KS + kp[:, None]) * BR + rr[None, :], mask=kp[:, None] < KS, other=0.0)
    xa = tl.sum(parts, axis=0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mn = rn < D_OUT
    bt = tl.load(b_ptr + slot * sbs + rn[:, None] * sbn + rr[None, :] * sbr, mask=mn[:, None] & (rr[None, :] < R),
                 other=0.0).to(tl.float32)
    y = tl.load(y_ptr + m * syn + rn * syd, mask=mn, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * son + rn * sod, (y + tl.sum(bt * xa[None, :], axis=1)).to(out_ptr.dtype.element_ty),
             mask=mn)


#: block sizes (bench/routed_probe.py --sweep on the H200): input columns per shrink program, output columns per
#: expand program, warps of each
ROUTED_BK, ROUTED_BN, ROUTED_WARPS = 256, 256, 4
ROUTED_MAX_TOKENS = 4  #: tokens per row up to which the routed kernels apply (decoding; longer rows: batched GEMMs)
_ROUTED_MAX_RANK = 64


def routed_available(x: torch.Tensor, a_stack: torch.Tensor | None = None) -> bool:
    """Whether `routed_lora` may add this call's per-row deltas: CUDA, a few tokens per row (decoding; longer rows
    go through per-row weights and batched GEMMs), no gradient (the kernels have no backward), Triton on — and,
    given the A stack, one 16/32-bit float dtype and ranks ≤ 64 (rows and slots are indexed in int64)."""
    if not (_HAS_TRITON and x.is_cuda and x.dim() == 3 and x.shape[1] <= ROUTED_MAX_TOKENS
            and not torch.is_grad_enabled() and not envflags.off("UNIPEFT_TRITON")
            and (_HAS_OP or not torch.compiler.is_compiling())):
        return False
    return a_stack is None or (x.dtype == a_stack.dtype and x.dtype in _DTYPES and a_stack.shape[1] <= _ROUTED_MAX_RANK)


def routed_lora(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
    """y + Δ, where token row (b, t) gets Δ = (x_bt·A_sᵀ)·B_sᵀ with s = slots[b] — a segmented-gather LoRA
    (BGMV-style) in two launches per projection, for decoding with a different adapter per row.
    y: (B, T, d_out); x: (B, T, d_in); a_stack: (n, r, d_in); b_stack: (n, d_out, r) with each adapter's scale
    folded in (a zero slot for rows without an adapter); slots: (B,) int64. Out of place (y may be a view a base
    returned; the traffic is the same). Under torch.compile this is the custom op `unipeft::routed_lora`."""
    _check_routed(y, x, a_stack, b_stack, slots)
    if torch.compiler.is_compiling():
        return torch.ops.unipeft.routed_lora(y, x, a_stack, b_stack, slots)
    return _routed(y, x, a_stack, b_stack, slots, _launch_routed)


def _check_routed(y, x, a_stack, b_stack, slots) -> None:
    (bsz, t, d_in), (n, r, _) = x.shape, a_stack.shape
    if (a_stack.shape[2] != d_in or b_stack.shape[0] != n or b_stack.shape[2] != r or y.shape[:2] != (bsz, t)
            or y.shape[2] != b_stack.shape[1] or slots.shape != (bsz,) or slots.dtype != torch.long
            or not (x.dtype == y.dtype == a_stack.dtype == b_stack.dtype)):
        raise ValueError(f"routed_lora: shapes/dtypes disagree: y {tuple(y.shape)} {y.dtype}, x {tuple(x.shape)} "
                         f"{x.dtype}, A stack {tuple(a_stack.shape)} {a_stack.dtype}, B stack "
                         f"{tuple(b_stack.shape)} {b_stack.dtype}, slots {tuple(slots.shape)} {slots.dtype}")


def _routed(y, x, a_stack, b_stack, slots, launch) -> torch.Tensor:
    """Two launches: the shrink split over input columns (rows × d_in/BK programs, each one A chunk: a single
    program looping over all of d_in is latency-bound, 5–10 µs per projection), its fp32 parts summed by the
    expand, which adds (x·Aᵀ)·Bᵀ to y (rows × d_out/BN programs)."""
    bsz, t, d_in = x.shape
    r, d_out = a_stack.shape[1], y.shape[2]
    x2, y2 = x.reshape(bsz * t, d_in), y.reshape(bsz * t, d_out)
    rows, br, ks = bsz * t, max(16, _next_power_of_2(r)), _cdiv(d_in, ROUTED_BK)
    part = torch.empty((rows, ks, br), device=x.device, dtype=torch.float32)
    out = torch.empty((bsz, t, d_out), device=y.device, dtype=y.dtype)
    out2 = out.view(rows, d_out)
    launch(_shrink_kernel, (rows, ks, 1), (x2, a_stack, slots, part, d_in, r, t, ks, *x2.stride(), *a_stack.stride(),
                                           ROUTED_BK, br), ("BK", "BR"))
    launch(_expand_kernel, (rows, _cdiv(d_out, ROUTED_BN), 1),
           (y2, b_stack, slots, part, out2, d_out, r, t, ks, *y2.stride(), *b_stack.stride(), *out2.stride(),
            ROUTED_BN, br, _next_power_of_2(ks)), ("BN", "BR", "KP"))
    return out


def _launch_routed(fn, grid: tuple[int, int, int], args: tuple, names: tuple[str, ...]) -> None:
    tensors = [v for v in args if isinstance(v, torch.Tensor)]
    ints = args[len(tensors):len(args) - len(names)]
    key = (fn.__name__, tensors[0].device, *(t.dtype for t in tensors), *(t.data_ptr() % 16 == 0 for t in tensors),
           *(_int_spec(v) for v in ints), *args[len(args) - len(names):], ROUTED_WARPS)
    _launch(_kernel(fn), grid, args, key, names, ROUTED_WARPS)


def _routed_op(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
    from torch.library import wrap_triton

    def launch(fn, grid, args, names):
        k = len(names)
        wrap_triton(_kernel(fn))[grid](*args[:-k], **dict(zip(names, args[-k:])), num_warps=ROUTED_WARPS)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        return _routed(y, x, a_stack, b_stack, slots, launch)


if _HAS_OP:
    torch.library.triton_op("unipeft::routed_lora", _routed_op, mutates_args=())
