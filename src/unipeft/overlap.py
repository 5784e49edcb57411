"""A compiled LoRA backward with its skinny products on a second CUDA stream, beside the frozen dx GEMMs.

What LoRA adds to a training step's backward is memory-bound — x·Aᵀ (which a compiled graph recomputes there),
the grads kernel's pass over g (gaᵀ and dB) and dA's pass over x — while the dx GEMMs beside it are compute-bound.
On one stream they take turns. On two, the small kernels run in the GEMMs' shadow: on the H200, 23% of the grads
kernel's time, 66% of dA's and 64% of x·Aᵀ's were hidden behind a dx GEMM (bench/overlap_probe.py,
bench/results/overlap_1.json), and the compiled step of the 953M benchmark model went from 1.110× to 1.091× the
frozen floor's, faster in 8 of 8 rounds taken in turn (bench/results/ab_21_compiled_streams.json).

Per projection (a lone one: o, down) or sibling group (q/k/v, gate/up), `lora_backward` queues

    side stream   wait for the main stream (g and x are ready there);  xa = x·A_catᵀ (when not given);
                  gaᵀ and every dB_i (kernels.lora_grads_buffer, one pass over g);  dA = gaᵀ·x (one pass over x)
    main stream   dx = Σ g_i·W_i (frozen W, accumulating GEMMs), or g·W′ for a lone projection (W′ rebuilt)
    main stream   wait for the side stream;  a group's dx += gaᵀᵀ·A_cat

Everything the side stream reads stays alive until the join, and every use of its results comes after the join on
the main stream, so the caching allocator needs no `record_stream`: a block freed later is reused on the main
stream after the side stream's work, and a block the side stream allocated is reused by a later side-stream call
only after that call's own wait for the main stream. While a CUDA graph is being captured everything stays on the
capturing stream.

Only a compiled backward takes this path, as the opaque custom op `unipeft::lora_backward` (Inductor issues one
stream; inside the op two run). There the host is far ahead of the GPU and has time for the op's Python. An eager
step issues every op from Python anyway, and there the same streams measured slower (1.058× → 1.074×,
bench/results/ab_19_eager_streams.json): it keeps its own order on one stream. `UNIPEFT_STREAMS=0` turns the op
off (the compiled backward then traces its kernels itself, as before). Off the GPU the products run in order with
plain GEMMs (the CPU tests' path).
"""

from __future__ import annotations

import contextlib

import torch

from . import envflags, kernels

_SIDE: dict[int, torch.cuda.Stream] = {}  #: device index -> the side stream (made on first use)


def enabled() -> bool:
    return not envflags.off("UNIPEFT_STREAMS")


def _side(t: torch.Tensor) -> torch.cuda.Stream | None:
    """The side stream of t's device, or None when the products run on the current stream: off the GPU, switched
    off, and while a CUDA graph is being captured (torch.compile's "reduce-overhead" mode: the graph's private memory
    pool serves the capturing stream only, so a side stream's buffers would not be the graph's)."""
    if not t.is_cuda or not enabled() or torch.cuda.is_current_stream_capturing():
        return None
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    side = _SIDE.get(index)
    if side is None:
        side = _SIDE[index] = torch.cuda.Stream(device=index)
    return side


def applies(gs: list[torch.Tensor], ranks: list[int]) -> bool:
    """Whether `lora_backward` runs these gradients' products with the Triton grads kernel (the traced backward
    calls the custom op only then; elsewhere it keeps its own GEMMs)."""
    return kernels.grads_available(gs, ranks)


def lora_backward(gs: list[torch.Tensor | None], ws: list[torch.Tensor], bs: list[torch.Tensor], x: torch.Tensor,
                  a_cat: torch.Tensor, scales: list[float], ranks: list[int], need_dx: bool, need_da: bool,
                  rebuild: bool, xa: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(dx, flat, dA) of one projection or sibling group. gs: each member's output gradient (N × d_i), None for a
    member whose output got none; ws, bs: the members' W (d_i × d_in) and B (d_i × r_i); x: the input (…, d_in);
    a_cat: the members' A stacked (Σr × d_in); xa: x·A_catᵀ (N × Σr) kept from forward, or None to compute it.
    rebuild (one member): dx = g·(W + s·B·A) with W′ built again; else dx = Σ g_i·W_i + gaᵀᵀ·A_cat.
    flat: kernels.lora_grads's buffer — the members with a gradient's dB_i one after another, then gaᵀ (Σr × N,
    zero rows for members without one). dA: gaᵀ·x (Σr × d_in), None unless need_da; dx None unless need_dx."""
    x2 = x.reshape(-1, x.shape[-1])
    live = [i for i, g in enumerate(gs) if g is not None]
    g2 = [gs[i].reshape(-1, gs[i].shape[-1]) for i in live]
    offsets = [sum(ranks[:i]) for i in range(len(ranks))]
    side = _side(x2)
    main = torch.cuda.current_stream(x2.device) if side is not None else None
    if side is not None:
        side.wait_stream(main)
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        if xa is None:
            xa = torch.mm(x2, a_cat.t())
        xas = xa.reshape(-1, xa.shape[-1]).split_with_sizes(ranks, 1)
        flat = _products(g2, [bs[i] for i in live], [xas[i] for i in live], [offsets[i] for i in live],
                         [scales[i] for i in live], sum(ranks))
        n_db = sum(g.shape[1] * bs[i].shape[1] for g, i in zip(g2, live))
        ga_t = flat[n_db:].view(sum(ranks), x2.shape[0])
        da = torch.mm(ga_t, x2) if need_da else None
    dx = None
    if need_dx:
        if rebuild:
            w = kernels.merged_weight(ws[0], bs[0], a_cat, scales[0]) if kernels.available(ws[0]) \
                else torch.addmm(ws[0], bs[0], a_cat, alpha=scales[0])
            dx = torch.mm(g2[0], w)
        else:
            for g, i in zip(g2, live):
                dx = torch.mm(g, ws[i]) if dx is None else dx.addmm_(g, ws[i])
    if side is not None:
        main.wait_stream(side)
    if dx is not None and not rebuild:
        dx.addmm_(ga_t.t(), a_cat)
    return dx, flat, da


def _products(gs, bs, xas, rows, scales, total_rank: int) -> torch.Tensor:
    """kernels.lora_grads's buffer: by the Triton kernel where it applies, else the same layout from GEMMs."""
    if kernels.grads_available(gs + list(xas), [b.shape[1] for b in bs]):
        return kernels.lora_grads_buffer(gs, bs, list(xas), rows, scales, total_rank)
    n = gs[0].shape[0]
    ga_t = gs[0].new_zeros(total_rank, n)
    dbs = []
    for g, b, xa, row, s in zip(gs, bs, xas, rows, scales):
        ga_t[row:row + b.shape[1]] = (b.t() @ g.t()) * s
        dbs.append(((g.t() @ xa) * s).reshape(-1))
    return torch.cat([*dbs, ga_t.reshape(-1)])


@torch.library.custom_op("unipeft::lora_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _lora_backward_op(gs: list[torch.Tensor | None], ws: list[torch.Tensor], bs: list[torch.Tensor],
                      x: torch.Tensor, a_cat: torch.Tensor, scales: list[float], ranks: list[int], need_dx: bool,
                      need_da: bool, rebuild: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lora_backward` as one opaque op of a compiled backward (registered at import: no graph). Outputs not asked
    for come back empty (an op's outputs are tensors); layout-flexible: the gradients are taken as their producers
    made them (see siblings._flexible_mm)."""
    dx, flat, da = lora_backward(gs, ws, bs, x, a_cat, scales, ranks, need_dx, need_da, rebuild)
    empty = x.new_empty(0)
    return (empty if dx is None else dx.view(x.shape)), flat, (empty if da is None else da)


@_lora_backward_op.register_fake
def _(gs, ws, bs, x, a_cat, scales, ranks, need_dx, need_da, rebuild):
    n, total = x.numel() // x.shape[-1], sum(ranks)
    n_db = sum(g.shape[-1] * b.shape[1] for g, b in zip(gs, bs) if g is not None)
    dtype = next(g for g in gs if g is not None).dtype
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    da = x.new_empty(total, x.shape[-1]) if need_da else x.new_empty(0)
    return dx, x.new_empty(n_db + total * n, dtype=dtype), da


def traced_lora_backward(gs, ws, bs, x, a_cat, scales, ranks, need_dx: bool, need_da: bool, rebuild: bool):
    """`lora_backward` from a compiled backward: the custom op, its empty outputs turned back into None."""
    dx, flat, da = torch.ops.unipeft.lora_backward(gs, ws, bs, x, a_cat, list(scales), list(ranks), need_dx,
                                                   need_da, rebuild)
    return (dx if need_dx else None), flat, (da if need_da else None)
