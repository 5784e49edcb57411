"""Triton kernels for the fused LoRA path (optional extra `unipeft[kernels]`); the PyTorch ops are the reference.

merged_weight:  W' = W + s·B·A in one pass over W.
  `torch.addmm(W, B, A)` with W as the addend copies W into the result first (cuBLAS reads C from the output
  buffer), then the rank-r GEMM reads and writes it again: four passes over a d_out × d_in tensor. The fused
  LoRA training step builds W' twice per projection (forward, and backward for dx), so on a 953M Llama that
  copy was 1.7 of the ~10 ms LoRA adds to a step. Here each program loads a W tile, its B rows and A columns,
  adds s·(B·A) accumulated in fp32 to W in fp32 and rounds once — the numbers addmm gives — in two passes.
  `out` may be W itself (a freshly dequantized 4-bit weight is updated in place).

Used on CUDA tensors when Triton is installed and `UNIPEFT_TRITON` is not "0". In eager mode launches go through
a cache of compiled kernels (`_launch`); under torch.compile the same kernel is the custom op
`unipeft::merged_weight` (torch.library.triton_op), which the compiler launches from its generated code — no graph
break. Tests run the kernel under `TRITON_INTERPRET=1` on CPU (fp32, fp16) against the explicit formula.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from . import envflags

_BUILT: dict[str | None, object] = {}  # the jitted kernel per TRITON_INTERPRET setting (read when it is jitted)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp64 would be rounded to fp32 inside the kernel


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernel can build W' for this weight (CUDA, 16/32-bit floats, int32 offsets) — through
    `merged_weight` in eager mode, `compiled_merged_weight` under torch.compile."""
    return (_HAS_TRITON and t.is_cuda and t.dtype in _DTYPES and t.numel() < 2**31
            and not envflags.off("UNIPEFT_TRITON") and (_HAS_OP or not torch.compiler.is_compiling()))


tl = None  # triton.language, bound on first use: the interpreter patches it in this module's globals


def _merge_kernel(w_ptr, b_ptr, a_ptr, out_ptr, M, N, R, s, swm, swn, sbm, sbr, sar, san, som, son,
                  BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, NR: tl.constexpr, IEEE: tl.constexpr):
    """One (BM × BN) tile of W' = W + s·B·A: B rows and A columns in rank chunks of BR, fp32 accumulation."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in tl.static_range(NR):  # ranks in chunks of BR (NR = ceil(R / BR), usually 1)
        kr = i * BR + tl.arange(0, BR)
        bt = tl.load(b_ptr + rm[:, None] * sbm + kr[None, :] * sbr, mask=mm[:, None] & (kr[None, :] < R), other=0.0)
        at = tl.load(a_ptr + kr[:, None] * sar + rn[None, :] * san, mask=(kr[:, None] < R) & mn[None, :], other=0.0)
        if IEEE:  # fp32 weights: no TF32 rounding of B·A
            acc += tl.dot(bt, at, input_precision="ieee")
        else:
            acc += tl.dot(bt, at)
    mask = mm[:, None] & mn[None, :]
    w = tl.load(w_ptr + rm[:, None] * swm + rn[None, :] * swn, mask=mask, other=0.0)
    out = w.to(tl.float32) + s * acc
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, out.to(out_ptr.dtype.element_ty), mask=mask)


def _kernel():
    """The jitted kernel, per TRITON_INTERPRET setting (Triton reads it when a function is jitted). Called per
    launch: the setting is read through envflags (os.environ.get costs ~1 µs of host time)."""
    global tl
    key = envflags.raw("TRITON_INTERPRET")
    if key not in _BUILT:
        import triton
        import triton.language

        tl = triton.language
        _BUILT[key] = triton.jit(_merge_kernel)
    return _BUILT[key]


def merged_weight(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """W + s·B·A (W: d_out × d_in, B: d_out × r, A: r × d_in, one dtype) by the Triton kernel, into `out`
    (a new contiguous tensor when None; may be `w`)."""
    _check(w, b, a)
    if out is None:
        out = torch.empty_like(w, memory_format=torch.contiguous_format)  # (no torch.device built per call)
    elif out.shape != w.shape or out.dtype != w.dtype or out.device != w.device:
        raise ValueError(f"merged_weight: out must match W ({tuple(w.shape)} {w.dtype} {w.device}); got "
                         f"{tuple(out.shape)} {out.dtype} {out.device}")
    grid, args = _grid_args(w, b, a, s, out)
    if w.is_cuda and w.device.index != torch.cuda.current_device():
        with torch.cuda.device(w.device):  # Triton launches on the current device and its stream
            _launch(_kernel(), grid, args)
    else:
        _launch(_kernel(), grid, args)
    return out


def _check(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> None:
    m, n = w.shape
    r = a.shape[0]
    if b.shape != (m, r) or a.shape != (r, n) or not (w.dtype == b.dtype == a.dtype):
        raise ValueError(f"merged_weight: shapes/dtypes disagree: W {tuple(w.shape)} {w.dtype}, "
                         f"B {tuple(b.shape)} {b.dtype}, A {tuple(a.shape)} {a.dtype}")


def _grid_args(w, b, a, s: float, out) -> tuple[tuple[int, int, int], tuple]:
    """The launch grid and the kernel's arguments (the last five are its constexprs, in `_NAMES` order)."""
    (m, n), r = w.shape, a.shape[0]
    bm, bn = 64, 128
    br = max(16, min(64, _next_power_of_2(r)))
    args = (w, b, a, out, m, n, r, float(s), *w.stride(), *b.stride(), *a.stride(), *out.stride(),
            bm, bn, br, _cdiv(r, br), w.dtype == torch.float32)
    return (_cdiv(m, bm), _cdiv(n, bn), 1), args


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
    from torch.library import wrap_triton

    out = torch.empty(w.shape, device=w.device, dtype=w.dtype)
    grid, args = _grid_args(w, b, a, s, out)
    with torch.cuda.device(w.device) if w.is_cuda else contextlib.nullcontext():  # (a model split across GPUs)
        wrap_triton(_kernel())[grid](*args[:-5], **dict(zip(_NAMES, args[-5:])), num_warps=4)
    return out


_HAS_OP = _HAS_TRITON and hasattr(torch.library, "triton_op")  # (torch >= 2.6)
if _HAS_OP:  # registered at import: registering inside a compiled region would break its graph
    torch.library.triton_op("unipeft::merged_weight", _merged_weight_op, mutates_args=())


_COMPILED: dict[tuple, object] = {}  # launch key -> Triton's compiled kernel (see _launch)
_DIRECT = [True]  # whether compiled kernels are launched directly (False once their launcher API surprised us)
_NAMES = ("BM", "BN", "BR", "NR", "IEEE")


def _launch(kernel, grid: tuple[int, int, int], args: tuple) -> None:
    """Launch with the compiled kernel looked up by every int argument's value, every pointer's 16-byte alignment,
    the dtype and the device (current = the tensors', see merged_weight) — everything Triton specializes this
    kernel's arguments on, `out` sharing W's dtype — instead of through `JITFunction.run`, whose
    argument binding and cache-key hashing cost tens of µs of host time per call (a LoRA step launches this
    ~150 times, and eager steps on a fast GPU are close to host-bound). The first launch per key goes through
    Triton's own path and compiles; if the compiled kernel's launcher API differs (another Triton version), every
    launch takes Triton's own path."""
    tensors = args[:4]
    key = (tensors[0].device, tensors[0].dtype, *(t.data_ptr() % 16 == 0 for t in tensors), *args[4:7], *args[8:])
    compiled = _COMPILED.get(key)
    if compiled is not None:
        try:
            compiled[grid](*args)
            return
        except (TypeError, IndexError, AttributeError):  # a launcher API we do not know: Triton's own path from now
            _COMPILED.clear()
            _DIRECT[0] = False
    params = dict(zip(_NAMES, args[-5:]))
    compiled = kernel[grid](*args[:-5], **params, num_warps=4)
    if _DIRECT[0] and os.environ.get("TRITON_INTERPRET") != "1" and hasattr(compiled, "__getitem__"):
        _COMPILED[key] = compiled
