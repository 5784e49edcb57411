"""Composition blocks: `Stack`, `Average` and `Fuse`, usable in `am.activate(...)` and in `adapter_names=`.

A block is a function of the representation h at a site (x is the site's source: the projection or sublayer input):

    "a"                 h ↦ a(h)                              (the adapter's own composition: h + Δ, h ⊙ v, ...)
    Stack(u₁, …, uₖ)    h ↦ uₖ(…u₁(h))                        (the output of one feeds the next: language + task)
    Average(u₁, …; w)   h ↦ h + Σ wᵢ·(uᵢ(h) − h)              (w defaults to 1/k each: the mean of the outputs)
    Fuse(a₁, …, aₖ)     h ↦ h + Σ αᵢ·(Δᵢ·W_v),  Δᵢ = aᵢ(h) − h,  α = softmax_i((h·W_q)·((h + Δᵢ)·W_k)ᵀ/√d)
                        (AdapterFusion, Pfeiffer et al. 2021: attention over the adapters' outputs, per token and
                        per layer; W_v starts at the identity and W_q, W_k near zero, so it starts as the mean)

Blocks nest (Average(Stack("lang", "task"), "other")). What each block accepts as members:

- Stack: any adapter acting on projection outputs or sublayers, additive or multiplicative (not prefix / prompt /
  projection-input scaling).
- Average: additive adapters (lowrank, bottleneck with add / scaled / gated) on projection outputs or parallel
  sublayers.
- Fuse: additive adapters on sublayer outputs — sequential bottlenecks (houlsby, pfeiffer), LoRA on o / down.

Anything else is refused with the reason when the block is activated or added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UnipeftError


@dataclass(frozen=True, init=False)
class Stack:
    units: tuple

    def __init__(self, *units) -> None:
        object.__setattr__(self, "units", tuple(units))

    def __repr__(self) -> str:
        return f"Stack({', '.join(map(repr, self.units))})"


@dataclass(frozen=True, init=False)
class Average:
    units: tuple
    weights: tuple = field(default=())

    def __init__(self, *units, weights=None) -> None:
        object.__setattr__(self, "units", tuple(units))
        w = tuple(float(x) for x in weights) if weights is not None else tuple(1.0 / len(units) for _ in units)
        object.__setattr__(self, "weights", w)

    def __repr__(self) -> str:
        return f"Average({', '.join(map(repr, self.units))}, weights={list(self.weights)})"


@dataclass(frozen=True, init=False)
class Fuse:
    units: tuple

    def __init__(self, *names) -> None:
        object.__setattr__(self, "units", tuple(names))

    @property
    def name(self) -> str:
        """The fusion's parameters live under this name (one fusion per set of adapters)."""
        return "fuse_" + "_".join(self.units)

    def __repr__(self) -> str:
        return f"Fuse({', '.join(map(repr, self.units))})"


BLOCKS = (Stack, Average, Fuse)


def adapter_names(unit) -> list[str]:
    """Every adapter a unit uses, in order, each once."""
    if isinstance(unit, str):
        return [unit]
    out: list[str] = []
    for u in unit.units:
        out += [n for n in adapter_names(u) if n not in out]
    return out


def to_json(unit):
    """A unit as JSON: a name, {"stack": [...]}, {"average": [...], "weights": [...]} or {"fuse": [...]}."""
    if isinstance(unit, str):
        return unit
    key = type(unit).__name__.lower()
    out = {key: [to_json(u) for u in unit.units]}
    if isinstance(unit, Average):
        out["weights"] = list(unit.weights)
    return out


def from_json(data):
    if isinstance(data, str):
        return data
    if isinstance(data, dict) and len(set(data) - {"weights"}) == 1:
        key = next(k for k in data if k != "weights")
        units = [from_json(u) for u in data[key]] if isinstance(data[key], list) else None
        if units is not None and key == "stack":
            return Stack(*units)
        if units is not None and key == "average":
            return Average(*units, weights=data.get("weights"))
        if units is not None and key == "fuse":
            return Fuse(*units)
    raise UnipeftError(f"not a saved composition unit: {data!r}")


def check(am, unit, inside: str | None = None) -> None:
    """Refuse a unit the engine cannot compute, with the reason (see the module's support matrix)."""
    if isinstance(unit, str):
        if unit not in am.recipes:
            raise UnipeftError(f"no adapter '{unit}'; adapters are {', '.join(am.recipes) or 'none'}")
        if inside is None:
            return
        recipe = am.recipes[unit]
        for p in recipe.parts:
            if p.function in ("prefix", "tokens") or any(s.endswith("_in") for s in p.sites) or \
                    any(t.endswith(":in") for t in p.targets):
                raise UnipeftError(f"{inside} cannot hold '{unit}': its part '{p.name}' ({p.function} at "
                                   f"{', '.join(p.sites or p.targets)}) does not act on an output representation")
            if inside in ("Average", "Fuse") and (p.function not in ("lowrank", "bottleneck") or
                                                  p.composition not in ("add", "scaled", "gated")):
                raise UnipeftError(f"{inside} needs additive adapters (h + Δ); '{unit}' part '{p.name}' is "
                                   f"{p.function} with {p.composition}")
            on_output = all(s in ("o", "down") or (s in ("attn", "ffn") and p.insertion == "sequential")
                            for s in p.sites)
            if inside == "Fuse" and (p.targets or not on_output):
                raise UnipeftError(f"Fuse combines deltas on sublayer outputs (sequential attn/ffn adapters, LoRA on o "
                                   f"or down); '{unit}' part '{p.name}' acts at {', '.join(p.sites or p.targets)}")
        return
    if not isinstance(unit, BLOCKS):
        raise UnipeftError(f"activate takes adapter names or blocks (Stack, Average, Fuse), not {type(unit).__name__}")
    kind = type(unit).__name__
    if not unit.units:
        raise UnipeftError(f"{kind}() needs at least one member")
    if isinstance(unit, Average) and len(unit.weights) != len(unit.units):
        raise UnipeftError(f"Average has {len(unit.units)} members but {len(unit.weights)} weights")
    if isinstance(unit, Fuse):
        if not all(isinstance(u, str) for u in unit.units) or len(set(unit.units)) != len(unit.units):
            raise UnipeftError("Fuse takes distinct adapter names (not blocks)")
        if unit.name not in am.fusions:
            raise UnipeftError(f"no fusion over {', '.join(unit.units)}; add it first: am.add_fusion({unit!r})")
    strictness = {None: 0, "Stack": 1, "Average": 2, "Fuse": 3}
    context = kind if strictness[kind] > strictness[inside] else inside
    for u in unit.units:
        check(am, u, context)


class FusionLayer(nn.Module):
    """AdapterFusion at one site: query from h, keys from each adapter's output h + Δᵢ, values Δᵢ·W_v."""

    def __init__(self, d: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.query = nn.Linear(d, d, bias=False, dtype=dtype, device=device)
        self.key = nn.Linear(d, d, bias=False, dtype=dtype, device=device)
        self.value = nn.Linear(d, d, bias=False, dtype=dtype, device=device)
        nn.init.normal_(self.query.weight, std=0.02)
        nn.init.normal_(self.key.weight, std=0.02)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(d, dtype=dtype, device=device))

    def forward(self, h: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
        dt = self.query.weight.dtype
        q = self.query(h.to(dt))  # (..., d)
        stacked = torch.stack([d.to(dt) for d in deltas], dim=-2)  # (..., k, d)
        k = self.key(h.to(dt)[..., None, :] + stacked)
        scores = (k @ q[..., :, None]).squeeze(-1) / math.sqrt(q.shape[-1])  # (..., k)
        alpha = torch.softmax(scores, dim=-1)
        mixed = (alpha[..., None] * self.value(stacked)).sum(dim=-2)
        return h + mixed.to(h.dtype)


def apply(unit, h: torch.Tensor, one, fusion) -> torch.Tensor:
    """Evaluate a unit on h: `one(name, h)` applies one adapter's sites here; `fusion(fuse, h, deltas)` a fusion."""
    if isinstance(unit, str):
        return one(unit, h)
    if isinstance(unit, Stack):
        for u in unit.units:
            h = apply(u, h, one, fusion)
        return h
    if isinstance(unit, Average):
        out = h
        for u, w in zip(unit.units, unit.weights):
            out = out + w * (apply(u, h, one, fusion) - h)
        return out
    deltas = [apply(u, h, one, fusion) - h for u in unit.units]
    return fusion(unit, h, deltas)


def delta(unit, x: torch.Tensor, one_delta) -> torch.Tensor | None:
    """For parallel sublayer sites, whose Δ depends only on the input x: the unit's total Δ (None: nothing here)."""
    if isinstance(unit, str):
        return one_delta(unit, x)
    if isinstance(unit, Fuse):
        raise UnipeftError("Fuse needs the sublayer output as its query; it does not apply to parallel sublayer sites")
    parts = [delta(u, x, one_delta) for u in unit.units]
    weights = unit.weights if isinstance(unit, Average) else (1.0,) * len(parts)
    total = None
    for d, w in zip(parts, weights):
        if d is not None:
            total = w * d if total is None else total + w * d
    return total
