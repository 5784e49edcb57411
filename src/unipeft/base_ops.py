"""Opt-in fused base ops for Llama-family decoders: RMSNorm, SwiGLU, RoPE and linear + cross-entropy.

The frozen base is most of a LoRA step's time, so after the adapter path itself is fused the base ops are what is
left: `accelerate(model)` swaps them for Liger-Kernel's Triton kernels (optional extra `unipeft[kernels]`). Nothing
of the model's forward code is copied — each op is replaced where it lives:

  RMSNorm      each *RMSNorm module's forward (instance attribute) → Liger's fused norm, same fp32 casting as Llama
  SwiGLU       each MLP's forward → down(silu(gate(x)) ⊙ up(x)) with the product fused; gate/up/down are still
               called as modules, so adapters on them work unchanged
  RoPE         transformers' `apply_rotary_pos_emb` of the family's modeling module → Liger's (the one process-wide
               change: that function has no per-instance hook; it computes the same rotation for any model)
  fused loss   the causal-LM call with `labels` runs the decoder, then a chunked linear + cross-entropy on the head's
               weight, so the (tokens × vocab) logits are never materialised (`logits` is None in that output);
               calls without labels run the model's own forward

`accelerate(model, enable=False)` puts everything back. The plain path is always there; CPU models are refused
(the kernels are Triton, GPU-only). Numerics are checked on the GPU by bench/perf_vs_peft.py (loss against the
plain model) and the wrapper logic on CPU with reference stand-ins for the kernels.
"""

from __future__ import annotations

import importlib
from types import MethodType, SimpleNamespace
from typing import Any

import torch
from torch import nn

from . import graphs
from .errors import UnipeftError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
_MARK = "_unipeft_accelerated"
_ROPE_ORIGINALS: dict[str, Any] = {}  # modeling module name -> its own apply_rotary_pos_emb


def _liger() -> SimpleNamespace:
    """The Liger-Kernel pieces used here (one place, so tests can stand in reference implementations)."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        raise UnipeftError("accelerate() needs Liger-Kernel, which is not installed: pip install 'unipeft[kernels]'") \
            from None
    return SimpleNamespace(
        rms_norm=lambda x, weight, eps: LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False),
        silu_mul=LigerSiLUMulFunction.apply, rope=liger_rotary_pos_emb,
        fused_loss=lambda weight, h, target, reduction: LigerFusedLinearCrossEntropyLoss(
            ignore_index=-100, reduction=reduction)(weight, h, target))


def _check_device(hf: nn.Module) -> None:
    device = next(hf.parameters()).device
    if device.type != "cuda":
        raise UnipeftError(f"accelerate() runs Triton GPU kernels but the model is on {device.type}; move it to a "
                           "CUDA GPU first, or train without accelerate")


def _hf(model: nn.Module) -> nn.Module:
    """The transformers model inside an AdaptedModel (or the model itself)."""
    return getattr(model, "model", None) if getattr(model, "_wrappers", None) is not None else model


def accelerate(model: nn.Module, *, enable: bool = True, rms_norm: bool = True, swiglu: bool = True,
               rope: bool = True, fused_loss: bool = True, cuda_graphs: bool = False) -> dict[str, int]:
    """Swap the base model's RMSNorm / SwiGLU / RoPE / loss for fused kernels (see the module docstring); works on
    a transformers model or an AdaptedModel, before or after attaching adapters. Returns how many of each were
    swapped. `cuda_graphs=True` also replays the layers from CUDA graphs (`graph_layers`, graphs.py): with the base
    ops fused, a LoRA step is bound by the host's kernel launches, which a graph removes. `enable=False` restores
    the plain ops (and drops the graphs)."""
    hf = _hf(model)
    if not enable:
        if hf.__dict__.get(graphs._STACK) is not None:
            graphs.graph_layers(model, enable=False)
        return _restore(hf)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise UnipeftError(f"accelerate() supports the {', '.join(SUPPORTED)} families, not {model_type!r}; train "
                           "this model without it (the plain path)")
    _check_device(hf)
    kernels = _liger()
    done = {"rms_norm": 0, "swiglu": 0, "rope": 0, "fused_loss": 0}
    act = getattr(hf.config, "hidden_act", "silu")
    for module in hf.modules():
        if getattr(module, _MARK, False):
            continue
        if rms_norm and type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight"):
            _patch(module, _rms_norm_forward, kernels)
            done["rms_norm"] += 1
        elif swiglu and act in ("silu", "swish") and all(hasattr(module, n) for n in ("gate_proj", "up_proj",
                                                                                      "down_proj")):
            _patch(module, _swiglu_forward, kernels)
            done["swiglu"] += 1
    if rope:
        modeling = importlib.import_module(type(hf).__module__)
        if hasattr(modeling, "apply_rotary_pos_emb"):
            _ROPE_ORIGINALS.setdefault(modeling.__name__, modeling.apply_rotary_pos_emb)
            modeling.apply_rotary_pos_emb = kernels.rope
            done["rope"] = 1
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if fused_loss and type(head) is nn.Linear and hasattr(hf, "model") and not getattr(hf, _MARK, False):
        _patch(hf, _fused_loss_forward, kernels)
        done["fused_loss"] = 1
    if cuda_graphs:
        done["cuda_graphs"] = graphs.graph_layers(model)
    return done


def _patch(module: nn.Module, forward, kernels: SimpleNamespace) -> None:
    module.forward = MethodType(forward, module)
    module._unipeft_kernels = kernels
    setattr(module, _MARK, True)


def _restore(hf: nn.Module) -> dict[str, int]:
    done = {"restored": 0}
    for module in hf.modules():
        if getattr(module, _MARK, False):
            for attr in ("forward", "_unipeft_kernels", _MARK):
                module.__dict__.pop(attr, None)
            done["restored"] += 1
    name = type(hf).__module__
    if name in _ROPE_ORIGINALS:
        importlib.import_module(name).apply_rotary_pos_emb = _ROPE_ORIGINALS.pop(name)
    return done


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm (fp32 statistics, weight applied in the input dtype) as one kernel each way."""
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return self._unipeft_kernels.rms_norm(hidden_states, self.weight, eps)


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) ⊙ up(x)) with silu and the product in one kernel; the projections stay modules."""
    return self.down_proj(self._unipeft_kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


def _fused_loss_forward(self: nn.Module, *args: Any, labels: torch.Tensor | None = None, **kwargs: Any):
    """With labels: decoder, then chunked linear + cross-entropy on the head's weight (causal shift, ignore index
    -100, mean over counted tokens or sum / num_items_in_batch like transformers' loss); logits are not returned.
    Without labels: the model's own forward."""
    if labels is None:
        return type(self).forward(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)
    n_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("return_dict", None)
    out = self.model(*args, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1).to(h.device)
    head = self.get_output_embeddings()
    loss = self._unipeft_kernels.fused_loss(head.weight, h, target, "mean" if n_items is None else "sum")
    if n_items is not None:
        loss = loss / n_items
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                                  hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None))
