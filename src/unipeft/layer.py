"""The one layer wrapper: a frozen module kept as `base_layer`, plus the adapters acting on it.

Every site kind goes through this class — there is no subclass per layer type or per method. What an adapter does
here is fixed by its binding's role:

  out     projection output:  h = base(x);  h ← compose(h, f(x_src)) for each adapter, x_src = x (parallel) or h
  in      projection input:   x ← x ⊙ v before the base call (IA3 on the FFN down projection)
  block   parallel sublayer:  Δh = f(sublayer input) joins the sublayer output (or, for post-LN blocks that add the
          residual themselves, joins the residual argument — the same sum before the LayerNorm)
  prefix  attention keys/values: published to the attention function (prefix.py) for the duration of this call
  embed   input embeddings: holds prompt tokens; the AdaptedModel places them before the input
  copy    an extra trainable module (e.g. a classifier head): each adapter has its own copy

Per-call state (which rows use which adapter) is handed in explicitly by `AdaptedModel` through `set_routing` and kept
until the next call, so recomputation under gradient checkpointing sees the same routing as the forward did.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import compose, fused, routed
from .functions import SiteAdapter
from .recipe import ALL_SITES

BASE = "__base__"  #: the adapter name that means "no adapter" in per-sample routing


@dataclass
class Routing:
    """One adapter name per batch row. `rows(name, batch)` gives that adapter's row indices (repeated when the batch
    was expanded, e.g. by beam search); None when `name` has no rows.

    Index tensors are cached per call, but never from inside a compiled region: stored there, a tensor the graph made
    would outlive the call — under CUDA graphs (a static-cache `generate`'s compiled decoding steps) that is memory
    the next replay overwrites. A traced call builds them in the graph instead (constants: the names are guarded)."""

    names: list[str]
    _cache: dict = field(default_factory=dict)
    key: tuple = field(init=False)
    #: True while the AdaptedModel call that set it runs (caches may trust checks made earlier in the same call)
    open: bool = True

    def __post_init__(self) -> None:
        self.key = tuple(self.names)

    def rows(self, name: str, batch: int, device: torch.device) -> torch.Tensor | None:
        key = (name, batch, device)
        if key in self._cache:
            return self._cache[key]
        n = len(self.names)
        idx = [i for i, a in enumerate(self.names) if a == name]
        t = None
        if idx:
            t = torch.tensor(idx, dtype=torch.long)
            if batch != n and batch % n == 0:
                k = batch // n
                t = (t[:, None] * k + torch.arange(k)[None, :]).reshape(-1)
            t = t.to(device)
        return self._keep(key, t)

    def row_index(self, names: tuple[str, ...], batch: int, device: torch.device) -> torch.Tensor:
        """For each batch row, the position of its adapter in `names` (len(names) for rows of none of them); built
        once per call and shared by every layer (the fused mixed-batch path gathers adapter weights with it)."""
        key = ("index", names, batch, device)
        if key in self._cache:
            return self._cache[key]
        index = [len(names)] * len(self.names)
        for i, name in enumerate(self.names):
            if name in names:
                index[i] = names.index(name)
        t = torch.tensor(index, dtype=torch.long)
        if batch != len(self.names) and batch % len(self.names) == 0:
            t = t.repeat_interleave(batch // len(self.names))
        return self._keep(key, t.to(device))

    def _keep(self, key: tuple, value: torch.Tensor | None) -> torch.Tensor | None:
        if not torch.compiler.is_compiling():  # (see the class docstring)
            self._cache[key] = value
        return value


class AdapterLayer(nn.Module):
    """Thin wrapper. `adapters[name][part][site]` holds SiteAdapters; `copies[name]` holds trainable module copies."""

    _unipeft_wrapper = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.copies = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        self.active: list = []
        self.merged: list[str] = []
        self.routing: Routing | None = None
        #: the model's key in routed.CURRENT, set while the model has shared stacks (routed.py)
        self.route: int | None = None
        self.prefix_call: tuple[list[tuple[str, SiteAdapter]], torch.Tensor | None] | None = None
        self.holds_prompt = False  #: whether any adapter here has prompt tokens (lets a model call skip the rest)

    def __getstate__(self) -> dict:
        """A copy (copy.deepcopy, pickle) keeps no routing key and no shared stacks: it must not read its original's
        slots from routed.CURRENT (routed.RouteKey)."""
        state = dict(self.__dict__)
        state["route"] = None
        state.pop(routed.SHARED, None)
        state.pop(routed.ROWS, None)
        state.pop(fused.LEAN, None)
        return state

    # -- bookkeeping ---------------------------------------------------------------------------------------------------
    def add_site(self, name: str, sa: SiteAdapter) -> None:
        if name not in self.adapters:
            self.adapters[name] = nn.ModuleDict()
        parts = self.adapters[name]
        if sa.part_name not in parts:
            parts[sa.part_name] = nn.ModuleDict()
        parts[sa.part_name][_site_key(sa)] = sa
        self.holds_prompt = self.holds_prompt or sa.role == "embed"
        self._forget_plan()

    def sites_of(self, name: str) -> Iterator[SiteAdapter]:
        if name in self.adapters:
            for part in self.adapters[name].values():
                yield from part.values()

    def has(self, name: str) -> bool:
        return name in self.adapters or name in self.copies

    def remove(self, name: str) -> None:
        for d in (self.adapters, self.copies):
            if name in d:
                del d[name]
        self.active = [a for a in self.active if a != name]
        self._forget_plan()

    def is_empty(self) -> bool:
        return not self.adapters and not self.copies

    def _in_effect(self) -> list:
        """Units (adapter names or composition blocks) that act in this call: the routed ones, or the active unmerged
        ones in activation order."""
        if self.routing is not None:
            return [u for u in dict.fromkeys(self.routing.names) if u != BASE and self._touches(u)]
        return [u for u in self.active if self._touches(u) and u not in self.merged]

    def _touches(self, unit) -> bool:
        return any(self.has(n) for n in compose.adapter_names(unit))

    def _rows(self, name: str, batch: int, device: torch.device) -> torch.Tensor | None:
        return None if self.routing is None else self.routing.rows(name, batch, device)

    def _forget_plan(self) -> None:
        self.__dict__.pop("_unipeft_plan", None)
        self.__dict__.pop("_unipeft_stacks", None)
        self.__dict__.pop("_unipeft_rows", None)
        self.__dict__.pop(routed.SHARED, None)
        self.__dict__.pop(routed.ROWS, None)
        self.__dict__.pop(fused.LEAN, None)

    def _warm_lean(self) -> None:
        """Cache (train mode, A's module, B's module, s) when this projection's plan is one plain LoRA on a hook-free
        linear base with nothing routed or copied — what a compiled call's fused path reads instead of the plan
        (AdaptedModel calls this after every change and on train()/eval(); `_forget_plan` drops it). The modules,
        not their weights: a weight replaced by a new Parameter is still the one read (fused.lean_weights).

        Why: dynamo guards every Python value a traced call reads, and evaluates those guards before every compiled
        step. The plan walk — the key (routing, active and merged sets, mode), the head-copies dict, the plan's
        nested tuples, the site module down to A and B — was ~25 of a projection's ~60 guard nodes, and a grouped
        member's walk was guarded twice (from the module tree and from its group). Measured on the H200 (953M
        model, compiled step against the frozen floor, in turn with the code before): 1.1251 → 1.1066×
        (bench/results/ab_7_compiled_lean_modules.json); skipping guard evaluation altogether gave 1.1125 → 1.0974×
        (ab_4). A stale entry cannot be used: the traced call compares the cached mode with `training` and checks
        that nothing is routed (guarded like any read)."""
        self.__dict__.pop(fused.LEAN, None)
        if self.routing is not None or self.route is not None or len(self._modules["copies"]):
            return
        items, _, fast, _ = self._plan()
        if fast == fused.LINEAR and len(items) == 1 and fused._unhooked(self._modules["base_layer"]):
            sa = items[0][1]
            fn = sa._modules["fn"]
            self.__dict__[fused.LEAN] = (self.training, fn._modules["down"], fn._modules["up"], float(sa.s))

    def _plan(self) -> tuple[list[tuple[str, SiteAdapter]], set[str], str, list]:
        """(items in effect, their roles, the fused path's kind — "" when it does not apply, never under blocks —,
        the units), cached per routing / active set / merge state / train mode, so a call's Python cost does not
        grow with the number of adapters."""
        key = (None if self.routing is None else self.routing.key, tuple(self.active), tuple(self.merged),
               self.training)
        cached = self.__dict__.get("_unipeft_plan")
        if cached is not None and cached[0] == key:
            return cached[1]
        units = self._in_effect()
        names = dict.fromkeys(n for u in units for n in compose.adapter_names(u))
        items = [(n, sa) for n in names for sa in self.sites_of(n)]
        composed = any(not isinstance(u, str) for u in units)
        plan = (items, {sa.role for _, sa in items}, "" if composed else fused.fusable(self, items), units)
        if not torch.compiler.is_compiling():  # (a tracer computes it at trace time; storing it there would be a
            self.__dict__["_unipeft_plan"] = (key, plan)  # side effect, refused inside a checkpointed region)
        return plan

    # -- forward -------------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # the cached operands instead of the plan: fewer guards (_warm_lean)
            lean = fused.cached_operands(self)
            if lean is not None and fused.enabled():
                out = fused.lean_forward(self, args[0] if args else next(iter(kwargs.values())), lean)
                if out is not None:
                    return out
        if len(self._modules["copies"]):  # (dict access: this is every adapted call's hot path)
            wanted = dict.fromkeys(self.routing.names) if self.routing is not None else self.active
            copies = []  # (unit, the head copy it uses: the last of its adapters that has one)
            for u in wanted:
                own = [n for n in compose.adapter_names(u) if n in self.copies] if u != BASE else []
                if isinstance(u, compose.Fuse) and u.name in self.copies:
                    own = [u.name]  # a fusion's own head
                if own:
                    copies.append((u, own[-1]))
            return self._forward_copies(copies, args, kwargs) if copies else self.base_layer(*args, **kwargs)
        route = self.route
        if route is not None:  # shared stacks (routed.py): nothing here reads which adapters the rows name
            slots = routed.CURRENT.get(route)
            if slots is not None and not self.training and not torch.is_grad_enabled() and fused.enabled():
                out = routed.shared_lora(self, args[0] if args else next(iter(kwargs.values())), slots)
                if out is not None:
                    return out
        items, roles, fast, units = self._plan()
        if not items:
            return self.base_layer(*args, **kwargs)
        if fast and fused.enabled():
            x = args[0] if args else next(iter(kwargs.values()))
            out = fused.forward(self, x, items, fast)
            if out is not None:
                return out
        if roles & {"out", "in"}:
            return self._forward_projection(args, kwargs, units)
        if roles & {"block", "prefix"}:
            return self._forward_block(args, kwargs, items, units)
        return self.base_layer(*args, **kwargs)

    def _routed(self, name: str, h: torch.Tensor, fn) -> torch.Tensor:
        """Apply fn (rows → new rows) to this adapter's rows only; all rows when not routing."""
        if self.routing is None:
            return fn(slice(None))
        idx = self._rows(name, h.shape[0], h.device)
        if idx is None:
            return h
        return h.index_copy(0, idx, fn(idx))

    def _forward_projection(self, args, kwargs, units) -> torch.Tensor:
        """The reference path for projections: each unit (an adapter name or a block) maps the output h to h'
        (compose.apply), routed to its rows; input scaling first."""
        x = args[0] if args else next(iter(kwargs.values()))
        x_in = x
        for u in units:  # projection-input scaling comes only from plain adapter units (blocks refuse it)
            if isinstance(u, str):
                for sa in self.sites_of(u):
                    if sa.role == "in":
                        x_in = self._routed(u, x_in, lambda r, sa=sa, xi=x_in: xi[r] * sa.input_factor().to(xi.dtype))
        base, base_out = self.base_layer, self.base_layer(x_in)

        def fusion(f, hh, deltas):
            return self.fusions[f.name](hh, deltas) if f.name in self.fusions else hh

        h = base_out
        for u in units:
            def run(r, u=u, h=h):
                xr, br = x[r], base_out[r]

                def one(n, hh):
                    for sa in self.sites_of(n):
                        if sa.role == "out":
                            hh = sa.apply_out(hh, xr, br, base)
                    return hh

                return compose.apply(u, h[r], one, fusion)

            h = self._routed(u, h, run)
        return h

    def _forward_block(self, args, kwargs, items, units):
        """Parallel sublayer adapters (their Δ depends only on the sublayer input x) and prefixes."""
        block_items = [(n, sa) for n, sa in items if sa.role == "block"]
        prefix_items = [(n, sa) for n, sa in items if sa.role == "prefix"]
        args = list(args)
        block = block_items[0][1].block if block_items else None
        if block is not None:
            in_kwargs = block.arg in kwargs
            x = kwargs[block.arg] if in_kwargs else args[block.position]
        else:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)

        def one_delta(n, xr):
            total = None
            for sa in self.sites_of(n):
                if sa.role == "block":
                    c = sa.contribution(xr)
                    total = c if total is None else total + c
            return total

        def add_units(t: torch.Tensor) -> torch.Tensor:
            for u in units:
                def run(r, u=u, t=t):
                    d = compose.delta(u, x[r], one_delta)
                    return t[r] if d is None else t[r] + d

                t = self._routed(u, t, run)
            return t

        residual = block is not None and block.mode == "residual"
        if residual:
            new_x = add_units(x)
            if in_kwargs:
                kwargs[block.arg] = new_x
            else:
                args[block.position] = new_x
        self.prefix_call = (prefix_items, x) if prefix_items else None
        try:
            out = self.base_layer(*args, **kwargs)
        finally:
            self.prefix_call = None
        if block is None or residual:
            return out
        h = add_units(out[0] if isinstance(out, tuple) else out)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def _forward_copies(self, copies, args, kwargs):
        """A trained head copy per unit (the last adapter of a block that has one). Without routing the active units
        compose as one Stack, so the head is the last unit's — activate("a", "b") and Stack("a", "b") agree."""
        if self.routing is None:
            return self.copies[copies[-1][1]](*args, **kwargs)
        out = self.base_layer(*args, **kwargs)
        for unit, name in copies:
            idx = self._rows(unit, out.shape[0], out.device)
            if idx is not None:
                out = out.index_copy(0, idx, self.copies[name](*args, **kwargs)[idx])
        return out

    # -- merge ---------------------------------------------------------------------------------------------------------
    def reads_weight(self, name: str) -> str:
        """What of adapter `name` here reads the frozen weight as it is ("" if nothing): DoRA's row norms, or an
        input scaling (applied to the base's input before every other adapter). Merging another adapter under
        either changes what it computes (merging.check refuses that)."""
        for sa in self.sites_of(name):
            if hasattr(sa, "magnitude"):
                return "DoRA's norm"
            if sa.role == "in":
                return "an input scaling"
        return ""

    def merge(self, name: str) -> None:
        for sa in self.sites_of(name):
            sa.merge_into(self.base_layer)
        self.merged.append(name)
        self._forget_plan()

    def unmerge(self, name: str) -> None:
        for sa in reversed(list(self.sites_of(name))):
            sa.unmerge_from(self.base_layer)
        self.merged.remove(name)
        self._forget_plan()


def _site_key(sa: SiteAdapter) -> str:
    """ModuleDict keys may not contain dots: named sites keep their name; module-name targets use their role."""
    return sa.site if sa.site in ALL_SITES else sa.role
