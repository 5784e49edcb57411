"""Triton kernels for decoding with a different LoRA adapter per batch row (routed.py; optional extra
`unipeft[kernels]`); the batched-GEMM path in routed.py is the reference.

routed_lora:  each row's delta (x·A_sᵀ)·B_sᵀ read from the stacked adapters at the row's slot s — no per-row copies
  of the weights — as a shrink split over input columns (fp32 partial sums) and an expand that adds the delta to y.
  At 32 rows × 32 adapters (r = 16) on the H200: 3.8–4.5 µs per projection against 10.7–17.3 µs for bmm + baddbmm
  on gathered rows (GPU time from a CUDA graph, bench/routed_probe.py). Used under torch.compile (decoding steps
  compiled with CUDA graphs); eager decoding is host-bound and a Triton launch costs more host time than the two
  aten launches it replaces. Under torch.compile this is the custom op `unipeft::routed_lora`; launches share
  kernels.py's cache of compiled kernels. Tests run the kernels under `TRITON_INTERPRET=1` on CPU.
routed_linear: the frozen GEMM and the same two launches (writing the delta alone) side by side on two CUDA streams,
  for decoding steps replayed from CUDA graphs (routed.GRAPHED): the delta's kernels run beside the GEMM instead of
  after it, and the layer's add of the two fuses into the next compiled kernel. Per decoding layer of the benchmark
  model (bench/routed_probe.py --layer, routed_6_layer_streams.json): 98.4 µs one stream against 72.5 µs two
  (the seven base GEMMs alone: 54.1 µs). The opaque op `unipeft::routed_linear`.
"""

from __future__ import annotations

import contextlib

import torch

from . import envflags, overlap
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
                   BN: tl.constexpr, BR: tl.constexpr, KP: tl.constexpr, HAS_Y: tl.constexpr):
    """Token row m = pid0, output columns [pid1·BN, +BN): out = y + (Σ parts)·B_sᵀ (without y: the delta alone),
    B_s read from the stack."""
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
    delta = tl.sum(bt * xa[None, :], axis=1)
    if HAS_Y:
        delta += tl.load(y_ptr + m * syn + rn * syd, mask=mn, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * son + rn * sod, delta.to(out_ptr.dtype.element_ty), mask=mn)


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
    _check_shapes(tuple(y.shape), y.dtype, x, a_stack, b_stack, slots, "routed_lora")


def _check_shapes(y_shape: tuple, y_dtype: torch.dtype, x, a_stack, b_stack, slots, who: str) -> None:
    (bsz, t, d_in), (n, r, _) = x.shape, a_stack.shape
    if (a_stack.shape[2] != d_in or b_stack.shape[0] != n or b_stack.shape[2] != r or y_shape[:2] != (bsz, t)
            or y_shape[2] != b_stack.shape[1] or slots.shape != (bsz,) or slots.dtype != torch.long
            or not (x.dtype == y_dtype == a_stack.dtype == b_stack.dtype)):
        raise ValueError(f"{who}: shapes/dtypes disagree: y {y_shape} {y_dtype}, x {tuple(x.shape)} "
                         f"{x.dtype}, A stack {tuple(a_stack.shape)} {a_stack.dtype}, B stack "
                         f"{tuple(b_stack.shape)} {b_stack.dtype}, slots {tuple(slots.shape)} {slots.dtype}")


def _routed(y, x, a_stack, b_stack, slots, launch) -> torch.Tensor:
    """Two launches: the shrink split over input columns (rows × d_in/BK programs, each one A chunk: a single
    program looping over all of d_in is latency-bound, 5–10 µs per projection), its fp32 parts summed by the
    expand, which adds (x·Aᵀ)·Bᵀ to y (rows × d_out/BN programs)."""
    part, out = _buffers(x, a_stack, b_stack)
    _pair(y, x, a_stack, b_stack, slots, part, out, launch)
    return out


def _buffers(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrink's fp32 partial sums (rows, d_in/BK, BR) and the output (B, T, d_out), in x's dtype."""
    bsz, t, d_in = x.shape
    br = max(16, _next_power_of_2(a_stack.shape[1]))
    part = torch.empty((bsz * t, _cdiv(d_in, ROUTED_BK), br), device=x.device, dtype=torch.float32)
    return part, torch.empty((bsz, t, b_stack.shape[1]), device=x.device, dtype=x.dtype)


def _pair(y, x, a_stack, b_stack, slots, part, out, launch) -> None:
    """The two launches into `out`: y + Δ, or Δ alone when y is None."""
    bsz, t, d_in = x.shape
    rows, ks, br = part.shape
    r, d_out = a_stack.shape[1], out.shape[2]
    x2, out2 = x.reshape(rows, d_in), out.view(rows, d_out)
    y2 = out2 if y is None else y.reshape(rows, d_out)  # (not read without y)
    launch(_shrink_kernel, (rows, ks, 1), (x2, a_stack, slots, part, d_in, r, t, ks, *x2.stride(), *a_stack.stride(),
                                           ROUTED_BK, br), ("BK", "BR"))
    launch(_expand_kernel, (rows, _cdiv(d_out, ROUTED_BN), 1),
           (y2, b_stack, slots, part, out2, d_out, r, t, ks, *y2.stride(), *b_stack.stride(), *out2.stride(),
            ROUTED_BN, br, _next_power_of_2(ks), y is not None), ("BN", "BR", "KP", "HAS_Y"))


def routed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_stack: torch.Tensor,
                  b_stack: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x·Wᵀ + bias, Δ) with Δ as in `routed_lora` — the frozen GEMM and the per-row LoRA delta side by side: on
    the GPU the delta's two launches run on a second stream beside the GEMM (at 32 decoding rows cuBLAS's tiles
    leave most SMs idle, and the delta's kernels are latency-bound, so they cost little more than the GEMM alone;
    overlap.py's lane, whose fork and join a CUDA graph records as graph edges: a static-cache `generate`'s
    compiled decoding steps). The caller adds the two: under torch.compile that add fuses into whatever reads the
    projection's output next (RoPE, the cache write, the residual add, SwiGLU), so it costs no launch either.
    Under torch.compile this is the opaque custom op `unipeft::routed_linear`."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] != b_stack.shape[1] \
            or weight.dtype != x.dtype:
        raise ValueError(f"routed_linear: weight {tuple(weight.shape)} {weight.dtype} does not fit x "
                         f"{tuple(x.shape)} {x.dtype} and B stack {tuple(b_stack.shape)}")
    _check_shapes((*x.shape[:2], weight.shape[0]), weight.dtype, x, a_stack, b_stack, slots, "routed_linear")
    if torch.compiler.is_compiling():
        return torch.ops.unipeft.routed_linear(x, weight, bias, a_stack, b_stack, slots)
    return _routed_linear(x, weight, bias, a_stack, b_stack, slots)


def _routed_linear(x, weight, bias, a_stack, b_stack, slots) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.shape[-1])  # (a copy, where one is needed, made here on the main stream, not on the side's)
    x = (x2 if x2.stride(1) == 1 else x2.contiguous()).view(x.shape)
    lane = overlap._lane(x, capture=True) if _HAS_TRITON and x.is_cuda else None
    if lane is None:  # one stream, in order (off the GPU: the gathered-rows reference, or Triton's interpreter)
        y = _linear(x, weight, bias)
        if _HAS_TRITON and (x.is_cuda or envflags.raw("TRITON_INTERPRET") in ("1", b"1")):
            part, delta = _buffers(x, a_stack, b_stack)
            _pair(None, x, a_stack, b_stack, slots, part, delta, _launch_routed)
            return y, delta
        xa = torch.bmm(x, a_stack.index_select(0, slots).transpose(1, 2))
        return y, torch.bmm(xa, b_stack.index_select(0, slots).transpose(1, 2))
    main = overlap._main_stream(x.get_device())
    part, delta = _buffers(x, a_stack, b_stack)  # (on the main stream, before the fork: see overlap.py)
    lane.fork.record(main)
    lane.side.wait_event(lane.fork)
    torch.cuda.set_stream(lane.side)
    try:
        _pair(None, x, a_stack, b_stack, slots, part, delta, _launch_routed)
        lane.join.record(lane.side)
    finally:
        torch.cuda.set_stream(main)
    y = _linear(x, weight, bias)
    main.wait_event(lane.join)
    return y, delta  # (part is freed after the join: its block's next main-stream use comes after the side's)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ + bias as one 2-D GEMM on rows with unit stride, as a compiled graph issues it: F.linear on the 3-D
    input the compiler hands an opaque op (its strides are the producer's) chose a 4× slower cuBLAS kernel for one
    projection per layer on the H200 (bench/results/decode_5_streams_slow_gemm.json)."""
    d_in, d_out = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, d_in)
    if x2.stride(1) != 1 or (x2.stride(0) != d_in and x2.shape[0] > 1):
        x2 = x2.contiguous()
    y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    return y.view(*x.shape[:-1], d_out)


def _routed_linear_fake(x, weight, bias, a_stack, b_stack, slots):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


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

# An opaque op, not a triton_op: it switches streams, which a traced Triton op cannot. Registered through
# torch.library.Library like overlap.py's (less host time per call than the custom_op decorator).
_LIB = torch.library.Library("unipeft", "FRAGMENT")
_LIB.define("routed_linear(Tensor x, Tensor weight, Tensor? bias, Tensor a_stack, Tensor b_stack, Tensor slots) "
            "-> (Tensor, Tensor)")
_LIB.impl("routed_linear", _routed_linear, "CompositeExplicitAutograd")
torch.library.register_fake("unipeft::routed_linear", _routed_linear_fake, lib=_LIB)
