"""Triton kernels for the fused LoRA path (optional extra `unipeft[kernels]`); the PyTorch ops are the reference.

merged_weight:  W' = W + s·B·A in one pass over W.
  `torch.addmm(W, B, A)` with W as the addend copies W into the result first (cuBLAS reads C from the output
  buffer), then the rank-r GEMM reads and writes it again: four passes over a d_out × d_in tensor. The fused
  LoRA training step builds W' twice per projection (forward, and backward for dx), so on a 953M Llama that
  copy was 1.7 of the ~10 ms LoRA adds to a step. Here each program loads a W tile, its B rows and A columns,
  adds s·(B·A) accumulated in fp32 to W in fp32 and rounds once — the numbers addmm gives — in two passes.
  `out` may be W itself (a freshly dequantized 4-bit weight is updated in place). `merged_weights` builds a sibling
  group's W' (q/k/v, gate/up) in one launch into one buffer, each program picking its member: a build is a few
  µs of traffic, and per-member launches paid their ramp and tail each (3 × 2048²: 18.4 → 14.3 µs on the H200).

lora_grads:  the LoRA backward's two skinny products that read the output gradient g (N × d_out), for every member
  of a projection group at once: ga_i = s_i·g_i·B_i (N × r_i, stored transposed into one Σr × N block, as the
  grouped backward uses it) and dB_i = s_i·g_iᵀ·xa_i (d_out × r_i). cuBLAS runs them as two GEMMs, each a full
  pass over g at 40–65% of the memory bandwidth for these skinny shapes (r = 16), plus a split-K reduction and a
  scaling kernel each. Here one kernel (one launch for up to three members, each program picking its member by
  its column index: 43.2 → 36.8 µs for q/k/v) reads each (rows × columns) tile of g once and feeds both: its part of ga
  and of dB is added into one zeroed fp32 buffer with atomics, and the program that adds last into a block rounds it
  to g's dtype (no rounding kernel of its own). Per
  member on the H200, g read from DRAM (bench/skinny_probe.py): 23.5 → 16.6 µs at d_out 2048, 53.7 → 37.6 µs at
  5632 (zeroing and rounding included). Triton kernels for the other skinny products (x·Aᵀ, gaᵀ·x) did not beat
  cuBLAS there, so they stay GEMMs. The fp32 atomics make the low bits depend on timing, so under
  `torch.use_deterministic_algorithms(True)` the cuBLAS GEMMs run instead.

(The kernels of routed mixed-batch decoding are in routed_kernels.py; they share this module's launch machinery.)

Used on CUDA tensors when Triton is installed and `UNIPEFT_TRITON` is not "0". In eager mode they are launched by
launching.py (compiled kernels cached, called through their C function, from per-signature launch plans); under
torch.compile each kernel is a custom op (`unipeft::merged_weight(s)`,
`unipeft::lora_grads`, `unipeft::routed_lora`: torch.library.triton_op), which the compiler launches from its
generated code — no graph break. Tests run the kernels under `TRITON_INTERPRET=1` on CPU (fp32, fp16) against the
explicit formulas.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from . import envflags, launching
from .launching import _launch, _signature

_BUILT: dict[tuple, object] = {}  # (function, TRITON_INTERPRET setting) -> the jitted kernel (read when jitted)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp64 would be rounded to fp32 inside the kernel


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernel can build W' for this weight (CUDA, 16/32-bit floats, int32 offsets) — through
    `merged_weight` in eager mode, `compiled_merged_weight` under torch.compile."""
    return (_HAS_TRITON and t.is_cuda and t.dtype in _DTYPES and t.numel() < 2**31
            and not envflags.off("UNIPEFT_TRITON") and (_HAS_OP or not torch.compiler.is_compiling()))


tl = None  # triton.language, bound on first use: the interpreter patches it in this module's globals


def _merge_kernel(w0, w1, w2, b0, b1, b2, a0, a1, a2, o_ptr, M0, M1, M2, s0, s1, s2, oo0, oo1, oo2, P1, P2, N, R,
                  swm, swn, sbm, sbr, sar, san, som, son, as_ptr, ao0, ao1, ao2,
                  BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, NR: tl.constexpr, IEEE: tl.constexpr,
                  STACK_A: tl.constexpr):
    """One (BM × BN) tile of W'_i = W_i + s_i·B_i·A_i, for member i of up to three built in one launch (program rows
    [0, P1) are member 0's, [P1, P2) member 1's, the rest member 2's; operands by pointer, the strides shared;
    outputs into one tensor at element offsets oo_i — a compiler treats each tensor a kernel writes as mutated, and
    views of one buffer would come back as copies): B rows and A columns in rank chunks of BR, fp32 accumulation,
    one rounding. STACK_A: the programs of each member's first row block also copy the A tiles they load into
    as_ptr at element offsets ao_i (R × N row-major each) — the group's stacked A, which its x·Aᵀ and backward
    read, without a concatenation kernel of its own."""
    pid0 = tl.program_id(0)
    m1, m2 = pid0 >= P1, pid0 >= P2
    w_ptr = tl.where(m2, w2, tl.where(m1, w1, w0))
    b_ptr = tl.where(m2, b2, tl.where(m1, b1, b0))
    a_ptr = tl.where(m2, a2, tl.where(m1, a1, a0))
    out_ptr = o_ptr + tl.where(m2, oo2, tl.where(m1, oo1, oo0))
    M = tl.where(m2, M2, tl.where(m1, M1, M0))
    s = tl.where(m2, s2, tl.where(m1, s1, s0))
    row_block = pid0 - tl.where(m2, P2, tl.where(m1, P1, 0))
    rm = row_block * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in tl.static_range(NR):  # ranks in chunks of BR (NR = ceil(R / BR), usually 1)
        kr = i * BR + tl.arange(0, BR)
        bt = tl.load(b_ptr + rm[:, None] * sbm + kr[None, :] * sbr, mask=mm[:, None] & (kr[None, :] < R), other=0.0)
        at = tl.load(a_ptr + kr[:, None] * sar + rn[None, :] * san, mask=(kr[:, None] < R) & mn[None, :], other=0.0)
        if STACK_A:
            if row_block == 0:
                ao = tl.where(m2, ao2, tl.where(m1, ao1, ao0))
                tl.store(as_ptr + ao + kr[:, None] * N + rn[None, :], at, mask=(kr[:, None] < R) & mn[None, :])
        if IEEE:  # fp32 weights: no TF32 rounding of B·A
            acc += tl.dot(bt, at, input_precision="ieee")
        else:
            acc += tl.dot(bt, at)
    mask = mm[:, None] & mn[None, :]
    w = tl.load(w_ptr + rm[:, None] * swm + rn[None, :] * swn, mask=mask, other=0.0)
    out = w.to(tl.float32) + s * acc
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, out.to(out_ptr.dtype.element_ty), mask=mask)


def _kernel(fn=_merge_kernel):
    """The jitted kernel `fn`, per TRITON_INTERPRET setting (Triton reads it when a function is jitted). Called per
    launch: the setting is read through envflags (os.environ.get costs ~1 µs of host time). Binds `tl` in the
    module that defines fn (this one, or routed_kernels)."""
    key = (fn, envflags.raw("TRITON_INTERPRET"))
    built = _BUILT.get(key)
    if built is None:
        import triton
        import triton.language

        fn.__globals__["tl"] = triton.language
        built = _BUILT[key] = triton.jit(fn)
    return built


def merged_weight(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """W + s·B·A (W: d_out × d_in, B: d_out × r, A: r × d_in, one dtype) by the Triton kernel, into `out`
    (a new contiguous tensor when None; may be `w`)."""
    if out is None:
        plan = launching._PLANS.get(key := _merge_plan_key(tensors := [w, b, a], s))
        if plan is not None and plan.ready():
            out = torch.empty_like(w, memory_format=torch.contiguous_format)  # (no torch.device built per call)
            if plan(tensors + [out]):
                return out
        _check(w, b, a)
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
        grid, args = _grid_args([w], [b], [a], [s], out)
        _launch_merge(grid, args)
        launching._plan(key, _merge_key(args), _kernel(), grid, args, tensors + [out], _NAMES)
        return out
    _check(w, b, a)
    if out.shape != w.shape or out.dtype != w.dtype or out.device != w.device:
        raise ValueError(f"merged_weight: out must match W ({tuple(w.shape)} {w.dtype} {w.device}); got "
                         f"{tuple(out.shape)} {out.dtype} {out.device}")
    grid, args = _grid_args([w], [b], [a], [s], out)
    _launch(_kernel(), grid, args, _merge_key(args), _NAMES)
    return out


def merged_weights(ws: list[torch.Tensor], bs: list[torch.Tensor], as_: list[torch.Tensor],
                   scales: list[float]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """W_i + s_i·B_i·A_i for sibling projections (q/k/v, gate/up: one d_in, one rank, one dtype), built by one launch
    per three members into one (Σ d_out × d_in) buffer, returned as its row blocks — and the members' A stacked
    (Σr × d_in, = torch.cat(as_)), written by the same launch: the group reads it for x·[A_1; A_2; …]ᵀ and in
    backward, and a concatenation of its own was one more kernel per group (32 per step of the 953M model). One
    launch instead of one per member: each build is a few µs of memory traffic, and a launch's ramp and tail are a
    visible share of that (3 × 2048²: 18.4 → 14.3 µs on the H200, W read from DRAM). Under torch.compile this is
    the custom op `unipeft::merged_weights`."""
    if torch.compiler.is_compiling():
        buf, a_cat = torch.ops.unipeft.merged_weights(ws, bs, as_, scales)
    else:
        buf, a_cat = _planned_merges(ws, bs, as_, scales)
    return list(buf.split([w.shape[0] for w in ws])), a_cat


def _planned_merges(ws, bs, as_, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """`_merged_weights` in eager mode, through the call signature's launch plan once there is one (see `_Plan`)."""
    tensors = [*ws, *bs, *as_]
    key = ("merges", *scales, *_signature(tensors))
    plan = launching._PLANS.get(key)
    w = ws[0]
    if plan is not None and plan.ready():
        buf_shape, a_shape = plan.extra
        buf = torch.empty(buf_shape, device=w.device, dtype=w.dtype)
        a_cat = torch.empty(a_shape, device=w.device, dtype=w.dtype)
        if plan(tensors + [buf, a_cat]):
            return buf, a_cat
    seen = []
    buf, a_cat = _merged_weights(ws, bs, as_, scales, lambda grid, args: (_launch_merge(grid, args),
                                                                          seen.append((grid, args))))
    if len(seen) == 1:
        grid, args = seen[0]
        launching._plan(key, _merge_key(args), _kernel(), grid, args, tensors + [buf, a_cat], _NAMES,
                        extra=(buf.shape, a_cat.shape))
    return buf, a_cat


def groupable(ws: list[torch.Tensor], bs: list[torch.Tensor], as_: list[torch.Tensor]) -> bool:
    """Whether `merged_weights` can build these members together: one d_in, rank, dtype and stride pattern."""
    w0, b0, a0 = ws[0], bs[0], as_[0]
    return all(w.shape[1] == w0.shape[1] and w.stride() == w0.stride() and b.stride() == b0.stride()
               and a.shape == a0.shape and a.stride() == a0.stride() and w.dtype == w0.dtype
               for w, b, a in zip(ws, bs, as_))


def _merged_weights(ws, bs, as_, scales, launch) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' W' stacked by rows in one new buffer, and their A's in another, one launch per three members."""
    for w, b, a in zip(ws, bs, as_):
        _check(w, b, a)
    if not groupable(ws, bs, as_):
        raise ValueError("merged_weights: members differ in d_in, rank, dtype or strides; build them one by one")
    buf = torch.empty((sum(w.shape[0] for w in ws), ws[0].shape[1]), device=ws[0].device, dtype=ws[0].dtype)
    a_cat = torch.empty((sum(a.shape[0] for a in as_), ws[0].shape[1]), device=ws[0].device, dtype=ws[0].dtype)
    starts = [sum(w.shape[0] for w in ws[:i]) * buf.stride(0) for i in range(len(ws))]
    a_starts = [i * as_[0].numel() for i in range(len(ws))]
    for i in range(0, len(ws), _GROUP):
        part = slice(i, i + _GROUP)
        launch(*_grid_args(ws[part], bs[part], as_[part], scales[part], buf, starts[part], a_cat, a_starts[part]))
    return buf, a_cat


def _check(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> None:
    m, n = w.shape
    r = a.shape[0]
    if b.shape != (m, r) or a.shape != (r, n) or not (w.dtype == b.dtype == a.dtype):
        raise ValueError(f"merged_weight: shapes/dtypes disagree: W {tuple(w.shape)} {w.dtype}, "
                         f"B {tuple(b.shape)} {b.dtype}, A {tuple(a.shape)} {a.dtype}")


_GROUP = 3  #: members per launch of the merge and grads kernels (a larger group launches in chunks)


def _padded(values: list) -> list:
    """Per-member kernel arguments for exactly _GROUP members (the unused slots repeat member 0's; never read)."""
    return list(values) + [values[0]] * (_GROUP - len(values))


def _grid_args(ws, bs, as_, scales, out, starts=(0,), a_out=None, a_starts=(0,)) -> tuple[tuple[int, int, int], tuple]:
    """The launch grid and the kernel's arguments for up to three members, written into `out` from element offsets
    `starts`, their A's copied into `a_out` (when given) from `a_starts` (the last six arguments are the kernel's
    constexprs, in `_NAMES` order). Program rows are split among the members by their row-block counts (P1, P2)."""
    w, b, a = ws[0], bs[0], as_[0]
    n, r = w.shape[1], a.shape[0]
    bm, bn = 32, 128  # (bench/skinny_probe.py: W read from DRAM, 3–5% faster than 64 × 128 at the harness shapes)
    br = max(16, min(64, _next_power_of_2(r)))
    blocks = [_cdiv(x.shape[0], bm) for x in ws]
    p1 = blocks[0] if len(ws) > 1 else 2**30
    p2 = blocks[0] + blocks[1] if len(ws) > 2 else 2**30
    args = (*_padded(ws), *_padded(bs), *_padded(as_), out, *_padded([x.shape[0] for x in ws]),
            *_padded([float(s) for s in scales]), *_padded(list(starts)), p1, p2, n, r, *w.stride(), *b.stride(),
            *a.stride(), *out.stride(), out if a_out is None else a_out, *_padded(list(a_starts)),
            bm, bn, br, _cdiv(r, br), w.dtype == torch.float32, a_out is not None)
    return (sum(blocks), _cdiv(n, bn), 1), args


# triton.cdiv and triton.next_power_of_2 are the same arithmetic, but called from Python they go through Triton's
# constexpr-function wrapper: ~4 µs each, ~15 µs of host time per launch here (measured) — more than the rest of
# the launch path together. Plain integer arithmetic gives the same numbers (tests compare them).
def _cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


def _next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1; 0 for 0, like Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def compiled_merged_weight(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float, tag: int = 0) -> torch.Tensor:
    """W + s·B·A as the custom op `unipeft::merged_weight` (torch.library.triton_op), which is what a torch.compile
    graph calls: the compiler launches the kernel from its generated code, without a graph break and without the
    Python dispatch an opaque custom op pays per call. `tag` only tells calls apart: a training step builds W'
    in forward and again in backward, and the compiler would merge two identical calls into one and keep W'
    alive in between (a second copy of every adapted weight); the backward passes tag=1."""
    _check(w, b, a)
    return torch.ops.unipeft.merged_weight(w, b, a, s, tag)


def _merged_weight_op(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float, tag: int) -> torch.Tensor:
    out = torch.empty(w.shape, device=w.device, dtype=w.dtype)
    with torch.cuda.device(w.device) if w.is_cuda else contextlib.nullcontext():  # (a model split across GPUs)
        _launch_merge_traced(*_grid_args([w], [b], [a], [s], out))
    return out


def _merged_weights_op(ws: list[torch.Tensor], bs: list[torch.Tensor], as_: list[torch.Tensor],
                       scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.cuda.device(ws[0].device) if ws[0].is_cuda else contextlib.nullcontext():
        return _merged_weights(ws, bs, as_, scales, _launch_merge_traced)


def _launch_merge_traced(grid, args) -> None:
    from torch.library import wrap_triton

    k = len(_NAMES)
    wrap_triton(_kernel())[grid](*args[:-k], **dict(zip(_NAMES, args[-k:])), num_warps=4)


def _launch_merge(grid, args) -> None:
    _launch(_kernel(), grid, args, _merge_key(args), _NAMES)


_HAS_OP = _HAS_TRITON and hasattr(torch.library, "triton_op")  # (torch >= 2.6)
if _HAS_OP:  # registered at import: registering inside a compiled region would break its graph
    torch.library.triton_op("unipeft::merged_weight", _merged_weight_op, mutates_args=())
    torch.library.triton_op("unipeft::merged_weights", _merged_weights_op, mutates_args=())


_NAMES = ("BM", "BN", "BR", "NR", "IEEE", "STACK_A")


def _merge_key(args: tuple) -> tuple:
    """What Triton specializes the merge kernel on: every int argument's value, every pointer's 16-byte alignment,
    the dtype and the device (current = the tensors', see merged_weight); outputs share W's dtype."""
    tensors = args[:10]
    return ("merge", tensors[0].device, tensors[0].dtype, *(t.data_ptr() % 16 == 0 for t in tensors), *args[10:13],
            *(_int_spec(v) for v in args[16:19]), *args[19:31], args[31].data_ptr() % 16 == 0,
            *(_int_spec(v) for v in args[32:35]), *args[35:])


def _grads_kernel(g0, g1, g2, b0, b1, b2, x0, x1, x2, out_ptr, N, D0, D1, D2, R0, R1, R2, s0, s1, s2,
                  ga0, ga1, ga2, db0, db1, db2, sgn0, sgn1, sgn2, sgd0, sgd1, sgd2, sbd0, sbd1, sbd2,
                  sbr0, sbr1, sbr2, sxn0, sxn1, sxn2, sxr0, sxr1, sxr2, C1, C2, dst_ptr, cn0, cn1, cn2, NB,
                  BN: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, ND: tl.constexpr, IEEE: tl.constexpr,
                  FINISH: tl.constexpr):
    """Rows [pid0·BN, +BN) × columns [c·ND·BD, +ND·BD) of member i's g_i (N × D_i), for up to three members in one
    launch (program columns [0, C1) are member 0's, [C1, C2) member 1's, the rest member 2's, c counted from
    there): adds this tile's part of s_i·g_i·B_i to ga (fp32 at out + ga_i, stored transposed: element (n, j) at
    j·N + n) and of s_i·g_iᵀ·xa_i to dB_i (fp32 at out + db_i, D_i × R_i row-major), both with atomics; each g tile
    is loaded once for both products.

    FINISH: the program that adds last into a block rounds it into dst (g's dtype, at the same offsets), so no
    rounding kernel follows. Arrivals are counted per block in fp32 counters at out + cn_i (exact far beyond these
    counts): NB per member for its gaᵀ row blocks (each takes one add from each of the member's column programs),
    then one per column program for its dB rows (one add from each of the NB row programs). Every thread's atomics
    are ordered before the count by a barrier and the count's release; the last arriver's acquire orders its reads
    (from L2, where the atomics were done) after every add."""
    pid1 = tl.program_id(1)
    m1, m2 = pid1 >= C1, pid1 >= C2
    g_ptr = tl.where(m2, g2, tl.where(m1, g1, g0))
    b_ptr = tl.where(m2, b2, tl.where(m1, b1, b0))
    xa_ptr = tl.where(m2, x2, tl.where(m1, x1, x0))
    D = tl.where(m2, D2, tl.where(m1, D1, D0))
    R = tl.where(m2, R2, tl.where(m1, R1, R0))
    s = tl.where(m2, s2, tl.where(m1, s1, s0))
    ga_off = tl.where(m2, ga2, tl.where(m1, ga1, ga0))
    db_off = tl.where(m2, db2, tl.where(m1, db1, db0))
    sgn = tl.where(m2, sgn2, tl.where(m1, sgn1, sgn0))
    sgd = tl.where(m2, sgd2, tl.where(m1, sgd1, sgd0))
    sbd = tl.where(m2, sbd2, tl.where(m1, sbd1, sbd0))
    sbr = tl.where(m2, sbr2, tl.where(m1, sbr1, sbr0))
    sxn = tl.where(m2, sxn2, tl.where(m1, sxn1, sxn0))
    sxr = tl.where(m2, sxr2, tl.where(m1, sxr1, sxr0))
    d_start = (pid1 - tl.where(m2, C2, tl.where(m1, C1, 0))) * (ND * BD)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    mn, mr = rn < N, rr < R
    xa = tl.load(xa_ptr + rn[:, None] * sxn + rr[None, :] * sxr, mask=mn[:, None] & mr[None, :], other=0.0)
    acc = tl.zeros((BN, BR), dtype=tl.float32)
    for i in range(ND):  # (a constexpr trip count: Triton's interpreter cannot loop to a runtime bound)
        rd = d_start + i * BD + tl.arange(0, BD)
        md = rd < D
        g = tl.load(g_ptr + rn[:, None] * sgn + rd[None, :] * sgd, mask=mn[:, None] & md[None, :], other=0.0)
        b = tl.load(b_ptr + rd[:, None] * sbd + rr[None, :] * sbr, mask=md[:, None] & mr[None, :], other=0.0)
        if IEEE:  # fp32: no TF32 rounding
            acc += tl.dot(g, b, input_precision="ieee")
            part = tl.dot(tl.trans(g), xa, input_precision="ieee")
        else:
            acc += tl.dot(g, b)
            part = tl.dot(tl.trans(g), xa)
        tl.atomic_add(out_ptr + db_off + rd[:, None] * R + rr[None, :], part * s, mask=md[:, None] & mr[None, :],
                      sem="relaxed")
    tl.atomic_add(out_ptr + ga_off + rr[None, :] * N + rn[:, None], acc * s, mask=mn[:, None] & mr[None, :],
                  sem="relaxed")
    if FINISH:
        tl.debug_barrier()  # every thread's adds before this program's counts
        cnt = tl.where(m2, cn2, tl.where(m1, cn1, cn0))
        np1 = tl.num_programs(1)
        first = tl.where(m2, C2, tl.where(m1, C1, 0))
        mine = tl.where(m2, np1 - C2, tl.where(m1, tl.minimum(C2, np1) - C1, tl.minimum(C1, np1)))
        if tl.atomic_add(out_ptr + cnt + NB + pid1 - first, 1.0, sem="acq_rel") == NB - 1:
            for i in range(ND):  # the last row program to add into these dB rows rounds them
                rd = d_start + i * BD + tl.arange(0, BD)
                at = db_off + rd[:, None] * R + rr[None, :]
                msk = (rd[:, None] < D) & mr[None, :]
                v = tl.load(out_ptr + at, mask=msk, other=0.0, cache_modifier=".cg")
                tl.store(dst_ptr + at, v.to(dst_ptr.dtype.element_ty), mask=msk)
        if tl.atomic_add(out_ptr + cnt + tl.program_id(0), 1.0, sem="acq_rel") == mine - 1:
            at = ga_off + rr[None, :] * N + rn[:, None]  # the last column program for these gaᵀ columns
            msk = mn[:, None] & mr[None, :]
            v = tl.load(out_ptr + at, mask=msk, other=0.0, cache_modifier=".cg")
            tl.store(dst_ptr + at, v.to(dst_ptr.dtype.element_ty), mask=msk)


_GRAD_NAMES = ("BN", "BD", "BR", "ND", "IEEE", "FINISH")
_GRAD_BN, _GRAD_BD, _GRAD_COLS = 128, 64, 512  # rows per program, columns per step, columns per program (measured)
_GRAD_WARPS, _GRAD_STAGES = 4, 3
_GRAD_MAX_RANK = 64  # larger ranks: the cuBLAS GEMMs (the kernel keeps a rows × rank fp32 block in registers)


def grads_available(tensors, ranks) -> bool:
    """Whether `lora_grads` can run for these gradients and xa's (CUDA, 16/32-bit floats, every offset the kernel
    computes within int32, ranks ≤ 64) — and may: off under `torch.use_deterministic_algorithms(True)` (fp32
    atomics) and with `UNIPEFT_TRITON=0`."""
    if not _HAS_TRITON or max(ranks) > _GRAD_MAX_RANK or torch.are_deterministic_algorithms_enabled() \
            or envflags.off("UNIPEFT_TRITON") or (torch.compiler.is_compiling() and not _HAS_OP):
        return False
    return all(t.is_cuda and t.dtype in _DTYPES and _extent(t) < 2**31 for t in tensors)


def _extent(t: torch.Tensor) -> int:
    """The largest element offset a kernel indexing t by its strides computes (int32 arithmetic must hold it)."""
    return sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0) + 1


def lora_grads(gs: list[torch.Tensor], bs: list[torch.Tensor], xas: list[torch.Tensor], rows: list[int],
               scales: list[float], total_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The skinny products of the LoRA backward for the members with a gradient (see the module docstring), in g's
    dtype: gaᵀ (total_rank × N; member i's s_i·(g_i·B_i)ᵀ in rows [rows[i], +r_i), zero rows for members not
    listed), and the listed members' dB_i = s_i·g_iᵀ·xa_i (d_i × r_i) one after another in one flat tensor.
    Both are views of one buffer, rounded by the kernel itself (see `_lora_grads`).
    g_i: N × d_i, B_i: d_i × r_i, xa_i: N × r_i (any strides), all of one dtype. Under torch.compile this is the
    custom op `unipeft::lora_grads` (which returns the buffer: a custom op's outputs may not alias each other)."""
    if torch.compiler.is_compiling():
        flat = torch.ops.unipeft.lora_grads(gs, bs, xas, rows, scales, total_rank)
    else:
        flat = _planned_grads(gs, bs, xas, rows, scales, total_rank)
    n_db = sum(g.shape[1] * b.shape[1] for g, b in zip(gs, bs))
    return flat[n_db:].view(total_rank, gs[0].shape[0]), flat[:n_db]


def lora_grads_buffer(gs: list[torch.Tensor], bs: list[torch.Tensor], xas: list[torch.Tensor], rows: list[int],
                      scales: list[float], total_rank: int,
                      buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`lora_grads`'s one buffer — the dB's, then gaᵀ — for a caller that splits it itself (overlap.py); eager
    only (a compiled backward reaches it inside the opaque op `unipeft::lora_backward`). buffers: the two from
    `grads_buffers`, made by the caller (on another stream: see there), zeroed here; None to allocate them here."""
    return _planned_grads(gs, bs, xas, rows, scales, total_rank, buffers)


def grads_buffers(gs: list[torch.Tensor], bs: list[torch.Tensor], total_rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 sums (with their arrival counters) and the result buffer of a grads call, uninitialized — for a
    caller that allocates on one stream and launches on another (overlap.py: a block the caching allocator hands
    out on a side stream is cached for that stream alone, where the main stream cannot reuse it). For fp32 g both
    are one tensor."""
    end, size, mode = _grads_layout(gs, bs, total_rank)[:3]
    out = torch.empty(end, device=gs[0].device, dtype=torch.float32)
    return out, (out if mode == 0 else torch.empty(size, device=gs[0].device, dtype=gs[0].dtype))


def _grad_stages(dtype: torch.dtype, br: int) -> int:
    """Pipeline depth: three stages of the g and B tiles where they fit in 64 KiB of shared memory (bf16/fp16 at
    r ≤ 32: 54 KiB), fewer for fp32 or wide ranks, so the kernel builds on GPUs with less shared memory than Hopper."""
    size = 4 if dtype == torch.float32 else 2
    per_stage = (_GRAD_BN * _GRAD_BD + _GRAD_BD * br) * size
    return max(1, min(_GRAD_STAGES, 64 * 1024 // per_stage))


def _grads_layout(gs, bs, total_rank: int) -> tuple[int, int, int, list[int]]:
    """(end, size, mode, counters) of a grads call: the fp32 buffer's length (the sums, then for 16-bit g the
    arrival counters: per member, its row blocks, then at most one per BD columns — its column programs), the
    result's length (every dB, then gaᵀ), how the result is made (0: it is the fp32 buffer; 1: uninitialized — every
    element is written by a last arriver; 2: zeroed — the gaᵀ rows of members not listed stay zero) and each
    member's counters offset."""
    n = gs[0].shape[0]
    size = sum(g.shape[1] * b.shape[1] for g, b in zip(gs, bs)) + total_rank * n
    finish = gs[0].dtype != torch.float32
    nb = _cdiv(n, _GRAD_BN)
    counters, end = [], size
    for g in gs:
        counters.append(end)
        end += nb + _cdiv(g.shape[1], _GRAD_BD) if finish else 0
    mode = 0 if not finish else 1 if sum(b.shape[1] for b in bs) == total_rank else 2
    return end, size, mode, counters


def _grads_out(end: int, size: int, mode: int, g: torch.Tensor, buffers) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 sums and the result buffer of a grads call (see `_grads_layout`), zeroed as the kernel needs them on
    the current stream: a caller's `grads_buffers`, or new ones."""
    if buffers is not None:
        out, dst = buffers
        out.zero_()
        if mode == 2:
            dst.zero_()
        return out, dst
    out = torch.zeros(end, device=g.device, dtype=torch.float32)
    return out, (out if mode == 0 else _new_output(size, g.dtype, g.device) if mode == 1 else
                 torch.zeros(size, device=g.device, dtype=g.dtype))


def _lora_grads(gs, bs, xas, rows, scales, total_rank: int, launch, buffers=None) -> torch.Tensor:
    """One launch per three members adding into one zeroed fp32 buffer — every dB, then gaᵀ — and, for 16-bit g,
    rounding it into a buffer of g's dtype inside the same launch (each block by the program that adds into it last:
    see `_grads_kernel`), so a grads call is one kernel after the zeroing. (Rounding in a kernel of its own cost 64
    kernels per step of the 953M model, and rounding gaᵀ and the dB's separately twice that: a foreach copy of the
    two was not fused on torch 2.11.) The result is that one buffer, so a dB kept as a parameter's .grad keeps gaᵀ's
    Σr × N elements alive with it until the gradients are freed: on a Llama layer at r = 16, under 1% of the
    activations the layer saves for backward (29 MB for the 953M benchmark model at 8 × 1024 tokens).
    buffers: `grads_buffers`'s two, or None to allocate them."""
    n = gs[0].shape[0]
    db_offs, db_off = [], 0
    for g, b, xa, row in zip(gs, bs, xas, rows):
        d, r = b.shape
        if g.shape != (n, d) or xa.shape != (n, r) or not (g.dtype == b.dtype == xa.dtype) or row + r > total_rank:
            raise ValueError(f"lora_grads: shapes/dtypes disagree: g {tuple(g.shape)} {g.dtype}, B {tuple(b.shape)} "
                             f"{b.dtype}, xa {tuple(xa.shape)} {xa.dtype}, rows {row}..{row + r} of {total_rank}")
        db_offs.append(db_off)
        db_off += d * r
    end, size, mode, counters = _grads_layout(gs, bs, total_rank)
    out, dst = _grads_out(end, size, mode, gs[0], buffers)
    nb = _cdiv(n, _GRAD_BN)
    for i in range(0, len(gs), _GROUP):
        part = slice(i, i + _GROUP)
        launch(*_grads_grid_args(gs[part], bs[part], xas[part], rows[part], scales[part], db_offs[part], db_off,
                                 out, dst, counters[part], nb, mode != 0))
    return dst


def _merge_plan_key(tensors: list[torch.Tensor], s: float) -> tuple:  # (overlap.py reads plans by these too)
    return ("merge1", float(s), *_signature(tensors))


def _grads_plan_key(tensors: list[torch.Tensor], rows, scales, total_rank: int) -> tuple:
    return ("grads", *rows, *scales, total_rank, *_signature(tensors))


def _planned_grads(gs, bs, xas, rows, scales, total_rank: int, buffers=None) -> torch.Tensor:
    """`_lora_grads` in eager mode, through the call signature's launch plan once there is one (see `_Plan`)."""
    plan = launching._PLANS.get(key := _grads_plan_key(tensors := [*gs, *bs, *xas], rows, scales, total_rank))
    g = gs[0]
    if plan is not None and plan.ready():
        out, dst = _grads_out(*plan.extra, g, buffers)
        if plan(tensors + [out, dst]):
            return dst
    seen = []
    dst = _lora_grads(gs, bs, xas, rows, scales, total_rank, lambda grid, args: (_launch_grads(grid, args),
                                                                                 seen.append((grid, args))), buffers)
    if len(seen) == 1:
        grid, args = seen[0]
        out = args[9]
        mode = 0 if dst is out else 1 if sum(b.shape[1] for b in bs) == total_rank else 2
        launching._plan(key, _grads_key(args), _kernel(_grads_kernel), grid, args, tensors + [out, dst],
                        _GRAD_NAMES, _GRAD_WARPS, _grad_stages(g.dtype, args[-4]),
                        extra=(out.numel(), dst.numel(), mode))
    return dst


def _new_output(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The uninitialized result buffer the grads kernel rounds into (a function of its own so that tests can fill
    it with NaN: an element no program writes would then show)."""
    return torch.empty(size, device=device, dtype=dtype)


def _grads_grid_args(gs, bs, xas, rows, scales, db_offs, ga_start: int, out, dst=None, counters=(0,), nb: int = 0,
                     finish: bool = False) -> tuple[tuple[int, int, int], tuple]:
    """Grid and arguments for up to three members (the last six are the constexprs, in `_GRAD_NAMES` order); gaᵀ
    starts at element `ga_start` of `out`; with `finish`, the kernel rounds into `dst`, counting arrivals at the
    members' `counters` offsets in `out` (`nb` row blocks). A program spans ND·BD columns, the same for every
    member of the launch (from the narrowest). Built in one pass over the members: this runs per launch, and eager
    steps on a fast GPU are close to host-bound."""
    n = gs[0].shape[0]
    per = [(g, b, xa, g.shape[1], b.shape[1], float(s), ga_start + row * n, off, *g.stride(), *b.stride(),
            *xa.stride(), cnt)
           for g, b, xa, row, s, off, cnt in zip(gs, bs, xas, rows, scales, db_offs, _padded(list(counters)))]
    widths, ranks = [m[3] for m in per], [m[4] for m in per]
    per += [per[0]] * (_GROUP - len(per))  # (unused slots repeat member 0's; never read)
    cols = list(zip(*per))  # column j: the j-th field of the three members
    nd = _cdiv(min(min(widths), _GRAD_COLS), _GRAD_BD)
    blocks = [_cdiv(d, nd * _GRAD_BD) for d in widths]
    c1 = blocks[0] if len(widths) > 1 else 2**30
    c2 = blocks[0] + blocks[1] if len(widths) > 2 else 2**30
    args = (*cols[0], *cols[1], *cols[2], out, n, *cols[3], *cols[4], *cols[5], *cols[6], *cols[7], *cols[8],
            *cols[9], *cols[10], *cols[11], *cols[12], *cols[13], c1, c2, out if dst is None else dst, *cols[14], nb,
            _GRAD_BN, _GRAD_BD, max(16, _next_power_of_2(max(ranks))), nd, gs[0].dtype == torch.float32, finish)
    return (_cdiv(n, _GRAD_BN), sum(blocks), 1), args


def _int_spec(v: int) -> tuple[bool, bool, bool]:
    """What Triton specializes an int argument on: == 1, divisible by 16, fits in int32."""
    return v == 1, v % 16 == 0, -2**31 <= v < 2**31


def _launch_grads(grid: tuple[int, int, int], args: tuple) -> None:
    """Launch through the compiled-kernel cache (see `_grads_key`)."""
    g = args[0]
    _launch(_kernel(_grads_kernel), grid, args, _grads_key(args), _GRAD_NAMES, _GRAD_WARPS,
            _grad_stages(g.dtype, args[-4]))


def _grads_key(args: tuple) -> tuple:
    """The cache key of a grads launch: what Triton specializes on for N and the gaᵀ / dB offsets, which change with
    every batch length (raw values would miss the cache and grow it per length), and the raw values of the widths,
    ranks and strides, which a layer keeps (more specific than Triton's own key, so never wrong; half the host time
    of specializing every int)."""
    g = args[0]
    return ("grads", g.device, g.dtype, *(t.data_ptr() % 16 == 0 for t in args[:10]), _int_spec(args[10]),
            *args[11:17], *(_int_spec(v) for v in args[20:26]), *args[26:46], args[46].data_ptr() % 16 == 0,
            args[46].dtype, *(_int_spec(v) for v in args[47:51]), *args[51:])


def _lora_grads_op(gs: list[torch.Tensor], bs: list[torch.Tensor], xas: list[torch.Tensor], rows: list[int],
                   scales: list[float], total_rank: int) -> torch.Tensor:
    from torch.library import wrap_triton

    k = len(_GRAD_NAMES)

    def launch(grid, args):
        wrap_triton(_kernel(_grads_kernel))[grid](*args[:-k], **dict(zip(_GRAD_NAMES, args[-k:])),
                                                  num_warps=_GRAD_WARPS, num_stages=_grad_stages(args[0].dtype,
                                                                                                 args[-4]))
    with torch.cuda.device(gs[0].device) if gs[0].is_cuda else contextlib.nullcontext():
        return _lora_grads(gs, bs, xas, rows, scales, total_rank, launch)


if _HAS_OP:
    torch.library.triton_op("unipeft::lora_grads", _lora_grads_op, mutates_args=())
