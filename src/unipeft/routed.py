"""Per-sample routing (`adapter_names=`): each batch row uses its own adapter. `hand_over` checks a call's names and
hands the Routing to the layers; the rest is the fast path for LoRA projections.

A loop over adapters launches per adapter; here a projection costs a fixed number of launches for any mix. Two ways
to find each row's weights, picked per call:

  per-routing stacks (the default)
    A and s·B of the adapters this call names, stacked per projection (n+1, r, d_in) / (n+1, d_out, r) with a zero
    slot for rows of the base, built at the call's first step and reused while the same routing decodes. Rows with
    many tokens (prefill, training) — and every eager call — gather per-row copies and run two batched GEMMs (bmm,
    then baddbmm accumulating into y); under torch.compile, rows of a few tokens (decoding) go through two Triton
    kernels on the GPU (routed_kernels.routed_lora) that read each row's A and B from the stacks by slot, no copies.
  shared stacks (`AdaptedModel.prepare_routing()`; a static-cache `generate` prepares them itself)
    every adapter of the model stacked once per projection, slot i = the i-th adapter, zeros where an adapter skips
    a projection. A call then hands the layers one slot tensor (B,) — the same tensor at every call of B rows,
    rewritten in place (`_slot_buffer`) — and nothing else that depends on the mix, so a new mix copies no weights,
    and a compiled model — a static-cache `generate` compiles its decoding steps — traces once for every mix instead
    of once per mix (the per-routing path's Python reads the adapter names). The stacks are refreshed in place when
    an adapter weight changes (checked at each routed call, for the adapters it names, by the tensors' version
    counters), so their addresses — which a CUDA graph records — stay put. Only LoRA-only projections (one plain
    LoRA site per adapter, a linear base, no heads or fusions) take them, only without gradients and in eval mode;
    anything else runs the per-routing path. Memory: one more copy of the adapters' LoRA weights, every layer's
    stacks views into two flat buffers per model and (device, dtype) (`FLAT`), which a compiled call takes as its
    only inputs for them (`_share_all`); freed when the adapters change (`release`) and built again at the next
    routed call.
    The slots are published for the duration of an AdaptedModel call (`routed.CURRENT`); a call that bypasses it
    (`am.model(...)`) routes through the per-routing path, which checks the weights' versions itself. Compile the
    inner model (`am.model`, as transformers does for a static cache), not the AdaptedModel: its routing setup
    runs outside the compiled region only then. Where the compiled decoding steps replay CUDA graphs (a static-cache
    generate in transformers' default compile mode: `GRAPHED`), each projection runs its frozen GEMM and the routed
    delta on two streams (`side_by_side`): at 32 rows the delta's latency-bound kernels hide beside the GEMM,
    whose tiles leave most of the GPU idle (static decoding 1.56× → 1.35× the merged model's GPU time a step on
    the H200, bench/results/decode_7_ab_streams.json).
"""

from __future__ import annotations

import itertools
import operator
import weakref

import torch
from torch import nn

from . import compose, fused, overlap, routed_kernels
from .errors import UnipeftError
from .functions import SiteAdapter

#: each model's current slot tensor, by the model's key (`AdapterLayer.route`). Read from one place rather than
#: from each layer: an object every layer holds is reached by as many paths as there are layers, and a compiled
#: call then checks that they are the same object — one identity guard per layer, evaluated in Python at every
#: call (0.4 ms per decoding step at 112 projections). Published by AdaptedModel for the duration of one call and
#: set back to None when it returns; only no-grad calls read it, so no recompute under gradient checkpointing can
#: see another call's value. Keys are only ever added (a model's entry is set to None, never removed): dynamo
#: guards on the table's keys, so a model that prepares stacks after another was compiled costs that one a
#: recompile, and removing keys would cost one every time. The keys are plain ints, not the RouteKey objects: a
#: traced call looks the slots up by the int each layer holds, and torch 2.11's dynamo did not match an int against
#: a key of an int subclass — the lookup gave None in the trace, so a static-cache generate's compiled decoding ran
#: the per-routing path instead of the shared stacks (bench/results/gpu_fix_check_2_*.json).
CURRENT: dict[int, torch.Tensor | None] = {}
#: per model key (as CURRENT): whether the current call's compiled decoding steps replay CUDA graphs — a static-cache
#: generate that transformers compiles in a CUDA-graph mode ("reduce-overhead", its default). Only then do the
#: shared stacks' projections run the base GEMM and the routed delta on two streams (`side_by_side`): the opaque
#: op that switches streams runs its Python only while a graph is warmed up and recorded, not at its replays, where
#: a compiled call without graphs would run it at every step (the two-launch Triton op it replaces is launched from
#: the compiled code itself).
#: Published and reset with CURRENT; a traced call reads it once, as a constant (guarded by value).
GRAPHED: dict[int, bool] = {}
#: per model key (as CURRENT): the flat buffers that hold every layer's shared stacks, one (A, s·B) pair per
#: (device, dtype) of the model (`_share_all`); a compiled call slices a layer's stacks from them by offsets.
FLAT: dict[int, list[tuple[torch.Tensor, torch.Tensor]] | None] = {}
_KEYS = itertools.count()


class RouteKey(int):
    """A model's key in CURRENT. A deep copy of the model gets None instead (and its layers none either: see
    AdapterLayer.__getstate__, which also covers pickling), so that copies never read each other's slots — keys
    restart in every process, too; the copy routes through the per-routing path until it prepares its own stacks
    (a static-cache generate does that itself). The layers hold the key as a plain int: an object all of them
    shared would cost a compiled call one identity guard per layer."""

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self):
        return (_no_key, ())


def _no_key() -> None:
    return None


#: per layer: [layout key (`_layout`; kept for inspection), contents token, A stack, s·B stack, sites, place in FLAT
#: (group, A offset, A shape, B offset, B shape)] — the stacks are views into the model's flat buffers
SHARED = "_unipeft_shared_stacks"
ROWS = "_unipeft_shared_rows"  #: per-layer, eager: the current call's rows gathered from the shared stacks


# -- per-routing stacks --------------------------------------------------------------------------------------------
def lora(layer, x: torch.Tensor, items: list[tuple[str, SiteAdapter]]) -> torch.Tensor:
    """y = base(x) + x·A_rowᵀ·(s·B_row)ᵀ per batch row (zero for rows routed to the base or to an adapter with no
    site here)."""
    dtype, x_dtype = fused.compute_dtype(x), x.dtype
    y = fused.base_output(layer._modules["base_layer"], x)
    if x_dtype == dtype == y.dtype and torch.compiler.is_compiling() and routed_kernels.routed_available(x):
        a_stack, b_stack, rows = _operands(layer, items, x.shape[0], x.device, dtype, gathered=False)
        if routed_kernels.routed_available(x, a_stack):
            return routed_kernels.routed_lora(y, x, a_stack, b_stack, rows)
    a_rows, b_rows, _ = _operands(layer, items, x.shape[0], x.device, dtype, gathered=True)
    xa = torch.bmm(x if x_dtype == dtype else x.to(dtype), a_rows)
    y_dtype = y.dtype
    if y_dtype == dtype and not torch.is_grad_enabled():
        return y.baddbmm_(xa, b_rows)
    return torch.baddbmm(y.to(dtype), xa, b_rows).to(y_dtype)


def _operands(layer, items, batch: int, device: torch.device, dtype: torch.dtype, gathered: bool):
    """gathered: each row's Aᵀ (B, d_in, r) and (s·B)ᵀ (B, r, d_out), None; else the stacks and each row's slot
    (B,). Without gradients they are cached per routing, batch, dtype and form, so decoding steps reuse them until an
    adapter weight changes. The adapter tensors' version counters are compared once per Routing while its call is
    open — one model call, or one whole `generate` — not at every decoding step: with 32 adapters that was 64
    comparisons per projection per token, a fifth of a CPU-bound decode's host time. A Routing stays on the layers
    after its call; calls that bypass the AdaptedModel then compare the counters every time."""
    key = (layer.routing.key, batch, device, dtype, gathered)
    caching = not torch.is_grad_enabled() and not torch.compiler.is_compiling()  # (a tracer cannot read versions)
    cached = layer.__dict__.get("_unipeft_rows") if caching else None
    if cached is not None and cached[0] == key:
        if cached[3] is layer.routing and layer.routing.open:
            return cached[2]
        if _fresh(cached[1]):
            cached[3] = layer.routing  # checked for this call; later steps of it trust the cache
            return cached[2]
    a_stack, b_stack, snap = _stacks(layer, items, dtype)
    rows = layer.routing.row_index(tuple(n for n, _ in items), batch, device)
    if gathered:
        out = (a_stack.index_select(0, rows).transpose(1, 2), b_stack.index_select(0, rows).transpose(1, 2), None)
    else:
        out = (a_stack, b_stack, rows)
    if caching:
        layer.__dict__["_unipeft_rows"] = [key, snap, out, layer.routing]
    return out


def _snapshot(sites) -> tuple:
    """What a cache built from these LoRA sites' A and B depends on: (their modules, the tensors, the tensors'
    version counters). `_fresh` compares it: an in-place update bumps a counter, a replaced Parameter (assigned,
    or `load_state_dict(assign=True)`) is another object. (Writes through `.data` change neither: torch's autograd
    does not see them either.)"""
    owners = tuple(m for sa in sites for m in (sa.fn._modules["down"], sa.fn._modules["up"]))
    tensors = tuple(o._parameters["weight"] for o in owners)
    return owners, tensors, tuple(t._version for t in tensors)


_PARAMETERS = operator.attrgetter("_parameters")
_VERSION = operator.attrgetter("_version")


def _fresh(snap) -> bool:
    """Whether every tensor of the snapshot is still its module's weight, at the version seen. Mapped in C, with no
    Python frame per tensor: a routed call with 32 adapters on every projection of the benchmark model checks 7,168
    tensors (1.49 → 0.75 ms on the development CPU; cProfile put the generator at 8.6–11 ms of a static-cache
    generate on the H200's host, bench/results/decode_1.json, a figure the profiler's per-frame cost inflates)."""
    owners, tensors, seen = snap
    return tuple(map(_VERSION, tensors)) == seen and all(
        map(operator.is_, map(dict.get, map(_PARAMETERS, owners), itertools.repeat("weight")), tensors))


def _stacks(layer, items: list[tuple[str, SiteAdapter]], dtype: torch.dtype):
    """Stacked A (n+1, r_max, d_in) and s·B (n+1, d_out, r_max), the last slot zero, ranks padded with zeros, and
    the adapter tensors they came from. Cached while no gradient is recorded and no adapter weight changed (their
    version counters say so); rebuilt when training, so gradients reach every adapter."""
    caching = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    device = items[0][1].fn.down.weight.device  # (in the key: the model may have moved since)
    cached = layer.__dict__.get("_unipeft_stacks") if caching else None
    if cached is not None and cached[0] == (layer.routing.key, dtype, device) and _fresh(cached[1]):
        return cached[2], cached[3], cached[1]
    snap = _snapshot([sa for _, sa in items])
    params = [(a, b, float(sa.s)) for (_, sa), a, b in zip(items, snap[1][0::2], snap[1][1::2])]
    r_max = max(a.shape[0] for a, _, _ in params)
    d_in, d_out = params[0][0].shape[1], params[0][1].shape[0]
    a_list, b_list = [], []
    for a, b, s in params:
        pad = r_max - a.shape[0]
        a_list.append(nn.functional.pad(a.to(dtype), (0, 0, 0, pad)))
        b_list.append(nn.functional.pad((b * s).to(dtype), (0, pad)))
    a_list.append(a_list[0].new_zeros(r_max, d_in))
    b_list.append(b_list[0].new_zeros(d_out, r_max))
    a_stack, b_stack = torch.stack(a_list), torch.stack(b_list)
    if caching:
        layer.__dict__["_unipeft_stacks"] = ((layer.routing.key, dtype, device), snap, a_stack, b_stack)
    return a_stack, b_stack, snap


# -- shared stacks -------------------------------------------------------------------------------------------------
def _layout(layer, names: tuple[str, ...]) -> tuple | None:
    """What this layer's shared stacks over `names` look like — (key, present sites, dtype, device, slots, r_max,
    d_in, d_out) — or None when the layer cannot take them. The key changes with anything that changes the stacks'
    shapes or which modules fill them."""
    items = _shareable(layer, names)
    if items is None:
        return None
    present = [(i, sa) for i, sa in enumerate(items) if sa is not None]
    weight = present[0][1].fn.down.weight
    dtype, device = layer.base_layer.weight.dtype, weight.device  # (the base's dtype: what decoding computes in)
    r_max = max(sa.fn.down.weight.shape[0] for _, sa in present)
    d_in, d_out = weight.shape[1], present[0][1].fn.up.weight.shape[0]
    key = (names, dtype, tuple(id(sa) for sa in items), r_max, device)
    return key, present, dtype, device, len(names) + 1, r_max, d_in, d_out


#: elements: each layer's stacks start at a multiple of 64 elements in the flat buffers — 128 bytes in bf16/fp16, 256
#: in fp32 — so their pointers keep the alignment Triton specializes on
_ALIGN = 64


def _share_all(am, slot_key: int, names: tuple[str, ...]) -> int:
    """Shared stacks for every layer that can take them, as views into one flat A buffer and one flat s·B buffer
    per (device, dtype) of the model (FLAT), filled from the adapters. Returns how many layers have them.

    Why flat: a compiled call takes every tensor it reads from outside as an input, and each input costs host time
    at every call — up to ~2.4 µs before the CUDA-graph tree (dynamo's guards, AOT's wrappers) and ~0.5 µs in it,
    on the H200 machine's CPU (bench/decode_probe.py --split, bench/results/decode_9_split.json). Two stacks per
    projection were 224 inputs on the benchmark model, up to ~0.65 ms of each static decoding step there; the
    compiled call now reads the flat buffers and slices its views inside the graph (`_stacks_of`). The buffers are
    kept while the layout is the same (their addresses, which a CUDA graph records, stay put) and replaced when it
    changes."""
    layouts = {}
    for w in am._wrappers.values():
        layout = _layout(w, names)
        if layout is None:
            w.__dict__.pop(SHARED, None)
            w.__dict__.pop(ROWS, None)
        else:
            layouts[w] = layout
    signature = tuple((id(w), lay[0]) for w, lay in layouts.items())
    groups: dict[tuple, list[int]] = {}  # (device, dtype) -> [group index, A elements, B elements]
    places = {}
    for w, (_, _, dtype, device, slots_n, r_max, d_in, d_out) in layouts.items():
        g = groups.setdefault((device, dtype), [len(groups), 0, 0])
        a_shape, b_shape = (slots_n, r_max, d_in), (slots_n, d_out, r_max)
        places[w] = (g[0], g[1], a_shape, g[2], b_shape)
        g[1] += -(-slots_n * r_max * d_in // _ALIGN) * _ALIGN
        g[2] += -(-slots_n * d_out * r_max // _ALIGN) * _ALIGN
    flats = FLAT.get(slot_key)
    if flats is None or am.__dict__.get("_shared_signature") != signature:
        release(am)  # (the old buffers go before the new ones come: one copy of the stacks at a time)
        flats = []
        for (device, dtype), (_, a_len, b_len) in groups.items():
            with torch.inference_mode(False):  # (built under inference_mode they could never be refreshed outside it)
                pair = (torch.zeros(a_len, dtype=dtype, device=device), torch.zeros(b_len, dtype=dtype, device=device))
            if hasattr(torch, "_dynamo"):  # a CUDA graph of a compiled call keeps their addresses (cudagraph trees)
                for t in pair:
                    torch._dynamo.mark_static_address(t)
            flats.append(pair)
        FLAT[slot_key] = flats
        am.__dict__["_shared_signature"] = signature
    for w, layout in layouts.items():
        place = places[w]
        a_stack, b_stack = _stacks_of(flats, place)
        cached = [layout[0], None, a_stack, b_stack, layout[1], place]
        w.__dict__[SHARED] = cached
        _fill(cached)  # (its new contents token retires any eager rows gathered before)
    return len(layouts)


def release(am) -> None:
    """Free the model's shared stacks — every layer's views and the flat buffers — keeping the model prepared: the
    next routed call builds them again (`slots`). AdaptedModel calls this whenever its adapters change (added,
    removed, merged, activated), so a merged-away or removed adapter's stacked copy does not stay on the device."""
    for w in am._wrappers.values():
        w.__dict__.pop(SHARED, None)
        w.__dict__.pop(ROWS, None)
    key = am.__dict__.get("_route_key")
    if key is not None:
        FLAT[int(key)] = None
    am.__dict__.pop("_shared_signature", None)


def _stacks_of(flats: list, place: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's A stack (slots, r, d_in) and s·B stack (slots, d_out, r): views into its group's flat buffers."""
    g, a_off, a_shape, b_off, b_shape = place
    flat_a, flat_b = flats[g]
    a_len, b_len = a_shape[0] * a_shape[1] * a_shape[2], b_shape[0] * b_shape[1] * b_shape[2]
    return flat_a.narrow(0, a_off, a_len).view(a_shape), flat_b.narrow(0, b_off, b_len).view(b_shape)


def refresh(layer, only: set[int]) -> None:
    """Copy the adapter weights of the slots in `only` (adapters whose weights changed: `slots` finds them) into this
    layer's shared stacks, in place (their addresses stay). A model moved to another device or dtype since is
    rebuilt by `slots` before this runs (`_moved`: `am.to(...)` changes no version counter)."""
    cached = layer.__dict__.get(SHARED)
    if cached is not None:
        _fill(cached, only)


def _fill(cached: list, only: set[int] | None = None) -> None:
    """Copy the adapters' A and s·B into their slots (all, or the slots in `only`), then give the stacks a new
    contents token (a fresh object), which retires the eager rows gathered from the old contents (ROWS). Whether
    the adapters changed is watched per adapter across the model (`_watch`), not here."""
    a_stack, b_stack, present = cached[2], cached[3], cached[4]
    with torch.no_grad():
        for i, sa in present:
            if only is not None and i not in only:
                continue
            a, b = sa.fn.down.weight, sa.fn.up.weight
            r = a.shape[0]
            a_stack[i, :r].copy_(a)
            b_stack[i, :, :r].copy_(b * float(sa.s))
            if r < a_stack.shape[1]:  # (a rank below the stack's: its padding must be zero, whatever was there)
                a_stack[i, r:].zero_()
                b_stack[i, :, r:].zero_()
    cached[1] = object()


def _shareable(layer, names: tuple[str, ...]) -> list[SiteAdapter | None] | None:
    """Per slot, the adapter's one plain LoRA site here (None: no site), or None when the layer cannot share."""
    if len(layer.copies) or len(layer.fusions) or layer.merged or not len(layer.adapters) \
            or fused.base_kind(layer.base_layer) not in (fused.LINEAR, fused.CONV1D):
        return None
    if any(n not in names for n in layer.adapters):
        return None
    items: list[SiteAdapter | None] = []
    for n in names:
        sites = list(layer.sites_of(n))
        if len(sites) > 1 or (sites and not fused.simple_lora(sites[0], training=False)):
            return None
        items.append(sites[0] if sites else None)
    return items


def shared_lora(layer, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
    """The projection's output from the shared stacks (see the module docstring), or None when this layer has none
    or the call does not fit (then the per-routing path runs). Compiled: the routed kernel reads the stacks by slot
    (two launches; else a gather and two batched GEMMs). Eager: each row's weights are gathered once per call and
    reused by its decoding steps, then bmm + baddbmm_ — on a CPU-bound decoding step two aten launches cost less
    host time than one Triton launch (bench/routed_probe.py), and this path skips the per-routing plan."""
    cached = layer.__dict__.get(SHARED)
    if cached is None or x.dim() != 3:
        return None
    batch, n = x.shape[0], slots.shape[0]
    if batch % n:
        return None
    compiling = torch.compiler.is_compiling()
    # compiled: the views sliced inside the graph from the model's flat buffers (two inputs, not two per layer)
    a_stack, b_stack = _stacks_of(FLAT[layer.route], cached[5]) if compiling else (cached[2], cached[3])
    rows = None if compiling else layer.__dict__.get(ROWS)
    version = None if compiling else slots._version
    if rows is None or rows[0] is not cached[1] or rows[1] is not slots or rows[2] != batch or rows[3] != version:
        # eager: cached per call — keyed by its slot tensor and that tensor's version (one tensor per model and row
        # count, rewritten in place at each call: _slot_buffer), the batch, and the stacks' contents token (replaced
        # at every refill)
        per_row = slots if batch == n else slots.repeat_interleave(batch // n)  # (beam search expands rows)
        if per_row.device != x.device:  # (a model split across devices)
            per_row = per_row.to(x.device)
        rows = (cached[1], slots, batch, version, per_row)
    if compiling and GRAPHED.get(layer.route, False):
        out = side_by_side(layer, x, a_stack, b_stack, rows[4])
        if out is not None:
            return out
    y = fused.base_output(layer._modules["base_layer"], x)
    dtype = a_stack.dtype
    if compiling:
        if y.dtype == x.dtype == dtype and routed_kernels.routed_available(x, a_stack):
            return routed_kernels.routed_lora(y, x, a_stack, b_stack, rows[4])
        a_rows = a_stack.index_select(0, rows[4]).transpose(1, 2)
        b_rows = b_stack.index_select(0, rows[4]).transpose(1, 2)
    else:
        if len(rows) == 5:
            rows = (*rows, a_stack.index_select(0, rows[4]).transpose(1, 2),
                    b_stack.index_select(0, rows[4]).transpose(1, 2))
            layer.__dict__[ROWS] = rows
        a_rows, b_rows = rows[5], rows[6]
    xa = torch.bmm(x if x.dtype == dtype else x.to(dtype), a_rows)
    if y.dtype == dtype:
        return y.baddbmm_(xa, b_rows)
    return torch.baddbmm(y.to(dtype), xa, b_rows).to(y.dtype)


def side_by_side(layer, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor | None:
    """A CUDA-graphed decoding step's projection output (see GRAPHED) as the frozen GEMM and the routed delta side
    by side on two streams (routed_kernels.routed_linear), added here — the compiler fuses the add into the next
    kernel — or None when that does not apply: a base other than a hook-free nn.Linear in x's dtype, autocast on
    (the op's GEMM would not follow it), streams switched off (UNIPEFT_STREAMS=0), or a call the routed kernels do
    not take. The caller then runs the base GEMM and adds the delta on one stream as before (`routed_lora`'s two
    launches, or the gathered rows' batched GEMMs)."""
    base = layer._modules["base_layer"]
    if type(base) is not nn.Linear or not overlap.enabled() or not routed_kernels.routed_available(x, a_stack) \
            or not fused._unhooked(base) or torch.is_autocast_enabled(x.device.type):
        return None
    weight = base._parameters["weight"]
    if weight.dtype != x.dtype:
        return None
    y, delta = routed_kernels.routed_linear(x, weight, base._parameters["bias"], a_stack, b_stack, rows)
    return y + delta


# -- the model's side ----------------------------------------------------------------------------------------------
def hand_over(am, adapter_names: list | None, args: tuple, kwargs: dict, generating: bool = False):
    """Check `adapter_names` against the model and the batch, and hand the call's Routing (None: no routing) to
    every layer — and, when the model has shared stacks, the rows' slots (`publish`). Returns the Routing."""
    from .layer import BASE, Routing  # (at call time: layer imports this module)

    routing = slot_tensor = None
    graphed = False
    if adapter_names is not None:
        names = list(adapter_names)
        for n in names:
            if not isinstance(n, str):
                compose.check(am, n)
        unknown = sorted({n for n in names if isinstance(n, str) and n != BASE and n not in am.recipes})
        if unknown:
            raise UnipeftError(f"adapter_names has unknown adapter(s) {unknown}; adapters are "
                               f"{', '.join(am.recipes)} (or '{BASE}' for none)")
        batch = next((int(v.shape[0]) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)
                      and v.dim() >= 1), None)
        if batch is not None and batch != len(names):
            raise UnipeftError(f"adapter_names has {len(names)} entries but the batch has {batch} rows; give "
                               "one adapter name per row")
        if am.merged:
            raise UnipeftError(f"per-sample routing needs unmerged adapters; {', '.join(am.merged)} merged: "
                               "call unmerge() first")
        routing = Routing(names)
        shared = am.__dict__.get("_shared") if am.__dict__.get("_route_key") is not None else None
        # (generate runs without gradients, but turns them off only after this point)
        if shared is not None and (generating or not torch.is_grad_enabled()) \
                and not torch.compiler.is_compiling() and all(isinstance(n, str) for n in names):
            slot_tensor = slots(am, names, args, kwargs)
            graphed = generating and graphed_decoding(am.model, kwargs)
    elif not am.__dict__.get("_routed", False):
        # No layer holds a routing: nothing to clear. Touching every layer here would also cost a compiled call
        # a replayed write per layer and an identity guard per layer (each reached from both `_wrappers` and
        # the module tree), which dynamo evaluates in Python at every call.
        return None
    for w in am._wrappers.values():  # (a plain attribute: nn.Module.__setattr__'s checks cost ~1 µs per layer
        w.__dict__["routing"] = routing  # per call on a host-bound step)
    am.__dict__["_routed"] = routing is not None  # (a Routing stays on the layers until the next call)
    publish(am, slot_tensor, graphed)
    return routing


def prepare(am, enable: bool = True) -> int:
    """AdaptedModel.prepare_routing: shared stacks on every layer that can take them (slot order = the model's
    adapters), or none. Returns the number of layers that have them."""
    am.__dict__["_shared"] = None
    key = am.__dict__.get("_route_key")
    if key is None:
        key = am.__dict__["_route_key"] = RouteKey(next(_KEYS))
        weakref.finalize(am, CURRENT.__setitem__, int(key), None)  # (a deleted model's slots go with it)
        weakref.finalize(am, GRAPHED.__setitem__, int(key), False)
        weakref.finalize(am, FLAT.__setitem__, int(key), None)
    slot_key = int(key)  # (the plain int the table and the layers use, see CURRENT)
    CURRENT[slot_key] = None
    GRAPHED[slot_key] = False
    am.__dict__["_shared_watch"] = None
    if not enable:
        release(am)
        for w in am._wrappers.values():
            w.__dict__["route"] = None
        return 0
    names = tuple(am.recipes)
    count = _share_all(am, slot_key, names)
    for w in am._wrappers.values():  # (a plain int: dynamo guards it by value, not identity)
        w.__dict__["route"] = slot_key if SHARED in w.__dict__ else None
    am.__dict__["_shared"] = {n: i for i, n in enumerate(names)}
    am.__dict__["_shared_dirty"] = False
    _watch(am)
    return count


def _watch(am, names: list[str] | None = None) -> None:
    """Per adapter, its stacked tensors across all the model's shared stacks in one snapshot (`_snapshot`), compared
    as one flat list when a call names the adapter (a loop per layer cost 1.4 ms per call at 112 projections × 32
    adapters on the CPU machine). Per adapter, so that a call checks the adapters it names and no others: the
    check's cost follows the mix, not the number of adapters the model holds (7,168 tensors for 32 adapters here;
    done before the call's first kernel, so nothing hides it: bench/routed_lead_probe.py). `names`: re-snapshot
    only these, after their slots were refilled."""
    order = am.__dict__["_shared"]
    by_slot: dict[int, list[SiteAdapter]] = {}
    for w in am._wrappers.values():
        cached = w.__dict__.get(SHARED)
        if cached is not None:
            for i, sa in cached[4]:
                by_slot.setdefault(i, []).append(sa)
    watch = {} if names is None else dict(am.__dict__["_shared_watch"])
    for n, i in order.items():
        if names is None or n in names:
            watch[n] = _snapshot(by_slot.get(i, []))
    am.__dict__["_shared_watch"] = watch


def publish(am, slots: torch.Tensor | None, graphed: bool = False) -> None:
    """This call's slots for the model's layers (None: the call does not use the shared stacks), and whether its
    compiled decoding steps replay CUDA graphs (GRAPHED)."""
    key = am.__dict__.get("_route_key")
    if key is not None:
        slot_key = int(key)
        if CURRENT.get(slot_key) is not slots:
            CURRENT[slot_key] = slots
        if GRAPHED.get(slot_key) is not graphed:
            GRAPHED[slot_key] = graphed


def graphed_decoding(model: nn.Module, kwargs: dict) -> bool:
    """Whether a generate call's decoding steps are compiled into CUDA graphs: a static cache (`static_cache`),
    compilation not disabled (`disable_compile`), and transformers' compile config (the call's `compile_config`,
    else the generation config's, else its default, "reduce-overhead" with Inductor) with graphs: Inductor in mode
    "reduce-overhead" or "max-autotune", or with no mode and `options={"triton.cudagraphs": True}` (torch.compile
    takes a mode or options, not both), or the "cudagraphs" backend. A wrong answer costs speed, not results."""
    if not static_cache(model, kwargs):
        return False
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if kwargs.get("disable_compile", getattr(config, "disable_compile", False)):
        return False
    compile_config = kwargs.get("compile_config") or getattr(config, "compile_config", None)
    if compile_config is None:
        return True  # (transformers' default CompileConfig)
    backend, mode = getattr(compile_config, "backend", "inductor"), getattr(compile_config, "mode", None)
    if backend == "cudagraphs":
        return True
    if backend != "inductor":
        return False
    if mode is None:
        return bool((getattr(compile_config, "options", None) or {}).get("triton.cudagraphs", False))
    return mode in ("reduce-overhead", "max-autotune")


def slots(am, names: list[str], args: tuple, kwargs: dict) -> torch.Tensor:
    """Each row's slot in the shared stacks (the base's: one past the last adapter), after bringing the stacks up to
    date: rebuilt if adapters were added, removed, activated or merged since; the slots of the adapters this call
    names refreshed in place if their weights changed (an adapter no call names stays as it was until one does)."""
    watch = am.__dict__.get("_shared_watch")
    if am.__dict__.get("_shared_dirty", False) or watch is None or _moved(am):
        prepare(am)
    else:
        stale = [n for n in dict.fromkeys(names) if n in watch and not _fresh(watch[n])]
        if stale:
            order = am.__dict__["_shared"]
            only = {order[n] for n in stale}
            for w in am._wrappers.values():
                refresh(w, only)
            _watch(am, stale)
    shared = am.__dict__["_shared"]
    device = next((v.device for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
    return _slot_buffer(am, [shared.get(n, len(shared)) for n in names], device)


def _slot_buffer(am, values: list[int], device: torch.device | None) -> torch.Tensor:
    """The model's slot tensor for this many rows on this device, its values set to `values` in place.

    One tensor per (device, rows), kept for the model's life: a compiled call reads the slots from a global
    (CURRENT), which dynamo takes as a static input, and Inductor's CUDA-graph trees record a step's graph again
    whenever a static input's address changes. A fresh tensor per call was one reason every static-cache generate
    recorded its first decoding step anew and kept that graph (bench/results/churn_1_reasons.json; transformers'
    own decoding inputs give another, for the merged model too; no time change was measurable, churn_3_ab_*). The
    in-place copy bumps the tensor's version counter, which keeps the eager per-call row cache (ROWS) apart."""
    buffers = am.__dict__.setdefault("_slot_buffers", {})
    key = (device, len(values))
    buf = buffers.get(key)
    if buf is None:
        with torch.inference_mode(False):  # (made under inference_mode it could not be written outside it)
            buf = torch.empty(len(values), dtype=torch.long, device=device)
        if hasattr(torch, "_dynamo"):
            torch._dynamo.mark_static_address(buf)
        buffers[key] = buf
    buf.copy_(torch.tensor(values, dtype=torch.long))
    return buf


def _moved(am) -> bool:
    """Whether the model went to another device or dtype since its stacks were built (`am.to(...)` changes no
    version counter): one layer tells, as `to` moves them all."""
    for w in am._wrappers.values():
        cached = w.__dict__.get(SHARED)
        if cached is not None:
            weight = w.base_layer.weight
            return cached[2].device != weight.device or cached[2].dtype != weight.dtype
    return False


def static_cache(model: nn.Module, kwargs: dict) -> bool:
    """Whether a generate call decodes with a compilable (static) cache — transformers compiles those steps. (A cache
    object comes as `cache=`, transformers 5's name, or `past_key_values=`, the older one.)"""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:
        return bool(getattr(cache, "is_compileable", False)) and type(cache).__name__ != "DynamicCache"
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    return implementation in ("static", "offloaded_static", "sliding_window", "hybrid")
