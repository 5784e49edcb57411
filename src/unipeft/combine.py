"""Weight-space merges of adapters into a new adapter: `unipeft.combine(am, {"a": 0.7, "b": 0.3}, method=...)`.

For low-rank adapters, with ΔWᵢ = sᵢ·Bᵢ·Aᵢ at every site (weights may be negative: task negation):

    linear  exact: A = [A₁; A₂; …], B = [w₁s₁B₁, w₂s₂B₂, …] — rank Σrᵢ, and B·A = Σ wᵢ·ΔWᵢ exactly.
            (peft's "linear" averages A and B separately, which is not Σ wᵢΔWᵢ.)
    svd     Σ wᵢ·ΔWᵢ re-factorised by a truncated SVD to `rank` (default: the largest rᵢ): B = U·√S, A = √S·Vᵀ,
            the best rank-k approximation in Frobenius norm.
    ties    TIES-merging (Yadav et al. 2023) on the task matrices τᵢ = wᵢ·ΔWᵢ: keep each τᵢ's top `density` fraction
            of entries by magnitude, elect each entry's sign as the sign of the sum of the kept entries, average the
            kept entries that agree with it; then factorise to `rank` by SVD.

The new adapter is a scale-1 low-rank recipe on exactly the sites the inputs covered (a site one input lacks gets
ΔW = 0 from it). Bottleneck adapters combine only by `linear` parameter averaging Σ wᵢ·θᵢ, and only when every input
has the same recipe shape (the same parameters with the same shapes); anything else is a one-line error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .arch import resolve
from .errors import UnipeftError
from .recipe import ALL_SITES, Part, Recipe

METHODS = ("linear", "svd", "ties")


def combine(am, weights: Mapping[str, float], method: str = "linear", name: str = "combined",
            rank: int | None = None, density: float = 0.2):
    """Add adapter `name` to `am` (not activated) built from `weights` {adapter: weight}; returns `am`."""
    if method not in METHODS:
        raise UnipeftError(f"combine method '{method}' is not one of {', '.join(METHODS)}")
    if not weights:
        raise UnipeftError("combine needs at least one adapter and its weight, e.g. {'a': 0.5, 'b': 0.5}")
    for n, w in weights.items():
        am._require(n)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise UnipeftError(f"the weight of '{n}' must be a number, not {w!r}")
        if n in am.merged:
            raise UnipeftError(f"adapter '{n}' is merged into the weights; unmerge it before combining")
    if name in am.recipes:
        raise UnipeftError(f"adapter '{name}' already exists; choose another name")
    if not 0.0 < density <= 1.0:
        raise UnipeftError("density must be in (0, 1]")
    functions = {p.function for n in weights for p in am.recipes[n].parts}
    if functions == {"bottleneck"}:
        if method != "linear":
            raise UnipeftError(f"bottleneck adapters combine only by 'linear' parameter averaging, not '{method}'")
        return _average_parameters(am, weights, name)
    if functions != {"lowrank"}:
        raise UnipeftError(f"combine works on low-rank (LoRA-family) or on bottleneck adapters alone; these use "
                           f"{', '.join(sorted(functions))}")
    entries = _lowrank_sites(am, weights)
    factors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, terms in entries.items():
        down = torch.cat([a.float() for _, a, _ in terms])
        up = torch.cat([w * b.float() for w, _, b in terms], dim=1)
        if method == "linear":
            factors[key] = (down, up)
            continue
        target = rank or max(a.shape[0] for _, a, _ in terms)
        delta = up @ down if method == "svd" else _ties([w * (b.float() @ a.float()) for w, a, b in terms], density)
        factors[key] = _factorise(delta, target)
    return _add_lowrank(am, name, list(weights), factors)


def _lowrank_sites(am, weights: Mapping[str, float]) -> dict[tuple, list]:
    """{(module, site, layer, chunk): [(wᵢ, Aᵢ, sᵢ·Bᵢ), ...]} over every site of every input adapter."""
    entries: dict[tuple, list] = {}
    for n, w in weights.items():
        for part in am.recipes[n].parts:
            if part.insertion != "parallel" or part.composition not in ("add", "scaled") or part.magnitude:
                raise UnipeftError(f"adapter '{n}' part '{part.name}' ({part.insertion} {part.composition}"
                                   f"{', DoRA' if part.magnitude else ''}) is not a plain ΔW = s·B·A; combine needs "
                                   "parallel low-rank parts with add/scaled composition")
            for b in resolve(am.model, part):
                if b.role != "out":
                    raise UnipeftError(f"adapter '{n}' part '{part.name}' acts at a {b.role} site; combine merges "
                                       "projection-output LoRA")
                sa = next(s for s in am._wrappers[b.module].sites_of(n) if s.part_name == part.name and
                          s.site == b.site and s.chunk == b.chunk)
                key = (b.module, b.site, b.layer, b.chunk)
                entries.setdefault(key, []).append((float(w), sa.fn.down.weight.detach(),
                                                    float(sa.scale()) * sa.fn.up.weight.detach()))
    return entries


def _ties(tasks: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES: trim each task matrix to its top-`density` entries by magnitude, elect signs, disjoint mean."""
    trimmed = []
    for t in tasks:
        k = max(1, int(round(density * t.numel())))
        threshold = t.abs().flatten().kthvalue(t.numel() - k + 1).values
        trimmed.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
    stack = torch.stack(trimmed)
    sign = torch.sign(stack.sum(dim=0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return (stack * agree).sum(dim=0) / count


def _factorise(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (A: rank × d_in, B: d_out × rank) of ΔW by truncated SVD."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root[None, :]


def _add_lowrank(am, name: str, sources: list[str], factors: dict):
    groups: dict[tuple, list[tuple]] = {}
    for key, (down, _) in factors.items():
        module, site, layer, chunk = key
        named = site in ALL_SITES
        groups.setdefault((site if named else None, int(down.shape[0])), []).append(key)
    parts = []
    for (site, r), keys in sorted(groups.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        common: dict[str, Any] = dict(function="lowrank", composition="scaled", scale=1.0, r=r)
        if site is not None:
            layers = tuple(sorted({k[2] for k in keys}))
            parts.append(Part(name=f"{site}_r{r}", sites=(site,), layers=layers, **common))
        else:
            parts.append(Part(name=f"targets_r{r}", targets=tuple(sorted({k[0] for k in keys})), **common))
    recipe = Recipe(name, tuple(parts), f"combined from {', '.join(sources)}").validate()
    am.add(name, recipe)
    try:
        for key, (down, up) in factors.items():
            module, site, _, chunk = key
            sa = next(s for s in am._wrappers[module].sites_of(name) if s.site == site and s.chunk == chunk)
            with torch.no_grad():
                sa.fn.down.weight.copy_(down.to(sa.fn.down.weight.dtype))
                sa.fn.up.weight.copy_(up.to(sa.fn.up.weight.dtype))
    except BaseException:
        am.remove(name)
        raise
    return am


def _average_parameters(am, weights: Mapping[str, float], name: str):
    names = list(weights)
    first = am.adapter_parameters(names[0])
    for n in names[1:]:
        other = am.adapter_parameters(n)
        if other.keys() != first.keys() or any(other[k].shape != first[k].shape for k in first):
            raise UnipeftError(f"'{names[0]}' and '{n}' differ in parameters or shapes; bottleneck adapters average "
                               "only when their recipes match")
    am.add(name, am.recipes[names[0]], train_modules=am.train_modules.get(names[0]) or None)
    new = am.adapter_parameters(name)
    with torch.no_grad():
        for k, p in new.items():
            p.copy_(sum(float(weights[n]) * am.adapter_parameters(n)[k].float() for n in names).to(p.dtype))
    return am
