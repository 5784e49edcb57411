"""Whether merge() may fold adapters into the frozen weights: only when the merged model computes exactly what the
unmerged one does. Kept apart from the model handle because the reasons are the subtle part of merging:

- recipes whose knobs are not a linear map of a projection's own input never merge (the recipe says so);
- an adapter composing after an unmerged one on the same layer would be reordered by merging it;
- DoRA's row norms and an input scaling (IA3 on `down_in`) read the layer's weight as it is, whatever the activation
  order: one that stays active and unmerged would see the others' merged terms, and one merged in the same call must
  be folded in first, so it reads the weight its unmerged forward reads.
"""

from __future__ import annotations

from . import compose
from .errors import UnipeftError


def check(am, name: str | None) -> list[str]:
    """The adapters `am.merge(name)` would fold in, in merge order; raises UnipeftError with the reason when merging
    them would change the output."""
    if name is not None and not isinstance(name, str):
        raise UnipeftError(f"merge takes one adapter name (or None for the active ones), not {type(name).__name__}")
    in_blocks = {n for u in am.active if not isinstance(u, str) for n in compose.adapter_names(u)}
    if name is not None and name in in_blocks:
        raise UnipeftError(f"adapter '{name}' is part of an active block; blocks are not merged (deactivate it)")
    names = [name] if name is not None else [n for n in am.active if isinstance(n, str) and n not in am.merged]
    if not names:
        raise UnipeftError("no adapter to merge: none is active and unmerged; pass a name or activate one")
    for n in names:
        am._require(n)
        recipe = am.recipes[n]
        if not recipe.mergeable:
            bad = [p for p in recipe.parts if not p.mergeable]
            why = ", ".join(f"'{p.name}' ({p.function} at {', '.join(p.sites or p.targets)}, {p.insertion}, "
                            f"{p.composition})" for p in bad)
            raise UnipeftError(f"adapter '{n}' ({recipe.name}) cannot be merged: part {why} is not a linear map of "
                               "a projection's own input; it stays unmerged")
        if n in am.merged:
            raise UnipeftError(f"adapter '{n}' is already merged")
    for w in am._wrappers.values():  # merging must not reorder compositions
        order = [a for a in w.active if a in w.adapters]
        for n in names:
            if n in order:
                before = [a for a in order[: order.index(n)] if a not in am.merged and a not in names]
                if before:
                    raise UnipeftError(f"adapter '{n}' composes after unmerged '{before[0]}' on the same layer; "
                                       "merging it would change the output: merge both or reorder activate()")
        # readers of the weight (module docstring): none may stay unmerged under a merge, one merged here goes first
        merging = [n for n in names if n in w.adapters]
        readers = [a for a in order if w.reads_weight(a)]
        staying = [a for a in readers if a not in am.merged and a not in merging]
        if merging and staying:
            raise UnipeftError(f"merging '{merging[0]}' would change what active '{staying[0]}' computes on the "
                               f"same layer ({w.reads_weight(staying[0])} reads the weight): merge '{staying[0]}' "
                               "too (first), or deactivate it")
        first = [a for a in merging if w.reads_weight(a)]
        if first and (merging[0] != first[0] or len(first) > 1):
            late = first[0] if merging[0] != first[0] else first[1]
            raise UnipeftError(f"'{late}' ({w.reads_weight(late)} reads the weight) would be folded into a weight "
                               f"that already holds '{merging[0]}' on the same layer, which its unmerged forward "
                               f"does not see; merge() folds in activation order: activate '{late}' first")
    return names
