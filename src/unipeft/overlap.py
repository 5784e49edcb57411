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

Every buffer the side stream writes is allocated on the main stream before the fork, and everything it reads or
writes is held until the join, after which every use is on the main stream: so the caching allocator needs no
`record_stream` (a block freed after the join is reused by main-stream work queued after the side stream's), and
the side stream draws no memory pool of its own — the one segment it owns is cuBLAS's workspace for its two GEMMs
(32 MiB on the H200). Fork and join are one pair of events per device, made once (a wait takes the record queued
just before it): the first version made two events and a stream object per call, and the backward's host time of
the benchmark step went 46.2 → 34.7 ms with this one (bench/first_steps.py; the step stayed GPU-bound at ~75 ms).
While a CUDA graph is being captured this op keeps everything on the capturing stream (routed decoding's
`routed_kernels.routed_linear` does use the lane inside a capture: `_lane(capture=True)`). The fork and join events
are shared per device, so two threads driving one device's lane at once could take each other's records (as with
any code that shares CUDA events across threads): drive a device from one thread. A call signature seen before runs
from its plan (`_Call`): the op's Python, not its kernels, was most of the compiled backward's host time.

Only a compiled backward takes this path, as the opaque custom op `unipeft::lora_backward` (Inductor issues one
stream; inside the op two run; registered through torch.library.Library, ~10 µs less host time per call than the
custom_op decorator: see its definition). There the host is far ahead of the GPU and has time for the op's
Python. An eager step issues every op from Python anyway, and there the same streams measured slower (1.058× →
1.074×, bench/results/ab_19_eager_streams.json): it keeps its own order on one stream. `UNIPEFT_STREAMS=0` turns the op
off (the compiled backward then traces its kernels itself, as before). Off the GPU the products run in order with
plain GEMMs (the CPU tests' path).
"""

from __future__ import annotations

import torch

from . import envflags, kernels, launching


class _Lane:
    """A device's side stream and the two events that fork work to it and join it back, made once: a
    `Stream.wait_stream` makes an event per call. Reusing one is safe because each wait is queued right after its
    record (a wait takes the event's latest record at the time it is queued)."""

    __slots__ = ("side", "fork", "join")

    def __init__(self, index: int) -> None:
        self.side = torch.cuda.Stream(device=index)
        self.fork, self.join = torch.cuda.Event(), torch.cuda.Event()


_LANES: dict[int, _Lane] = {}  #: device index -> its lane (made on first use)


def enabled() -> bool:
    return not envflags.off("UNIPEFT_STREAMS")


def _lane(t: torch.Tensor, capture: bool = False) -> _Lane | None:
    """The lane of t's device, or None when the products run on the current stream: off the GPU, switched off,
    while a CUDA graph is being captured unless `capture` (torch.compile's "reduce-overhead" mode: the graph's
    private memory pool serves the capturing stream only, so buffers a side stream allocates — cuBLAS's workspace
    for the backward's GEMMs — would not be the graph's; routed decoding's side stream launches Triton kernels
    only, into buffers allocated before the fork, and joins the capture), and when t is not on the current device
    (`torch.cuda.set_stream` switches the current device to the stream's; autograd runs a device's backward with
    that device current, so this is only a guard)."""
    if not t.is_cuda or not enabled() or (not capture and torch.cuda.is_current_stream_capturing()):
        return None
    index = t.get_device()
    if index != torch.cuda.current_device():
        return None
    lane = _LANES.get(index)
    if lane is None:
        lane = _LANES[index] = _Lane(index)
    return lane


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
    zero rows for members without one). dA: gaᵀ·x (Σr × d_in), None unless need_da; dx None unless need_dx.

    Every buffer is allocated on the main stream before the fork (the side stream only writes into them) and held
    until the join, so the side stream draws no memory pool of its own. A call signature seen before runs from
    its `_Call` plan (same kernels, same order, same results)."""
    if xa is not None:
        return _unplanned(gs, ws, bs, x, a_cat, scales, ranks, need_dx, need_da, rebuild, xa)
    key = _call_key(gs, ws, bs, x, a_cat, scales, ranks, need_dx, need_da, rebuild)
    call = _CALLS.get(key, 0)
    if type(call) is _Call:
        index = x.get_device()
        # (not on another device than the current one: `_lane`'s guard; not once launching has fallen back to
        # Triton's own path for good: the plan's launchers are direct ones)
        if (index < 0 or index == torch.cuda.current_device()) and launching._DIRECT[0]:
            lane = None if index < 0 or not key[2] or torch.cuda.is_current_stream_capturing() else \
                (_LANES.get(index) or _lane(x))
            return call.run(lane, gs, ws, bs, x, a_cat, need_dx, need_da)
        return _unplanned(gs, ws, bs, x, a_cat, scales, ranks, need_dx, need_da, rebuild, None)
    result = _unplanned(gs, ws, bs, x, a_cat, scales, ranks, need_dx, need_da, rebuild, None)
    if call < _TRIES:
        made = _Call.make(gs, ws, bs, x, a_cat, scales, ranks, need_dx, rebuild)
        if len(_CALLS) >= _CALL_LIMIT:
            _CALLS.clear()
        _CALLS[key] = made if type(made) is _Call else _TRIES if made is None else call + 1
    return result


def _unplanned(gs, ws, bs, x, a_cat, scales, ranks, need_dx: bool, need_da: bool, rebuild: bool, xa):
    """`lora_backward` worked out from its arguments (a first call, or one that cannot be planned)."""
    x2 = x.reshape(-1, x.shape[-1])
    n, total = x2.shape[0], sum(ranks)
    live = [i for i, g in enumerate(gs) if g is not None]
    g2 = [gs[i].reshape(-1, gs[i].shape[-1]) for i in live]
    b2, r2 = [bs[i] for i in live], [ranks[i] for i in live]
    rows = [sum(ranks[:i]) for i in live]
    grads = kernels.grads_available(g2 if xa is None else g2 + [xa], r2) and n * total < 2**31
    lane = _lane(x2) if grads else None
    if lane is None:  # one stream: the products in order (the CPU's GEMMs, or the kernel)
        xa = torch.mm(x2, a_cat.t()) if xa is None else xa.reshape(n, total)
        xas = xa.split_with_sizes(ranks, 1)
        xas = [xas[i] for i in live]
        flat = kernels.lora_grads_buffer(g2, b2, xas, rows, [scales[i] for i in live], total) if grads \
            else _products(g2, b2, xas, rows, [scales[i] for i in live], total)
        ga_t = flat[flat.numel() - total * n:].view(total, n)
        da = torch.mm(ga_t, x2) if need_da else None
        return _dx(g2, ws, bs, live, a_cat, scales, ga_t, need_dx, rebuild), flat, da
    buffers = kernels.grads_buffers(g2, b2, total)  # (on the main stream: see the docstring)
    flat = buffers[1]
    ga_t = flat[flat.numel() - total * n:].view(total, n)
    xa_out = torch.empty(n, total, device=x2.device, dtype=x2.dtype) if xa is None else None
    da = torch.empty(total, x2.shape[1], device=x2.device, dtype=x2.dtype) if need_da else None
    main = torch.cuda.current_stream(x2.device)
    lane.fork.record(main)
    lane.side.wait_event(lane.fork)
    torch.cuda.set_stream(lane.side)
    try:
        xa = torch.mm(x2, a_cat.t(), out=xa_out) if xa is None else xa.reshape(n, total)
        xas = xa.split_with_sizes(ranks, 1)
        kernels.lora_grads_buffer(g2, b2, [xas[i] for i in live], rows, [scales[i] for i in live], total, buffers)
        if need_da:
            torch.mm(ga_t, x2, out=da)
        lane.join.record(lane.side)
    finally:
        torch.cuda.set_stream(main)
    dx = _dx(g2, ws, bs, live, a_cat, scales, ga_t, need_dx, rebuild, lambda: main.wait_event(lane.join))
    del buffers, xa_out, xa, xas  # (held to here: the side stream's last use of them is before the join)
    return dx, flat, da


_CALLS: dict[tuple, _Call | int] = {}  #: call signature -> its plan, or how often making one found no launch plans
_TRIES = 3  # a signature whose launch plans were missing this often (or that cannot have any) runs unplanned
_CALL_LIMIT = 1024  # signatures kept (one per projection or group and shape, usually); cleared when full


def _call_key(gs, ws, bs, x, a_cat, scales, ranks, need_dx: bool, need_da: bool, rebuild: bool) -> tuple:
    """Everything a `_Call` depends on: the runtime switches (deterministic algorithms, UNIPEFT_TRITON — both
    decide whether the grads kernel may run —, UNIPEFT_STREAMS at index 2), the flags, scales and ranks, which
    members have a gradient, and the shape, strides, dtype and alignment (launching._signature) of every tensor a
    recorded launch reads — g, B and x (whose dtype and size the x·Aᵀ buffer takes), and for a rebuilt W′ also W
    and A. (A group's W and A only meet torch GEMMs, which take any layout.)"""
    live = [g for g in gs if g is not None]
    return (torch.are_deterministic_algorithms_enabled(), envflags._lookup("UNIPEFT_TRITON") not in envflags._ZEROS,
            envflags._lookup("UNIPEFT_STREAMS") not in envflags._ZEROS, need_dx, need_da, rebuild, *scales, *ranks,
            *[g is None for g in gs],
            *launching._signature([*live, *bs, x, ws[0], a_cat] if rebuild else [*live, *bs, x]))


class _Call:
    """One call signature of `lora_backward` worked out once: which members have a gradient, the sizes, the grads
    buffers' layout and the two recorded launch plans (the grads kernel's and, for a rebuilt W′, the merge
    kernel's: launching._Plan). A compiled backward calls the op 64 times a step on the 953M benchmark model, each
    time with its site's signature, and worked out from the arguments those calls were most of the backward's host
    time: cProfile at 1 × 3072 tokens (where the GPU waits for the host) put 35.4 of the backward's 45.2 profiled
    ms a step in them, ~8 of it their GEMM launches (bench/host_probe.py --compile; the backward's host time 37.9
    ms against the floor's 7.8). A plan skips the availability checks, the layout arithmetic, the launch plans'
    signatures and lookups, the environment reads and the stream object lookups: 27.7 ms on a host of the same
    speed (docs/performance-log.md, nineteenth session). Holds no tensor."""

    __slots__ = ("live", "widths", "ranks", "rows", "scales", "n", "k", "total", "layout", "grads", "merge")

    @classmethod
    def make(cls, gs, ws, bs, x, a_cat, scales, ranks, need_dx: bool, rebuild: bool) -> _Call | bool | None:
        """The plan of a call just made through `_unplanned` (its launch plans are recorded now); None where the
        call cannot have one (no grads kernel, no direct launches, no merge kernel for its W′), False where its
        launch plans are missing now (launching's table was cleared meanwhile, or the call made more launches than
        one plan records: both looked up again at the next calls, a few times)."""
        n, k, total = x.numel() // x.shape[-1], x.shape[-1], sum(ranks)
        live = [i for i, g in enumerate(gs) if g is not None]
        g2 = [gs[i].reshape(n, -1) for i in live]
        if not kernels.grads_available(g2, [ranks[i] for i in live]) or n * total >= 2**31 \
                or not launching._DIRECT[0]:
            return None
        xas = torch.empty(n, total, device=x.device, dtype=x.dtype).split_with_sizes(ranks, 1)
        rows, live_scales = [sum(ranks[:i]) for i in live], [scales[i] for i in live]
        tensors = [*g2, *[bs[i] for i in live], *[xas[i] for i in live]]
        grads = launching._PLANS.get(kernels._grads_plan_key(tensors, rows, live_scales, total))
        merge = None
        if need_dx and rebuild:
            if not kernels.available(ws[0]):
                return None
            merge = launching._PLANS.get(kernels._merge_plan_key([ws[0], bs[0], a_cat], scales[0]))
            if merge is None:
                return False
        if grads is None:
            return False
        call = cls()
        call.live, call.widths, call.ranks = live, [g.shape[1] for g in g2], list(ranks)
        call.rows, call.scales = rows, live_scales
        call.n, call.k, call.total, call.layout, call.grads, call.merge = n, k, total, grads.extra, grads, merge
        return call

    def run(self, lane: _Lane | None, gs, ws, bs, x, a_cat, need_dx: bool, need_da: bool):
        """`_unplanned`'s work for this signature: the same kernels in the same order on the same streams."""
        n, total, live = self.n, self.total, self.live
        dev, dt = x.device, x.dtype
        x2 = x.reshape(n, self.k)
        g2 = [gs[i].reshape(n, d) for i, d in zip(live, self.widths)]
        end, size, mode = self.layout
        out = torch.empty(end, device=dev, dtype=torch.float32)
        dst = out if mode == 0 else torch.empty(size, device=dev, dtype=g2[0].dtype)
        ga_t = dst[size - total * n:].view(total, n)
        xa = torch.empty(n, total, device=dev, dtype=dt)
        da = torch.empty(total, self.k, device=dev, dtype=dt) if need_da else None
        main = None
        if lane is not None:
            main = _main_stream(dev.index)
            lane.fork.record(main)
            lane.fork.wait(lane.side)
            torch.cuda.set_stream(lane.side)
        try:
            torch.mm(x2, a_cat.t(), out=xa)
            parts = xa.split_with_sizes(self.ranks, 1)
            out.zero_()
            if mode == 2:
                dst.zero_()
            b2, xas = [bs[i] for i in live], [parts[i] for i in live]
            if not self.grads([*g2, *b2, *xas, out, dst]):  # (a launcher API we do not know: every plan dropped)
                _CALLS.clear()
                kernels.lora_grads_buffer(g2, b2, xas, self.rows, self.scales, total, (out, dst))
            if need_da:
                torch.mm(ga_t, x2, out=da)
            if lane is not None:
                lane.join.record(lane.side)
        finally:
            if main is not None:
                torch.cuda.set_stream(main)
        dx = None
        if need_dx and self.merge is not None:
            w = ws[0]
            built = torch.empty_like(w, memory_format=torch.contiguous_format)
            if not self.merge([w, bs[0], a_cat, built]):
                _CALLS.clear()
                built = kernels.merged_weight(w, bs[0], a_cat, self.scales[0])
            dx = torch.mm(g2[0], built)
        elif need_dx:
            for g, i in zip(g2, live):
                dx = torch.mm(g, ws[i]) if dx is None else dx.addmm_(g, ws[i])
        if main is not None:
            lane.join.wait(main)
        if need_dx and self.merge is None:
            dx.addmm_(ga_t.t(), a_cat)
        return dx, dst, da


_MAIN: dict[int, torch.cuda.Stream] = {}  #: device index -> the Stream object of its current stream, last seen


def _main_stream(index: int) -> torch.cuda.Stream:
    """torch.cuda.current_stream(index), kept while the raw stream stays the same: building the object at every
    call took 1.5 of the op's 35.4 profiled ms a step (bench/results/host_12_compiled_b1t3072.json)."""
    stream = _MAIN.get(index)
    if stream is None or stream.cuda_stream != torch._C._cuda_getCurrentRawStream(index):
        stream = _MAIN[index] = torch.cuda.current_stream(index)
    return stream


def _merged(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float) -> torch.Tensor:
    """W + s·B·A, by the Triton kernel where it applies."""
    return kernels.merged_weight(w, b, a, s) if kernels.available(w) else torch.addmm(w, b, a, alpha=s)


def _dx(g2, ws, bs, live, a_cat, scales, ga_t, need_dx: bool, rebuild: bool, join=None) -> torch.Tensor | None:
    """dx: g·W′ with W′ rebuilt (rebuild), or Σ g_i·W_i + gaᵀᵀ·A_cat; `join` (the wait for the side stream) is
    called after the GEMMs that do not read gaᵀ and before the one that does."""
    dx = None
    if need_dx and rebuild:
        dx = torch.mm(g2[0], _merged(ws[0], bs[0], a_cat, scales[0]))
    elif need_dx:
        for g, i in zip(g2, live):
            dx = torch.mm(g, ws[i]) if dx is None else dx.addmm_(g, ws[i])
    if join is not None:
        join()
    return dx.addmm_(ga_t.t(), a_cat) if need_dx and not rebuild else dx


def _products(gs, bs, xas, rows, scales, total_rank: int) -> torch.Tensor:
    """kernels.lora_grads's buffer from GEMMs (off the GPU and where the kernel does not apply)."""
    n = gs[0].shape[0]
    ga_t = gs[0].new_zeros(total_rank, n)
    dbs = []
    for g, b, xa, row, s in zip(gs, bs, xas, rows, scales):
        ga_t[row:row + b.shape[1]] = (b.t() @ g.t()) * s
        dbs.append(((g.t() @ xa) * s).reshape(-1))
    return torch.cat([*dbs, ga_t.reshape(-1)])


def _lora_backward_op(gs: list[torch.Tensor | None], ws: list[torch.Tensor], bs: list[torch.Tensor],
                      x: torch.Tensor, a_cat: torch.Tensor, scales: list[float], ranks: list[int], need_dx: bool,
                      need_da: bool, rebuild: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lora_backward` as one opaque op of a compiled backward. Outputs not asked for come back empty (an op's
    outputs are tensors, each its own); layout-flexible: the gradients are taken as their producers made them
    (see siblings._flexible_mm)."""
    dx, flat, da = lora_backward(gs, ws, bs, x, a_cat, scales, ranks, need_dx, need_da, rebuild)
    return (x.new_empty(0) if dx is None else dx.view(x.shape)), flat, (x.new_empty(0) if da is None else da)


def _lora_backward_fake(gs, ws, bs, x, a_cat, scales, ranks, need_dx, need_da, rebuild):
    n, total = x.numel() // x.shape[-1], sum(ranks)
    n_db = sum(g.shape[-1] * b.shape[1] for g, b in zip(gs, bs) if g is not None)
    dtype = next(g for g in gs if g is not None).dtype
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    da = x.new_empty(total, x.shape[-1]) if need_da else x.new_empty(0)
    return dx, x.new_empty(n_db + total * n, dtype=dtype), da


# Registered at import (inside a compiled region it would break the graph) through torch.library.Library rather
# than the torch.library.custom_op decorator: a compiled backward calls this op 64 times a step on the 953M model,
# and custom_op's Python layers around the function (its autograd wrapper, the output-aliasing check) cost ~10 µs
# of host time per call more (15.0 against 4.9 µs on the development CPU, trivial body: bench/op_overhead.py) —
# host time the compiled step's backward is short of on slower hosts (docs/performance.md). The function returns
# fresh tensors only (tests/test_overlap.py checks what the decorator checked).
_LIB = torch.library.Library("unipeft", "FRAGMENT")
_LIB.define("lora_backward(Tensor?[] gs, Tensor[] ws, Tensor[] bs, Tensor x, Tensor a_cat, float[] scales, "
            "int[] ranks, bool need_dx, bool need_da, bool rebuild) -> (Tensor, Tensor, Tensor)",
            tags=(torch.Tag.flexible_layout,))
_LIB.impl("lora_backward", _lora_backward_op, "CompositeExplicitAutograd")
torch.library.register_fake("unipeft::lora_backward", _lora_backward_fake, lib=_LIB)


def traced_lora_backward(gs, ws, bs, x, a_cat, scales, ranks, need_dx: bool, need_da: bool, rebuild: bool):
    """`lora_backward` from a compiled backward: the custom op, its empty outputs turned back into None."""
    dx, flat, da = torch.ops.unipeft.lora_backward(gs, ws, bs, x, a_cat, list(scales), list(ranks), need_dx,
                                                   need_da, rebuild)
    return (dx if need_dx else None), flat, (da if need_da else None)
