"""Gradient checkpointing for an adapted model, eager and under torch.compile.

Eager: non-reentrant checkpointing recomputes each segment's forward during backward, possibly after other forwards
ran. Per-call state held on the layers — each layer's routing (which rows use which adapter) and whether each
sibling group is on (siblings.py) — must then be what it was when the segment first ran, or the recompute takes
other paths and saves other tensors. `routing_context` is the checkpoint `context_fn` that restores it.

Compiled: the compiler traces the checkpointed segment into its graph and replays the graph's own recompute, so
there is nothing to restore — and it accepts no such `context_fn` (torch.compile raised an internal error on it).
Inside the traced segment the sibling groups step aside: their per-call slot for outputs computed ahead is a
side effect, which the tracer refuses inside a checkpointed region.

`enable` turns on the base model's checkpointing (non-reentrant by default, so frozen inputs need no grad hook)
and wraps each layer's checkpointing function in `checkpoint` below, which picks the eager or the compiled form
per call.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from . import siblings


def enable(am, **kwargs: Any) -> None:
    """`AdaptedModel.gradient_checkpointing_enable`: the base's checkpointing, each layer's checkpoint function
    wrapped by `checkpoint` below (wrapped, not replaced: transformers' own wrapper, e.g. activation offloading to
    the CPU, stays in force)."""
    gc = dict(kwargs.pop("gradient_checkpointing_kwargs", None) or {})
    gc.setdefault("use_reentrant", False)
    am.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc, **kwargs)
    if gc["use_reentrant"] or "context_fn" in gc:
        return  # (reentrant checkpointing takes no context_fn; a caller's own context_fn stands)
    for module in am.model.modules():
        inner = getattr(module, "_gradient_checkpointing_func", None)
        if inner is not None and not (isinstance(inner, functools.partial) and inner.func is checkpoint):
            module._gradient_checkpointing_func = functools.partial(checkpoint, am, inner)


def checkpoint(am, inner, function, *args: Any, **kwargs: Any):
    """The layer's checkpoint function `inner` with the routing context when eager; without it, and with the
    groups set aside (restored after, also when checkpoints nest), when traced by a compiler."""
    if not torch.compiler.is_compiling():
        return inner(function, *args, context_fn=lambda: routing_context(am), **kwargs)
    groups = am._groups
    before = [g.suspended for g in groups]
    for g in groups:
        g.suspended = True
    try:
        return inner(function, *args, **kwargs)
    finally:
        for g, was in zip(groups, before):
            g.suspended = was


def routing_context(am):
    """For torch.utils.checkpoint: remember this segment's routing and sibling-group states at forward time and
    restore them while the segment is recomputed in backward — even if other forwards ran in between — so the
    recompute takes the same paths and saves the same tensors."""
    wrappers = am._wrappers.values()
    saved = {id(w): w.routing for w in wrappers}
    saved_groups = {id(g): g.enabled for g in am._groups}

    @contextlib.contextmanager
    def recompute():
        current = {id(w): w.routing for w in am._wrappers.values()}
        current_groups = {id(g): g.enabled for g in am._groups}
        for w in am._wrappers.values():
            w.routing = saved.get(id(w))
        for g in am._groups:
            g.enabled = saved_groups.get(id(g), g.enabled)
        siblings.clear(am._groups)
        try:
            yield
        finally:
            for w in am._wrappers.values():
                w.routing = current.get(id(w))
            for g in am._groups:
                g.enabled = current_groups.get(id(g), g.enabled)
            siblings.clear(am._groups)  # a recompute may stop early, before every member took its output

    return contextlib.nullcontext(), recompute()
