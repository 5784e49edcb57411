"""Fast paths for the commonest adapter — LoRA on a linear projection — used automatically where they apply.

The reference path (layer.py + functions.py) computes h + s·B(A(x)) with separate modules: two small GEMMs, a
scaled copy of Δh and an add, each a full pass over an (N × d_out) tensor, plus the matching autograd nodes. Here
the same math is one custom autograd function that touches each big tensor as few times as cuBLAS allows. It has
two forms, picked per call by which moves fewer bytes (`_merged_pays`):

  merged (many rows: training and prefill batches)
    forward    W' = W + s·B·A                    (one pass over W: d_out × d_in, usually far smaller than x or y)
               y  = x·W'ᵀ + b;  xa = x·Aᵀ        (xa: N × r, kept for backward)
    backward   W' again (recomputed, not saved: saving it would hold a second copy of every adapted weight)
               dx = g·W'                         (the LoRA part of dx rides along in the frozen GEMM)
               dA = s·(g·B)ᵀ·x;  dB = s·gᵀ·xa
  unmerged (few rows: decoding, small batches)
    forward    y = x·Wᵀ + b;  y += s·(x·Aᵀ)·Bᵀ   (accumulated in place by the GEMM: no Δh tensor, no add)
    backward   dx = g·W;  dx += s·(g·B)·A        (accumulated in place); dA, dB as above

Both save only x (the tensor q, k and v all read, so saved once), the small xa and the weights. The merged form
rounds W' once, like `merge()`; its bf16 error is the same as the unmerged form's rounding of y (measured: error
relative to Δh within 0.5% of the unmerged path's at every scale of B). A 4-bit base (bitsandbytes NF4/FP4) takes
the merged form with W dequantized per use, so QLoRA costs the dequantization and nothing else; int8 bases and
other modules keep their own forward and add the delta with one accumulating GEMM (`_LoraDelta`).

On CUDA the two backward products that read g — s·(g·B) for dA and dB = s·gᵀ·xa — are one Triton kernel that
reads g once (kernels.lora_grads); elsewhere, and in deterministic mode, two GEMMs.

Mixed batches (`adapter_names=`) with many LoRA adapters go through routed.py: a fixed number of launches per
projection for any number of adapters (SGMV-style), where a loop over adapters launches per adapter.

`UNIPEFT_FUSED=0` turns these paths off (the reference path is always there; tests compare the two).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import arch, envflags, kernels, overlap, quant, routed, siblings
from .functions import SiteAdapter

#: the kinds of base a projection can have on the fused path (`fusable` returns one; "" = reference path)
LINEAR, CONV1D, Q4, DELTA, ROUTED = "linear", "conv1d", "q4", "delta", "routed"


def enabled() -> bool:
    return not envflags.off("UNIPEFT_FUSED")


def simple_lora(sa: SiteAdapter, training: bool) -> bool:
    """A site the fused path computes exactly: parallel low-rank on a whole projection's output, constant scale."""
    return (sa.role == "out" and sa.function == "lowrank" and sa.insertion == "parallel"
            and sa.composition in ("add", "scaled") and sa.chunk is None and not hasattr(sa, "magnitude")
            and not hasattr(sa, "learned_scale") and (not training or isinstance(sa.dropout, nn.Identity)))


def base_kind(base: nn.Module) -> str:
    if type(base) is nn.Linear:
        return LINEAR
    if type(base).__name__ == "Conv1D":
        return CONV1D
    if quant.is_quantized(base) and quant.kind_of(base) in ("nf4", "fp4"):
        return Q4
    return DELTA


def fusable(layer, items: list[tuple[str, SiteAdapter]]) -> str:
    """How `forward` computes these items — decided once per plan (AdapterLayer._plan) so a call pays no Python for
    it — or "" when the reference path must run."""
    if not items or not all(simple_lora(sa, layer.training) for _, sa in items):
        return ""
    kind = base_kind(layer.base_layer)
    if layer.routing is None:
        return kind if len(items) == 1 else ""
    return ROUTED if kind in (LINEAR, CONV1D) and len({n for n, _ in items}) == len(items) else ""


def forward(layer, x: torch.Tensor, items: list[tuple[str, SiteAdapter]], kind: str) -> torch.Tensor | None:
    """The fused result for this projection call, or None when the reference path must run."""
    if kind == ROUTED:
        return routed.lora(layer, x, items) if x.dim() == 3 else None
    if x.dim() < 2:
        return None
    base, sa = layer._modules["base_layer"], items[0][1]
    if kind in (LINEAR, CONV1D, Q4) and not _unhooked(base):
        kind = DELTA  # the base's own call runs (its hooks, an accelerate offload wrapper), the delta is added after
    if kind == DELTA:
        return lora_delta(base(x), x, sa)
    if kind in (LINEAR, Q4):
        y = siblings.grouped_output(layer, x)  # q/k/v, gate/up: one group (siblings.py), 4-bit bases too
        if y is not None:
            return y
    return lora_linear(x, base, sa, kind)


LEAN = "_unipeft_lean"  #: __dict__ key of a projection's cached operands for compiled calls (AdapterLayer._warm_lean)


def cached_operands(layer) -> tuple | None:
    """The projection's cached (mode, A's module, B's module, s) when a compiled call may use them: made in the
    module's current mode, nothing routed. (`route` before `routing`: a routed call with shared stacks must not read
    `routing`, one object on every layer — dynamo would check in Python at every call that each layer's is the
    same; tests/test_routed.py.)"""
    lean = layer.__dict__.get(LEAN)
    if lean is not None and layer.route is None and lean[0] == layer.training and layer.routing is None:
        return lean
    return None


def lean_forward(layer, x: torch.Tensor, lean: tuple) -> torch.Tensor | None:
    """`forward`'s LINEAR branch from a projection's cached (mode, A, B, s) — a compiled call's path
    (AdapterLayer._warm_lean) — or None when the reference path must run."""
    if x.dim() < 2:
        return None
    base = layer._modules["base_layer"]
    if not _unhooked(base):
        return None
    y = siblings.grouped_output(layer, x)
    if y is not None:
        return y
    return lora_linear(x, base, None, LINEAR, lean_weights(lean))


def lean_weights(lean: tuple) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, s) from a projection's cached (mode, A's module, B's module, s) (AdapterLayer._warm_lean)."""
    _, down, up, s = lean
    return down._parameters["weight"], up._parameters["weight"], s


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = "cuda" if x.is_cuda else x.device.type  # (x.device builds an object per call: a decode step's hot path)
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _merged_pays(rows: int, d_in: int, d_out: int, grad: bool) -> bool:
    """Whether the merged form moves fewer bytes. Unmerged extra traffic: read x for x·Aᵀ and read + write y (no
    grad); with grad, read + write y and read + write dx (x·Aᵀ is paid by both forms). Merged: read W, write W' —
    once without grad, twice with (backward rebuilds it)."""
    if grad:
        return rows * (d_in + d_out) > 2 * d_in * d_out
    return rows * (d_in + 2 * d_out) > 2 * d_out * d_in


_ZEROS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # constant 0-dim zeros, see _scaled_mm


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, s: float) -> torch.Tensor:
    """s·(m1·m2) as one GEMM launch (no separate scaling kernel): addmm with beta=0 never reads its input, so a
    cached 0-dim zero stands in for it. A compiler fuses the scaling itself (and must not see the cache filled)."""
    if torch.compiler.is_compiling():
        return torch.mm(m1, m2) * s
    return torch.addmm(zero_like(m1), m1, m2, beta=0, alpha=s)


def zero_like(t: torch.Tensor) -> torch.Tensor:
    """A cached constant 0-dim zero of t's device and dtype (an addend that beta=0 GEMMs never read)."""
    key = (t.device, t.dtype)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), device=t.device, dtype=t.dtype)
    return zero


def _merged_weight(weight, source, a, b, s: float) -> torch.Tensor:
    """W' = W + s·B·A for a training step. A plain W on CUDA goes through the Triton kernel: one pass over W, where
    addmm copies W first (see kernels.py); under torch.compile through its custom op. `source` dequantizes a
    quantized W into a fresh tensor, which addmm_ updates in place; where the 4-bit kernel applies (kernels_q4.py),
    `source.merged` dequantizes and adds s·B·A in one launch and one pass instead."""
    if source is not None:
        merged = getattr(source, "merged", None)
        return merged(b, a, s) if merged is not None else source().addmm_(b, a, alpha=s)
    if kernels.available(weight):
        if torch.compiler.is_compiling():
            return kernels.compiled_merged_weight(weight, b, a, s)
        return kernels.merged_weight(weight, b, a, s)
    return torch.addmm(weight, b, a, alpha=s)


def merged_weights(ws, as_, bs, scales, sources=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """W_i' = W_i + s_i·B_i·A_i of sibling projections (siblings.py) for a training step, and their A's stacked
    ([A_1; A_2; …]): one Triton launch for both where the kernel applies (kernels.merged_weights), else one build
    per member and a concatenation. `sources`: per member None, or a function giving a 4-bit base's W dequantized
    (then that build is in place on the fresh W). The group's W' are alive together during its forward, a transient
    that per-member builds kept to one W' (the harness model's step peak did not change: 12.54 GiB)."""
    if sources is None or not any(src is not None for src in sources):
        if kernels.available(ws[0]) and kernels.groupable(ws, bs, as_):
            return kernels.merged_weights(list(ws), list(bs), list(as_), list(scales))
        sources = [None] * len(ws)
    return [_merged_weight(w, src, a, b, s) for w, src, a, b, s in zip(ws, sources, as_, bs, scales)], \
        torch.cat(as_)


def _merged_weight_again(weight, source, a, b, s: float) -> torch.Tensor:
    """W' for the compiled backward, by an expression the compiler cannot merge with the forward's (merged, it
    would keep W' alive from forward to backward: a second copy of every adapted weight). The same numbers."""
    if source is None:
        if kernels.available(weight):
            return kernels.compiled_merged_weight(weight, b, a, s, tag=1)
        return torch.addmm(weight.t(), a.t(), b.t(), alpha=s).t()  # W'ᵀ = Wᵀ + s·Aᵀ·Bᵀ
    return source().t().addmm_(a.t(), b.t(), alpha=s).t()


class _LoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, merged or unmerged as the module docstring describes. `weight` is the plain
    frozen W, or None with `source` a callable giving a fresh dequantized W (then `merged` is always True)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, s: float, merged: bool, source):
        # x, saved for dA, or the product node that can give it again (see `_product_node`)
        ctx.x_node = _product_node(x) if ctx.needs_input_grad[3] and not ctx.needs_input_grad[1] else None
        if merged:
            y = F.linear(x, _merged_weight(weight, source, a, b, s), bias)
            # merged, only dB needs xa; taken right after the GEMM that read x, while part of x is still in L2
            # (bench/skinny_probe.py --only l2: 6–7 µs less at d 2048, N 8192)
            xa = F.linear(x, a) if ctx.needs_input_grad[4] and not backward_takes_xa(x, [a.shape[0]], source) else None
        else:
            xa = F.linear(x, a)
            y = F.linear(x, weight, bias)
            y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), b.t(), alpha=s)
        ctx.save_for_backward(None if ctx.x_node is not None else x, weight, a, b, xa)
        ctx.s, ctx.merged, ctx.source = s, merged, source
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, a, b, xa = ctx.saved_tensors
        if ctx.x_node is not None:  # recomputed from the operands its product node saved (bit for bit the same)
            x = ctx.x_node._saved_self * ctx.x_node._saved_other
        s = ctx.s
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dx = dw = dbias = da = db = None
        ga_t = None  # s·(g·B)ᵀ: r × N
        create_graph = torch.is_grad_enabled()
        compiling = torch.compiler.is_compiling()
        if ctx.merged and ctx.source is None and need_a and need_b and not need_w and not create_graph \
                and compiling and overlap.enabled() and overlap.applies([g], [a.shape[0]]):
            # compiled: x·Aᵀ, the grads kernel and dA on a second stream beside W′ and the dx GEMM (overlap.py)
            dx, flat, da = overlap.traced_lora_backward([g], [weight], [b], x, a, [s], [a.shape[0]], need_x, True,
                                                        True)
            dbias = g.sum(0) if need_bias else None
            return (None if dx is None else dx.view(x.shape)), None, dbias, da, flat[:b.numel()].view(b.shape), \
                None, None, None
        if xa is None and need_b and not create_graph:
            xa = F.linear(x, a)  # (forward left it to the op above, which did not apply after all)
        if need_a and need_b and xa is not None and not create_graph and kernels.grads_available([g], (a.shape[0],)):
            # one Triton kernel reads g once for s·(g·B)ᵀ and dB (kernels.lora_grads)
            ga_t, db = kernels.lora_grads([g], [b], [xa.reshape(-1, xa.shape[-1])], [0], [s], a.shape[0])
            db, need_b = db.view(b.shape), False
        elif need_a or (need_x and not ctx.merged):
            ga_t = _scaled_mm(b.t(), g.t(), s)
        if need_x:
            if ctx.merged and compiling:
                dx = torch.mm(g, _merged_weight_again(weight, ctx.source, a, b, s))
            elif ctx.merged:
                dx = torch.mm(g, _merged_weight(weight, ctx.source, a, b, s))
            else:
                dx = torch.mm(g, weight).addmm_(ga_t.t(), a)
            dx = dx.view(x.shape)
        if need_w:
            dw = g.t() @ x2
        if need_bias:
            dbias = g.sum(0)
        if need_a:
            da = torch.mm(ga_t, x2)
        if need_b:
            if create_graph:  # double backward: xa as a function of x and A (the saved one is detached)
                xa = F.linear(x, a)
            db = _scaled_mm(g.t(), xa.reshape(-1, xa.shape[-1]), s)
        return dx, dw, dbias, da, db, None, None, None


def backward_takes_xa(x: torch.Tensor, ranks: list[int], source=None) -> bool:
    """Whether a compiled backward's op computes x·Aᵀ itself (beside the dx GEMMs, overlap.py), so the forward need
    not — a lone projection's or a sibling group's (`ranks`: each member's): under torch.compile, for a plain W
    where the op applies."""
    return source is None and torch.compiler.is_compiling() and overlap.enabled() and overlap.applies([x], ranks)


def _product_node(x: torch.Tensor):
    """x's autograd node when x = p·q (elementwise, same shape and dtype) and that node saved p and q — a gated MLP's
    act(gate)·up, the input of down_proj — unless `UNIPEFT_RECOMPUTE=0`; else None.

    The fused LoRA backward needs its projection's input x for dA = s·(g·B)ᵀ·x, and keeps it from forward. A frozen
    base does not (no weight gradient), so for down_proj x is memory only LoRA holds: N × d_ffn per layer, 1.47 GB
    on the 953M benchmark model at 8 × 1024 tokens. The product's own backward keeps p and q until it runs, which is
    after this projection's backward; so x can be recomputed there from them by one elementwise product (the same
    op on the same operands: the same bits) instead of being kept. Eager only (a compiled graph decides what it
    saves itself), and not while saved-tensor hooks are active (checkpointing, offloading: they manage saved tensors
    themselves). Measured on the H200 (eager, 953M model): peak 15.37 → 13.99 GiB, GPU busy 102.3 → 103.1 ms a step
    (bench/results/idle_eager_2.json); on by default, `UNIPEFT_RECOMPUTE=0` keeps x instead."""
    if envflags.off("UNIPEFT_RECOMPUTE") or torch.compiler.is_compiling() or _saved_tensor_hooks():
        return None  # (before x.grad_fn: a tracer must not see it)
    node = x.grad_fn
    if node is None or type(node).__name__ != "MulBackward0":
        return None
    try:
        p, q = node._saved_self, node._saved_other
    except RuntimeError:  # (already released)
        return None
    if p is None or q is None or not (p.shape == q.shape == x.shape and p.dtype == q.dtype == x.dtype):
        return None
    return node


def _saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks) are active."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return True if top is None else top(False) is not None


def lora_weights(sa: SiteAdapter) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, s) of a LoRA site. Read from the module dicts: this runs once per projection call, and
    nn.Module.__getattr__ chains were a visible share of a CPU-bound step's host time."""
    fn = sa._modules["fn"]
    return fn._modules["down"]._parameters["weight"], fn._modules["up"]._parameters["weight"], float(sa.s)


def lora_linear(x: torch.Tensor, base: nn.Module, sa: SiteAdapter | None, kind: str = LINEAR,
                weights: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """The fused LoRA projection (see `_LoraLinear`) in the compute dtype: autocast's when on, a quantized base's
    compute dtype, else x's. `weights`: (A, B, s) already read (then `sa` may be None; not for a 4-bit base)."""
    a, b, s = weights if weights is not None else lora_weights(sa)
    grad = torch.is_grad_enabled()
    d_out, d_in = b.shape[0], a.shape[1]
    merged = _merged_pays(x.numel() // d_in, d_in, d_out, grad)
    if kind == Q4:
        if not merged:
            return lora_delta(base(x), x, sa)
        dtype = quant.compute_dtype(base)
        bias = None if base.bias is None else base.bias.to(dtype)
        source = quant.dequantizer(base, dtype)
        y = _LoraLinear.apply(x.to(dtype), None, bias, a.to(dtype), b.to(dtype), s, True, source)
        return y.to(x.dtype)
    w, bias = base._parameters["weight"], base._parameters.get("bias")
    if kind == CONV1D:
        w = w.t()  # transformers' Conv1D stores d_in × d_out
    dtype = compute_dtype(x)
    if not (x.dtype == w.dtype == a.dtype == b.dtype == dtype):
        x, w, a, b = x.to(dtype), w.to(dtype), a.to(dtype), b.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if merged and not grad:
        # inference: W' for this call, weights untouched. addmm, not the Triton kernel: a no-grad forward is closer to
        # host-bound than a training step, and the kernel's launch costs more host time than addmm's extra pass
        return F.linear(x, torch.addmm(w, b, a, alpha=s), bias)
    return _LoraLinear.apply(x, w, bias, a, b, s, merged, None)


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


def base_output(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x); for a plain nn.Linear without hooks, F.linear directly — a decoding step is CPU-bound, and the
    module call's own overhead was a visible share of a projection's host time."""
    if type(base) is nn.Linear and _unhooked(base):
        return F.linear(x, base._parameters["weight"], base._parameters["bias"])
    return base(x)


def _unhooked(base: nn.Module) -> bool:
    """Whether calling the module is just its class's forward: no hooks on it or globally, and no forward set on
    the instance (accelerate's offloading hooks replace `module.forward` to bring weights in first). Only then
    may the fused paths use its weight directly instead of calling it."""
    return not (arch.has_hooks(base) or "forward" in base.__dict__)
