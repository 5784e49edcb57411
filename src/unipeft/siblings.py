"""Sibling projections — q/k/v, gate/up: modules that read the same input — trained as one fused LoRA group.

Each LoRA projection on the fused path reads its input x twice beyond the frozen GEMMs: once for xa = x·Aᵀ in
forward, once for dA = s·(g·B)ᵀ·x in backward. q, k and v read the same x, so one group does it once for all:

    forward    xa = x·[A_q; A_k; A_v]ᵀ                          (one pass over x instead of three)
               y_i = x·W_i'ᵀ + b_i,   W_i' = W_i + s_i·B_i·A_i    (as the single-projection merged form; every
                                                                  member's W' from one launch on CUDA)
    backward   ga = [s_q·g_q·B_q | s_k·g_k·B_k | …]                 (N × Σr)
               dx = Σ_i g_i·W_i + ga·[A_q; A_k; …]                (accumulated in the GEMM epilogues: autograd would
                                                                  otherwise add three N × d_in tensors; no W_i' is
                                                                  rebuilt: for gate/up fewer bytes, for q/k/v about
                                                                  as many at 8 × 1024 tokens, and the same time in
                                                                  bench/dx_order_probe.py, as is the low-rank GEMM
                                                                  taken first)
               dA = gaᵀ·x                                         (one pass over x), split per member
               dB_i = s_i·g_iᵀ·xa_i

The model still calls q_proj(x), k_proj(x), v_proj(x) one by one (no forward code is copied). The first member
called computes every member's output and leaves the others' in the group's `pending` slot, keyed by the identity
and version of x and by the version counters of each member's weights; a member called with that same x (and
unchanged weights) takes its output from there, else it runs alone. Like routing, this is per-call state held on
the modules, not thread-local: `AdaptedModel.forward` clears every group's slot when it returns (or raises), and
under its gradient checkpointing a segment's recompute starts from the group states its forward started with, so
it saves the same tensors. A member called with a different x than the one its output was computed from
(cross-attention: q reads the decoder, k/v the encoder) turns its group off; `link` keeps it off while the members
stay the same. Every member then runs alone, with the same results.

On CUDA, gaᵀ and every dB_i come from one Triton launch for the whole group that reads each g_i once for both
(kernels.lora_grads) instead of two GEMMs per member, and the members' W' from one launch (kernels.merged_weights).

Only for training-shaped calls (gradients on, the merged form paying for every member, plain LoRA on hook-free
nn.Linear or 4-bit bases in one dtype, no routing). A 4-bit member (QLoRA: bitsandbytes NF4/FP4) is dequantized for
its W' in forward and again for the dx GEMM in backward, as when it runs alone. Under torch.compile the same logic
runs while the graph is traced, so the compiled graph holds one group node per q/k/v (the tracer follows x's
identity; version counters are not checked there — a traced graph has no in-place change between the members'
calls to catch). Members are found by name: modules with the same parent whose names form one of SIBLING_NAMES.
`UNIPEFT_GROUPS=0` turns grouping off (for measuring it; results are the same either way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

# (fused imports this module too: used at call time only, never at import)
from . import envflags, fused, kernels, overlap, quant

#: leaf-name sets of projections that read the same input (Llama/Mistral/Qwen, BERT, T5-style, gated T5)
SIBLING_NAMES: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}), frozenset({"q", "k", "v"}), frozenset({"wi_0", "wi_1"}),
)


@dataclass
class _Pending:
    x: torch.Tensor
    version: int
    #: id(member) -> (its output, the tensors it was computed from, their version counters then)
    outputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[int, ...]]]


class SiblingGroup:
    """Members (sorted by name), whether grouping is on, and the outputs computed ahead within the current call."""

    def __init__(self, members: list) -> None:
        self.members = members
        self.index = {id(m): i for i, m in enumerate(members)}  #: id(member) -> its position (looked up per call)
        self.enabled = True
        self.suspended = False  #: set while a compiled checkpointed segment is traced (checkpointing.py)
        self.pending: _Pending | None = None


def link(wrappers: dict) -> list[SiblingGroup]:
    """Give each wrapper (path -> AdapterLayer) its SiblingGroup, or none, and return the groups; called whenever
    wrappers change. A group whose members did not change is kept as it is (a group turned off stays off)."""
    by_parent: dict[str, dict[str, object]] = {}
    for path, w in wrappers.items():
        parent, _, leaf = path.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = w
    groups, grouped = [], set()
    for leaves in by_parent.values():
        for names in SIBLING_NAMES:
            present = [leaves[n] for n in sorted(names) if n in leaves]
            if len(present) < 2:
                continue
            old = present[0].__dict__.get("_unipeft_group")
            group = old if old is not None and old.members == present else SiblingGroup(present)
            group.pending = None
            groups.append(group)
            for w in present:
                w.__dict__["_unipeft_group"] = group
                grouped.add(id(w))
    for w in wrappers.values():
        if id(w) not in grouped:
            w.__dict__.pop("_unipeft_group", None)
    return groups


def clear(groups: list[SiblingGroup]) -> None:
    """Drop every outputs-computed-ahead slot: the end of a model call, or of a checkpointed segment's recompute."""
    for g in groups:
        g.pending = None


def grouped_output(layer, x: torch.Tensor) -> torch.Tensor | None:
    """This member's output from its group — computed now for all members, or earlier in this call — or None when
    the layer must run alone."""
    group = layer.__dict__.get("_unipeft_group")
    if group is None or not group.enabled or group.suspended or not torch.is_grad_enabled() \
            or envflags.off("UNIPEFT_GROUPS"):
        return None
    mine = group.index.get(id(layer))
    if mine is None:
        # A shallow copy sharing the group (nn.DataParallel's replicas): not a member, runs alone. (The group holds
        # its members, so no other object can have a member's id. Comparing `group.members[mine] is layer` instead
        # would cost a compiled call one identity guard per member, evaluated in Python at every call.)
        return None
    # Version counters guard against in-place changes between the members' calls. A compiled graph has no such
    # changes to see (and its tracer cannot read the counters), so there the identity of x is the whole key.
    compiling = torch.compiler.is_compiling()
    pending = group.pending
    if pending is not None and id(layer) in pending.outputs:
        out, tensors, versions = pending.outputs.pop(id(layer))
        if not pending.outputs:
            group.pending = None
        if pending.x is not x or (not compiling and pending.version != x._version):
            group.enabled, group.pending = False, None  # members read different inputs: never group them
            return None
        w, a, b = tensors
        if compiling or (w._version, a._version, b._version) == versions:
            return out
        return None  # a weight changed in place since the group ran (not within one model call): run alone
    ready = _ready(group, x)
    if ready is None:
        return None
    spec, tensors, biases = ready
    ys = _LoraGroup.apply(x, spec, *tensors, *biases)
    ahead = {}
    for i, m in enumerate(group.members):
        if i != mine:
            w, a, b = tensors[3 * i:3 * i + 3]
            ahead[id(m)] = (ys[i], (w, a, b), () if compiling else (w._version, a._version, b._version))
    group.pending = _Pending(x, -1 if compiling else x._version, ahead)
    return ys[mine]


def _ready(group: SiblingGroup, x: torch.Tensor) -> tuple[tuple, list, list] | None:
    """((the scales, the sources), W, A, B of each member in turn, the biases) when every member takes the fused
    merged form on this x, else None. A member's source is None for a plain W, or for a 4-bit base (QLoRA) the
    function giving its dequantized W (quant.dequantizer: absmax decoded once per call, as a lone projection's).
    (Runs once per group call: what every member shares is read once, module attributes through their dicts.)"""
    if x.dim() < 2 or torch.is_autocast_enabled(x.device.type):
        return None  # (any cast runs alone: the group has no casts)
    rows, d_in, dtype = x.numel() // x.shape[-1], x.shape[-1], x.dtype
    scales, q4_bases, tensors, biases = [], [], [], []
    compiling = torch.compiler.is_compiling()
    for m in group.members:
        lean = fused.cached_operands(m) if compiling else None  # (a compiled call: fewer guards)
        base = m._modules["base_layer"]
        kind = fused.LINEAR
        if lean is not None:
            if not fused._unhooked(base):
                return None
            a, b, s = fused.lean_weights(lean)
        else:
            items, _, kind, _ = m._plan()
            if kind not in (fused.LINEAR, fused.Q4) or len(items) != 1 or m.routing is not None \
                    or len(m._modules["copies"]) or not fused._unhooked(base):
                return None
            a, b, s = fused.lora_weights(items[0][1])
        w, bias = base._parameters["weight"], base._parameters.get("bias")
        if kind == fused.Q4:  # (W is packed: its shape and dtype are the storage's, not the layer's)
            d_out, ok = base.out_features, quant.compute_dtype(base) == dtype and base.in_features == d_in
        else:
            d_out, ok = w.shape[0], w.dtype == dtype and w.shape[1] == d_in
        if not ok or not (dtype == a.dtype == b.dtype) or w.requires_grad \
                or (bias is not None and (bias.requires_grad or bias.dtype != dtype)):
            return None  # (a base weight that trains, or any cast, runs alone: the group has no dW and no casts)
        if not fused._merged_pays(rows, d_in, d_out, True):
            return None
        scales.append(s)
        q4_bases.append(base if kind == fused.Q4 else None)
        tensors += (w, a, b)
        biases.append(bias)
    # a 4-bit member's dequantizer only once the group is sure to run: making one decodes a double-quantized absmax
    sources = tuple(None if base is None else quant.dequantizer(base, dtype) for base in q4_bases)
    return (tuple(scales), sources), tensors, biases


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a·b in place, as the compiled graph's op `unipeft::addmm_acc`. Traced, `acc.addmm_(a, b)` becomes an
    out-of-place addmm into a new buffer, which cuBLAS's caller fills with a copy of acc first: 77 copies of an
    N × d_in tensor per step (1.2 ms on the 953M model). A custom op that mutates acc is put back in place by the
    compiler (acc is dead after it), so no copy is made."""
    torch.ops.unipeft.addmm_acc(acc, a, b)
    return acc


@torch.library.custom_op("unipeft::addmm_acc", mutates_args=("acc",), tags=(torch.Tag.flexible_layout,))
def _addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:  # (registered at import: no graph)
    acc.addmm_(a, b)


_addmm_acc.register_fake(lambda acc, a, b: None)


def _flexible_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b as the compiled graph's op `unipeft::mm` — the traced group backward's first dx GEMM. Why not aten.mm:
    a member's output gradient is a view (N × d) of the attention backward's (B, T, H, D) copy, read by its dx
    GEMM and by the grads kernel. For a tensor with two readers one of which is aten.mm, Inductor fixes the
    view's strides first, which makes the copy an N × d loop of its own; where the gradient's producer (k's RoPE
    backward with the KV cache's gradient added) is a buffer already, that loop cannot be fused into it (its
    loops cannot be reordered to the producer's (B, H, T, D) order), and it runs as a transposing copy kernel per
    layer that the frozen floor does not pay (15.5 µs a layer on the H200; `bench/fusion_probe.py`). Custom ops
    tagged flexible_layout take their inputs as they are: the first one realizes the copy in its own (B, T, H, D)
    shape, which Inductor fuses into the producer as it does in the floor, and every later reader (the other
    GEMMs, the grads kernel) gets a view of it."""
    return torch.ops.unipeft.mm(a, b)


@torch.library.custom_op("unipeft::mm", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b)


_mm.register_fake(lambda a, b: a.new_empty(a.shape[0], b.shape[1]))


class _LoraGroup(torch.autograd.Function):
    """Outputs y_i = x·W_iᵀ + b_i + s_i·(x·A_iᵀ)·B_iᵀ of k sibling projections (see the module docstring).
    Inputs: x, (the scales, the sources), then W, A, B of each member, then each member's bias (or None). A
    member's source (None for a plain W) gives a 4-bit base's W dequantized: in forward for W_i', in backward for
    the dx GEMM — so a QLoRA group keeps no dequantized weight between the two, as a lone 4-bit projection."""

    @staticmethod
    def forward(ctx, x, spec, *tensors):
        scales, sources = spec
        k = len(scales)
        ws, as_, bs = tensors[0:3 * k:3], tensors[1:3 * k:3], tensors[2:3 * k:3]
        biases = tensors[3 * k:]
        need_b = any(ctx.needs_input_grad[4:2 + 3 * k:3])
        if need_b and fused.backward_takes_xa(x, [a.shape[0] for a in as_]):
            need_b = False  # a compiled backward's op takes x·Aᵀ beside the dx GEMMs (overlap.py)
        # every member's W', and a_cat = [A_1; A_2; …] (Σr × d_in), from one launch on CUDA
        w_primes, a_cat = fused.merged_weights(ws, as_, bs, scales, sources)
        first = F.linear(x, w_primes[0], biases[0])
        # N × Σr, the one pass over x — right after the first GEMM read x, while part of it is still in L2
        xa = torch.mm(x.reshape(-1, x.shape[-1]), a_cat.t()) if need_b else None
        ys = (first, *(F.linear(x, w, bias) for w, bias in zip(w_primes[1:], biases[1:])))
        del w_primes
        ctx.save_for_backward(x, xa, a_cat, *ws, *as_, *bs)  # the A's too: double backward differentiates through them
        ctx.scales, ctx.sources, ctx.has_bias = scales, sources, tuple(bias is not None for bias in biases)
        ctx.ranks = [a.shape[0] for a in as_]  # (backward splits Σr-sized tensors into the members' blocks with them)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zero-filled GEMMs
        return ys

    @staticmethod
    def backward(ctx, *gys):
        x, xa, a_cat, *rest = ctx.saved_tensors
        scales, ranks = ctx.scales, ctx.ranks
        k = len(scales)
        ws, as_, bs = rest[:k], rest[k:2 * k], rest[2 * k:]
        needs = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        gs = [None if gy is None else gy.reshape(-1, gy.shape[-1]) for gy in gys]
        live = [i for i in range(k) if gs[i] is not None]
        create_graph, compiling = torch.is_grad_enabled(), torch.compiler.is_compiling()
        in_w = False  # whether the live members' ws are W_i' (then dx needs no low-rank GEMM of its own)
        if (needs[0] or compiling) and any(src is not None for src in ctx.sources):
            # 4-bit members: their W dequantized again (fresh tensors) — only for dx: where x needs no gradient (the
            # first layer's q/k/v, whose input comes from frozen embeddings) eager backward dequantizes nothing
            merges = [getattr(src, "merged", None) for src in ctx.sources]
            if all(merges[i] is not None for i in live) and not create_graph:
                # the 4-bit kernel builds W_i' in the pass that dequantizes W_i (kernels_q4.py): the low-rank part
                # of dx rides in the frozen GEMMs for free, and dx is not read and written again for it
                ws = tuple(merges[i](bs[i], as_[i], scales[i]) if i in live else None for i in range(k))
                in_w = True
            else:
                ws = tuple(w if src is None else src() for w, src in zip(ws, ctx.sources))
        grads_b = [None] * k
        gts = None  # g_iᵀ, read by gaᵀ and dB_i off the kernel path (made there: eager steps count host µs)
        dx = None
        traced = compiling and not create_graph
        if live and traced and overlap.enabled() \
                and any(needs[3 + 3 * i] or needs[4 + 3 * i] for i in live) \
                and overlap.applies([gs[i] for i in live], ranks):
            # compiled: x·Aᵀ, the grads kernel and dA on a second stream beside the dx GEMMs (overlap.py)
            dx, flat, da = overlap.traced_lora_backward(list(gys), list(ws), list(bs), x, a_cat, list(scales),
                                                        list(ranks), needs[0], any(needs[3 + 3 * i] for i in live),
                                                        False)
            dbs = flat[:sum(gs[i].shape[1] * bs[i].shape[1] for i in live)] \
                .split_with_sizes([bs[i].numel() for i in live])
            das = da.split_with_sizes(ranks) if da is not None else None
            grads_a = [das[i] if das is not None and i in live and needs[3 + 3 * i] else None for i in range(k)]
            for j, i in enumerate(live):
                grads_b[i] = dbs[j].view(bs[i].shape) if needs[4 + 3 * i] else None
            return _group_grads(ctx, gs, live, None if dx is None else dx.view(x.shape), grads_a, grads_b)
        if xa is None and live and not create_graph and any(needs[4 + 3 * i] for i in live):
            xa = torch.mm(x2, a_cat.t())  # (forward left it to the op above, which did not apply after all)
        acc = _accumulate if traced else torch.Tensor.addmm_
        if needs[0] and live and traced:
            # traced: the frozen GEMMs of dx first — before the grads kernel, whose inputs Inductor fixes to their
            # traced strides (an N × d copy where a gradient is not yet a buffer) — each a layout-flexible custom
            # op, so the first reader realizes the gradient in its own shape (see _flexible_mm)
            for i in live:
                dx = _flexible_mm(gs[i], ws[i]) if dx is None else acc(dx, gs[i], ws[i])
        # gaᵀ = [s_i·(g_i·B_i)]ᵀ stacked: Σr × N (blocks of members without a gradient are zero).
        if xa is not None and live and not create_graph and kernels.grads_available([gs[i] for i in live], ranks):
            # one Triton launch for the group reads each g_i once for its gaᵀ block and its dB (kernels.lora_grads)
            offsets = [sum(ranks[:i]) for i in range(k)]
            xas = xa.split_with_sizes(ranks, 1)
            ga_t, dbs = kernels.lora_grads([gs[i] for i in live], [bs[i] for i in live], [xas[i] for i in live],
                                           [offsets[i] for i in live], [scales[i] for i in live], sum(ranks))
            for i, db in zip(live, dbs.split_with_sizes([bs[i].numel() for i in live])):
                grads_b[i] = db.view(bs[i].shape) if needs[4 + 3 * i] else None
            xa = None  # (dB is done)
        else:
            gts = [None if g is None else g.t() for g in gs]
            if create_graph or compiling:
                # double backward (create_graph=True): out= GEMMs are not differentiable; a compiler: no writes
                # into slices (it would add copies) and no cached zero
                ga_t = torch.cat([(bs[i].t() @ gts[i]) * scales[i] if i in live
                                  else x2.new_zeros(ranks[i], x2.shape[0]) for i in range(k)])
            else:
                # row blocks are contiguous, so each GEMM writes its block in place; blocks are taken with one
                # split_with_sizes call rather than a slice per member (host time)
                ga_t = x2.new_empty(sum(ranks), x2.shape[0]) if len(live) == k \
                    else x2.new_zeros(sum(ranks), x2.shape[0])
                blocks = ga_t.split_with_sizes(ranks)
                zero = fused.zero_like(x2)
                for i in live:
                    torch.addmm(zero, bs[i].t(), gts[i], beta=0, alpha=scales[i], out=blocks[i])
        if needs[0] and live:
            # dx = Σ g_i·W_i + gaᵀᵀ·A_cat: frozen GEMMs accumulating in their epilogue, then the low-rank part in
            # one more accumulating GEMM (rebuilding the W_i' instead: as fast for q/k/v, more bytes for gate/up)
            if dx is None:
                for i in live:
                    dx = torch.mm(gs[i], ws[i]) if dx is None else acc(dx, gs[i], ws[i])
            dx = (dx if in_w else acc(dx, ga_t.t(), torch.cat(as_) if create_graph else a_cat)).view(x.shape)
        grads_a = [None] * k
        if any(needs[3 + 3 * i] for i in live):
            da = torch.mm(ga_t, x2).split_with_sizes(ranks)  # the one pass over x
            for i in live:
                grads_a[i] = da[i] if needs[3 + 3 * i] else None
        if xa is not None and any(needs[4 + 3 * i] for i in live):
            if create_graph:  # double backward: xa as a function of x and A
                xa = torch.mm(x2, torch.cat(as_).t())
            xas = xa.split_with_sizes(ranks, 1)
            for i in live:
                if needs[4 + 3 * i]:
                    grads_b[i] = fused._scaled_mm(gts[i], xas[i], scales[i])
        return _group_grads(ctx, gs, live, dx, grads_a, grads_b)


def _group_grads(ctx, gs: list, live: list[int], dx, grads_a: list, grads_b: list) -> tuple:
    """`_LoraGroup.backward`'s result: dx, None for the scales, (None, dA_i, dB_i) per member, then each bias's
    gradient (the sum of its member's output gradient, where it has one and needs one)."""
    k = len(grads_a)
    grads_bias = [gs[i].sum(0) if (i in live and ctx.has_bias[i] and ctx.needs_input_grad[2 + 3 * k + i]) else None
                  for i in range(k)]
    flat = [t for i in range(k) for t in (None, grads_a[i], grads_b[i])]
    return (dx, None, *flat, *grads_bias)
