"""What would one flat trainable tensor per adapter save a compiled LoRA step? (A measurement, not a feature.)

A compiled LoRA step of the 953M benchmark model spends host time before its first kernel that grows with the
number of trainable tensors — guard evaluation (1.31 against the floor's 0.46 ms; skipping it made the step
~0.8 ms faster, `ab_4_compiled_skip_guards.json`) and dynamo's pre-graph bytecode that gathers the graph's inputs
(0.75 against 0.15 ms) — and the harness's AdamW runs over 224 tensors (0.51 ms of GPU time, 30 launches). Here,
after `unipeft.attach`, every LoRA A and B is copied into one flat parameter; each model call splits it once
(`split_with_sizes`: one node, whose backward is one concatenation) and the fused path takes its A and B from the
pieces (fused.lora_weights patched; the compiled calls' cached operands, AdapterLayer._warm_lean, are turned off).
The optimizer then sees one tensor. Measured (ab_5) before those cached operands existed. Compiled only: the split
happens inside the traced call. Numbers are the product's (same kernels, same formulas); only where A and B live
changes.

Used by bench/ab_step.py: `--env-b AB_FLAT_PARAMS=1` runs worker B's LoRA model this way.
tests/test_bench_flat.py checks on CPU that the patched model computes the same loss and gradients as the plain one.
"""

from __future__ import annotations

import torch
from torch import nn

from unipeft import fused
from unipeft import layer as layer_mod
from unipeft import model as model_mod

_PIECES: list = [None]  # this call's pieces of the flat parameter (set and cleared by the patched _forward)


def apply(am) -> nn.Parameter:
    """Copy every LoRA A, B of `am` into one flat parameter registered on `am` (the originals stop training) and
    patch the fused path to read them from it. Returns the flat parameter (the optimizer's only tensor)."""
    sites, tensors = [], []
    for sa in am.modules():
        if type(sa).__name__ == "SiteAdapter" and sa.function == "lowrank":
            a, b, _ = _ORIGINAL(sa)
            sa.__dict__["_flat_index"] = len(tensors)
            tensors += [a, b]
            sites.append(sa)
    flat = nn.Parameter(torch.cat([t.detach().reshape(-1) for t in tensors]))
    for t in tensors:
        t.requires_grad_(False)
    am.register_parameter("_flat_lora", flat)
    am.__dict__["_flat_layout"] = ([t.numel() for t in tensors], [tuple(t.shape) for t in tensors])
    fused.lora_weights = _lora_weights
    model_mod.AdaptedModel._forward = _forward
    layer_mod.AdapterLayer._warm_lean = _no_lean  # (compiled calls read A and B from the flat pieces, not a cache)
    for w in am._wrappers.values():
        w.__dict__.pop(fused.LEAN, None)
    return flat


def _no_lean(self) -> None:
    pass


_ORIGINAL = fused.lora_weights
_ORIGINAL_FORWARD = model_mod.AdaptedModel._forward


def _lora_weights(sa) -> tuple[torch.Tensor, torch.Tensor, float]:
    i = sa.__dict__.get("_flat_index")
    pieces = _PIECES[0]
    if i is None or pieces is None:
        return _ORIGINAL(sa)
    return pieces[i], pieces[i + 1], float(sa.s)


def _forward(self, args, kwargs):
    flat = self._parameters.get("_flat_lora")
    if flat is None:
        return _ORIGINAL_FORWARD(self, args, kwargs)
    sizes, shapes = self.__dict__["_flat_layout"]
    _PIECES[0] = [p.view(s) for p, s in zip(flat.split_with_sizes(sizes), shapes)]
    try:
        return _ORIGINAL_FORWARD(self, args, kwargs)
    finally:
        _PIECES[0] = None
