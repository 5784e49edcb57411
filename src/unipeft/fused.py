"""Fast paths for the commonest adapter — LoRA on a linear projection — used automatically where they apply.

The reference path (layer.py + functions.py) computes h + s·B(A(x)) with separate modules: two small GEMMs, a
scaled copy of Δh and an add, each a full pass over an (N × d_out) tensor, plus the matching autograd nodes. Here
the same math is one custom autograd function that touches each big tensor as few times as cuBLAS allows:

    forward    y  = x·Wᵀ + b                     (the frozen GEMM)
               xa = x·Aᵀ                         (N × r, kept for backward)
               y += s·xa·Bᵀ                      (accumulated in place by the GEMM: no Δh tensor, no add)
    backward   ga = s·g·B                        (N × r)
               dx = g·W;  dx += ga·A             (accumulated in place)
               dA = gaᵀ·x;  dB = s·gᵀ·xa

It saves only x (the same tensor q, k and v read, so saved once) and the small xa. Without gradients and with
many rows (prefill, batch scoring) it instead forms W' = W + s·B·A for the call — one pass over W, rounded once in
the GEMM, the same numerics as `merge()` — and runs one GEMM; decoding (few rows) keeps the unmerged form.

Mixed batches (`adapter_names=`) with many LoRA adapters go through `routed_lora`: each row's A and s·B are gathered
from stacked adapter weights and two batched GEMMs add every row's delta — a fixed number of launches for any number
of adapters (SGMV-style), where a loop over adapters launches per adapter.

`UNIPEFT_FUSED=0` turns these paths off (the reference path is always there; tests compare the two).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .functions import SiteAdapter


def enabled() -> bool:
    return os.environ.get("UNIPEFT_FUSED", "1") != "0"


def _plain_linear(base: nn.Module) -> bool:
    return type(base) is nn.Linear or type(base).__name__ == "Conv1D"


def simple_lora(sa: SiteAdapter, training: bool) -> bool:
    """A site the fused path computes exactly: parallel low-rank on a whole projection's output, constant scale."""
    return (sa.role == "out" and sa.function == "lowrank" and sa.insertion == "parallel"
            and sa.composition in ("add", "scaled") and sa.chunk is None and not hasattr(sa, "magnitude")
            and not hasattr(sa, "learned_scale") and (not training or isinstance(sa.dropout, nn.Identity)))


def _weights(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W as d_out × d_in, bias) — a transposed view for transformers' Conv1D, which stores d_in × d_out."""
    w = base.weight
    return (w if isinstance(base, nn.Linear) else w.t()), base.bias


class _LoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with the memory traffic described in the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, s: float):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a.t()
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(xa, b.t(), alpha=s)
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.s = s
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, weight, a, b, xa = ctx.saved_tensors
        s = ctx.s
        g = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        ga = (g @ b).mul_(s)
        dx = dw = dbias = da = db = None
        if ctx.needs_input_grad[0]:
            dx = g @ weight
            dx.addmm_(ga, a)
            dx = dx.view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = g.t() @ x2
        if ctx.needs_input_grad[2]:
            dbias = g.sum(0)
        if ctx.needs_input_grad[3]:
            da = ga.t() @ x2
        if ctx.needs_input_grad[4]:
            db = (g.t() @ xa).mul_(s)
        return dx, dw, dbias, da, db, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lora_linear(x: torch.Tensor, base: nn.Module, sa: SiteAdapter) -> torch.Tensor:
    """The fused LoRA projection (see `_LoraLinear`), in the autocast dtype when autocast is on."""
    w, bias = _weights(base)
    a, b = sa.fn.down.weight, sa.fn.up.weight
    dtype = _compute_dtype(x)
    if len({x.dtype, w.dtype, a.dtype, dtype}) > 1:
        x, w, a, b = x.to(dtype), w.to(dtype), a.to(dtype), b.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if not torch.is_grad_enabled() and _merge_pays(x, w):
        # Inference on many rows: W' = W + s·B·A costs one pass over W (the GEMM adds W in fp32 and rounds once,
        # like merge() and no worse), far less than the extra passes over x and y; the weights stay untouched.
        return nn.functional.linear(x, torch.addmm(w, b, a, alpha=float(sa.s)), bias)
    return _LoraLinear.apply(x, w, bias, a, b, float(sa.s))


def _merge_pays(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether forming W' per call moves fewer bytes than the unmerged extra work: 2·d_out·d_in (read W, write W')
    against N·(d_in + 2·d_out) (read x for x·Aᵀ, read and write y for the accumulation)."""
    d_out, d_in = w.shape
    rows = x.numel() // max(x.shape[-1], 1)
    return rows * (d_in + 2 * d_out) > 2 * d_out * d_in


def fusable(layer, items: list[tuple[str, SiteAdapter]]) -> bool:
    """Whether `forward` can compute these items (decided once per plan, see AdapterLayer._plan). Quantized and
    other non-plain bases take the fused delta (`_LoraDelta`) on top of their own forward."""
    if not items or not all(simple_lora(sa, layer.training) for _, sa in items):
        return False
    if layer.routing is None:
        return len(items) == 1
    return _plain_linear(layer.base_layer) and len({n for n, _ in items}) == len(items)


def forward(layer, x: torch.Tensor, items: list[tuple[str, SiteAdapter]]) -> torch.Tensor | None:
    """The fused result for this projection call, or None when the reference path must run."""
    if layer.routing is None:
        if x.dim() < 2:
            return None
        base = layer.base_layer
        if _plain_linear(base):
            return lora_linear(x, base, items[0][1])
        return lora_delta(base(x), x, items[0][1])
    return routed_lora(layer, x, items) if x.dim() == 3 else None


class _LoraDelta(torch.autograd.Function):
    """y + s·(x·Aᵀ)·Bᵀ as one GEMM that reads y as its addend (any base: a quantized layer computes y). Out of
    place — the same traffic as in place (read y, write the sum) — because y may be a view a base layer returned."""

    @staticmethod
    def forward(ctx, y, x, a, b, s: float):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a.t()
        out = torch.addmm(y.reshape(-1, y.shape[-1]), xa, b.t(), alpha=s)
        ctx.save_for_backward(x, a, b, xa)
        ctx.s = s
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, gy):
        x, a, b, xa = ctx.saved_tensors
        g = gy.reshape(-1, gy.shape[-1])
        ga = (g @ b).mul_(ctx.s)
        dx = (ga @ a).view(x.shape) if ctx.needs_input_grad[1] else None
        da = ga.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[2] else None
        db = (g.t() @ xa).mul_(ctx.s) if ctx.needs_input_grad[3] else None
        return gy, dx, da, db, None


def lora_delta(y: torch.Tensor, x: torch.Tensor, sa: SiteAdapter) -> torch.Tensor:
    a, b = sa.fn.down.weight, sa.fn.up.weight
    if len({x.dtype, a.dtype, y.dtype}) > 1:
        x, a, b = x.to(y.dtype), a.to(y.dtype), b.to(y.dtype)
    return _LoraDelta.apply(y, x, a, b, float(sa.s))


def routed_lora(layer, x: torch.Tensor, items: list[tuple[str, SiteAdapter]]) -> torch.Tensor:
    """Per-row adapters: y = base(x) + x·A_rowᵀ·(s·B_row)ᵀ with A_row/B_row gathered per batch row (zero for rows
    routed to the base or to an adapter that has no site here); the second batched GEMM accumulates into y."""
    dtype = _compute_dtype(x)
    a_rows, b_rows = _row_weights(layer, items, x.shape[0], x.device, dtype)
    y = layer.base_layer(x)
    xa = torch.bmm(x.to(dtype), a_rows)
    if not torch.is_grad_enabled() and y.dtype == dtype:
        return y.baddbmm_(xa, b_rows)
    return torch.baddbmm(y.to(dtype), xa, b_rows).to(y.dtype)


def _row_weights(layer, items, batch: int, device: torch.device, dtype: torch.dtype):
    """Each row's Aᵀ (B, d_in, r) and (s·B)ᵀ (B, r, d_out). Without gradients they are cached per routing, batch
    and dtype, so decoding steps reuse them until an adapter weight changes."""
    key = (layer.routing.key, batch, device, dtype)
    cached = layer.__dict__.get("_unipeft_rows")
    if cached is not None and cached[0] == key and not torch.is_grad_enabled() and _fresh(cached[1]):
        return cached[2], cached[3]
    a_stack, b_stack, tensors = _stacks(layer, items, dtype)
    rows = layer.routing.row_index(tuple(n for n, _ in items), batch, device)
    a_rows = a_stack.index_select(0, rows).transpose(1, 2)
    b_rows = b_stack.index_select(0, rows).transpose(1, 2)
    if not torch.is_grad_enabled():
        layer.__dict__["_unipeft_rows"] = (key, (tensors, tuple(t._version for t in tensors)), a_rows, b_rows)
    return a_rows, b_rows


def _fresh(versions) -> bool:
    tensors, seen = versions
    return all(t._version == v for t, v in zip(tensors, seen))


def _stacks(layer, items: list[tuple[str, SiteAdapter]], dtype: torch.dtype):
    """Stacked A (n+1, r_max, d_in) and s·B (n+1, d_out, r_max), the last slot zero, ranks padded with zeros, and
    the adapter tensors they came from. Cached while no gradient is recorded and no adapter weight changed (their
    version counters say so); rebuilt when training, so gradients reach every adapter."""
    cached = layer.__dict__.get("_unipeft_stacks")
    if cached is not None and not torch.is_grad_enabled() and cached[0] == (layer.routing.key, dtype) and \
            _fresh(cached[1]):
        return cached[2], cached[3], cached[1][0]
    params = [(sa.fn.down.weight, sa.fn.up.weight, float(sa.s)) for _, sa in items]
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
    tensors = tuple(t for a, b, _ in params for t in (a, b))
    if not torch.is_grad_enabled():
        layer.__dict__["_unipeft_stacks"] = ((layer.routing.key, dtype), (tensors, tuple(t._version for t in tensors)),
                                             a_stack, b_stack)
    return a_stack, b_stack, tensors
