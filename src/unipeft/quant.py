"""Quantized frozen bases (QLoRA): bitsandbytes NF4 / FP4 (optionally double-quantized) and int8 linears.

Adapters never need a layer class per quantization backend: `AdapterLayer` keeps the quantized module as its
`base_layer` and runs it as is, and the few places that need the frozen weight as numbers (DoRA's norm, merging)
ask this module's one interface:

    is_quantized(module)        is this a quantized linear we understand?
    dequantized_weight(module)  its weight as a float (d_out × d_in) tensor
    requantize(module, weight)  store a new float weight in the module's own format; returns the rounding error

Supporting another backend means adding one entry to `_BACKENDS` (how to dequantize, how to requantize), not a layer.

`quantize(model, "nf4" | "fp4" | "int8", double_quant=True, compute_dtype=...)` swaps a loaded model's transformer-
layer linears for bitsandbytes ones in place (embeddings, the LM head and classifier heads stay in full precision, as
in QLoRA); models loaded through transformers' `BitsAndBytesConfig` work the same way. bitsandbytes is an optional
extra: `pip install 'unipeft[quant]'`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import kernels_q4
from .errors import UnipeftError

KINDS = ("nf4", "fp4", "int8")


def _bnb():
    import logging

    # bitsandbytes' CPU backend logs a warning at import when an optional kernels package is missing; it still works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UnipeftError("quantization needs bitsandbytes, which is not installed: pip install 'unipeft[quant]'") \
            from None
    return bnb


# ---- the one interface -----------------------------------------------------------------------------------------------
def _dequant_4bit(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    bnb = _bnb()
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its CPU kernel at the first eval-mode forward; undo it as its own
        # state_dict saving does (the next eval forward packs again)
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data,
                                                                                               state)
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)


def _requant_4bit(module: nn.Module, weight: torch.Tensor) -> None:
    bnb = _bnb()
    old = module.weight
    new = bnb.nn.Params4bit(weight.to(torch.float32).cpu().contiguous(), requires_grad=False,
                            compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                            blocksize=old.blocksize)
    module.weight = new.to(old.device)
    _dequantize_to(module.weight, old.quant_state.dtype)


def _dequantize_to(weight: torch.Tensor, dtype: torch.dtype) -> None:
    """Make a 4-bit weight dequantize straight into `dtype`. bitsandbytes records the dtype it was quantized from
    and dequantizes into that; unipeft quantizes from fp32 (the original values, exactly) but computes in the
    layer's compute dtype, and an fp32 dequantization followed by a cast to bf16 writes 4 bytes per weight, reads
    them again and writes 2 — two launches and three passes where one does (a QLoRA step dequantizes every weight
    twice). The rounding is the same: dequantize rounds table·absmax once, into `dtype` instead of fp32 first."""
    weight.quant_state.dtype = dtype


def _int8_stats(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    w = module.weight
    scb = getattr(w, "SCB", None)
    if scb is None:  # bitsandbytes moves the statistics into the layer state after the first forward
        scb = module.state.SCB
    return w.data, scb


def _dequant_int8(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    cb, scb = _int8_stats(module)
    return (cb.float() * (scb.float()[:, None] / 127.0)).to(dtype)


def _requant_int8(module: nn.Module, weight: torch.Tensor) -> None:
    bnb = _bnb()
    device = module.weight.device
    module.weight = bnb.nn.Int8Params(weight.to(torch.float16 if device.type == "cuda" else torch.float32).cpu(),
                                      requires_grad=False, has_fp16_weights=False).to(device)
    module.state.SCB = None
    module.state.CB = None


#: class name -> (dequantize, requantize, kind of the module)
_BACKENDS: dict[str, tuple[Callable, Callable, Callable[[nn.Module], str]]] = {
    "Linear4bit": (_dequant_4bit, _requant_4bit, lambda m: m.weight.quant_type),
    "LinearNF4": (_dequant_4bit, _requant_4bit, lambda m: "nf4"),
    "LinearFP4": (_dequant_4bit, _requant_4bit, lambda m: "fp4"),
    "Linear8bitLt": (_dequant_int8, _requant_int8, lambda m: "int8"),
}


def is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ in _BACKENDS


def kind_of(module: nn.Module) -> str:
    return _BACKENDS[type(module).__name__][2](module)


def dequantized_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The frozen weight as a fresh `dtype` tensor (d_out × d_in), whatever format holds it. 4-bit weights
    dequantize straight into the dtype their quant state records (the compute dtype, for bases made by `quantize`)
    and are cast only if `dtype` differs."""
    if not is_quantized(module):
        raise UnipeftError(f"{type(module).__name__} is not a quantized linear layer")
    return _BACKENDS[type(module).__name__][0](module, dtype)


def dequantizer(module: nn.Module, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A function giving the weight as a fresh `dtype` tensor, for repeated use within one training step (the fused
    QLoRA path dequantizes in forward and again in backward). For 4-bit weights it calls bitsandbytes' ops directly —
    its Python wrappers cost more CPU time than the kernels take on the GPU. Where the 4-bit kernel runs it launches
    nothing itself: the kernel decodes a double-quantized absmax as it reads it (two launches fewer per weight and
    step). Elsewhere it decodes that absmax once, keeping it (4 bytes per 64 weights) until backward is done with
    the function."""
    state = getattr(module.weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or state.quant_type not in ("nf4", "fp4"):
        return lambda: dequantized_weight(module, dtype)
    ops = torch.ops.bitsandbytes
    data, args = module.weight.data, (state.blocksize, state.quant_type, state.shape, state.dtype)
    if dtype == state.dtype and kernels_q4.available(data, dtype, state.quant_type, state.blocksize,
                                                           tuple(state.shape)):
        # one Triton launch per weight, and W' = W + s·B·A in the same pass (kernels_q4.py): `weight.merged`; a
        # double-quantized absmax is decoded inside it (no launch here)
        codes, shape, block = kernels_q4.table(state.quant_type, data.device), tuple(state.shape), state.blocksize
        absmax = _kernel_absmax(state)

        def weight() -> torch.Tensor:
            return kernels_q4.q4_weight(data, absmax, codes, shape, block, dtype)

        weight.merged = lambda b, a, s: kernels_q4.q4_weight(data, absmax, codes, shape, block, dtype, b, a, s)
        return weight
    absmax = _decoded_absmax(state)

    def weight() -> torch.Tensor:
        w = ops.dequantize_4bit.default(data, absmax, *args)
        return w if w.dtype == dtype else w.to(dtype)
    return weight


def _decoded_absmax(state) -> torch.Tensor:
    """A 4-bit weight's absmax, fp32, one per block; a double-quantized one decoded by bitsandbytes' op."""
    if not state.nested:
        return state.absmax
    s2 = state.state2
    absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(state.absmax, s2.absmax, s2.code, s2.blocksize,
                                                                 s2.dtype)
    return absmax.float() + state.offset


def _kernel_absmax(state):
    """The absmax as the 4-bit kernel takes it: a double-quantized one as stored (decoded in the kernel), when it
    has the layout the kernel reads (uint8 codes, fp32 values and scales, the offset as a one-element tensor, on
    the weight's device); else decoded here."""
    s2 = getattr(state, "state2", None)
    if (state.nested and s2 is not None and state.absmax.dtype == torch.uint8 and isinstance(state.offset, torch.Tensor)
            and state.offset.numel() == 1 and s2.absmax.dtype == s2.code.dtype == torch.float32
            and state.offset.dtype == torch.float32 and s2.blocksize > 0
            and state.absmax.device == s2.absmax.device == s2.code.device == state.offset.device):
        return kernels_q4.Nested(state.absmax, s2.code, s2.absmax, state.offset, s2.blocksize)
    return _decoded_absmax(state).float()


def requantize(module: nn.Module, weight: torch.Tensor) -> float:
    """Store `weight` (d_out × d_in) in the module's own quantized format; returns the max abs rounding error."""
    _BACKENDS[type(module).__name__][1](module, weight)
    return float((dequantized_weight(module) - weight.float().to(module.weight.device)).abs().max())


def keep_exact_on_cpu(module: nn.Module) -> None:
    """Opt a 4-bit layer out of bitsandbytes' CPU repacking: on AVX512-bf16 CPUs its first eval-mode forward repacks
    the weight for a bf16 kernel (block scales rounded to bf16, and layers narrower than a 64-block fail). unipeft
    keeps the exact dequantize-then-matmul path, so eval equals training-mode numerics (CPU QLoRA is for checking)."""
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def compute_dtype(module: nn.Module) -> torch.dtype:
    dtype = getattr(module, "compute_dtype", None)
    if dtype is None:
        dtype = module.bias.dtype if getattr(module, "bias", None) is not None else torch.float32
    return dtype


# ---- quantizing a model ----------------------------------------------------------------------------------------------
def _targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linears to quantize: those inside the transformer layers when the family is mapped, else every linear
    except the output head."""
    from .arch import family_of, find_layers, logical_modules

    fmap = family_of(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if fmap is not None:
        layers_path, _ = find_layers(model, fmap)
        prefix = layers_path + "."
    else:
        prefix = ""
    return [(n, m) for n, m in logical_modules(model)
            if type(m) is nn.Linear and n.startswith(prefix) and m is not head]


def quantize(model: nn.Module, kind: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the model's transformer-layer linears by bitsandbytes ones, in place; returns the model.

    kind: nf4 / fp4 (4-bit, blocks of 64, `double_quant` also quantizes the block scales: ~0.52 bytes per weight)
    or int8 (LLM.int8 weights, one scale per row). compute_dtype: what the 4-bit layers compute in (default: the
    weights' dtype; use float32 on CPU)."""
    from .arch import set_module

    bnb = _bnb()
    if kind not in KINDS:
        raise UnipeftError(f"unknown quantization '{kind}'; choose one of {', '.join(KINDS)}")
    if any(is_quantized(m) for m in model.modules()):
        raise UnipeftError("this model is already quantized")
    if any(getattr(m, "_unipeft_wrapper", False) for m in model.modules()):
        raise UnipeftError("quantize the base before attaching adapters")
    targets = _targets(model)
    if not targets:
        raise UnipeftError(f"{type(model).__name__} has no plain linear layers to quantize")
    for path, lin in targets:
        w = lin.weight.data
        dtype = compute_dtype or w.dtype
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
            q.weight = bnb.nn.Int8Params(w.to(torch.float16 if w.is_cuda else torch.float32).cpu(),
                                         requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=dtype, compress_statistics=double_quant, quant_type=kind)
            q.weight = bnb.nn.Params4bit(w.float().cpu(), requires_grad=False, compress_statistics=double_quant,
                                         quant_type=kind)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.to(dtype).cpu(), requires_grad=False)
        q = q.to(w.device)  # moving to the device is what quantizes in bitsandbytes
        if kind != "int8":
            _dequantize_to(q.weight, dtype)
        keep_exact_on_cpu(q)
        q.train(lin.training)  # (a new module starts in train mode; inside an eval model it must be eval too)
        set_module(model, path, q)
    model.__dict__["_unipeft_quantized"] = kind
    return model


def footprint(model: nn.Module) -> dict[str, Any]:
    """Bytes the quantized linears hold (weights, scales, bias) per weight they stand for; the whole model's too."""
    q_bytes = q_params = 0
    for m in model.modules():
        if is_quantized(m):
            w = m.weight
            q_bytes += w.numel() * w.element_size()
            state = getattr(w, "quant_state", None)
            if state is not None:
                q_bytes += state.absmax.numel() * state.absmax.element_size()
                if getattr(state, "state2", None) is not None:
                    q_bytes += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4 * 256
                q_params += int(torch.Size(state.shape).numel())
            else:
                _, scb = _int8_stats(m)
                q_bytes += scb.numel() * scb.element_size()
                q_params += w.numel()
            if m.bias is not None:
                q_bytes += m.bias.numel() * m.bias.element_size()
    other = [(n, p) for n, p in model.named_parameters() if not _in_quantized(model, n)]
    total = q_bytes + sum(p.numel() * p.element_size() for _, p in other)
    return {"quantized_weights": q_params, "bytes_per_quantized_weight": q_bytes / max(q_params, 1),
            "model_bytes": total, "bytes_per_parameter": total / max(q_params + sum(p.numel() for _, p in other), 1)}


def _in_quantized(model: nn.Module, param_name: str) -> bool:
    owner = model.get_submodule(param_name.rpartition(".")[0]) if "." in param_name else model
    return is_quantized(owner)


# ---- merging into a plain model --------------------------------------------------------------------------------------
def plain_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A float nn.Linear holding a quantized module's dequantized weight (and its bias)."""
    w = dequantized_weight(module)
    dtype = dtype or compute_dtype(module)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w.to(dtype))
        if module.bias is not None:
            lin.bias.copy_(module.bias.to(dtype))
    lin.requires_grad_(False)
    return lin


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear by its dequantized float twin and drop the quantization markers."""
    from .arch import logical_modules, set_module

    for path, m in list(logical_modules(model)):
        if is_quantized(m):
            set_module(model, path, plain_linear(m, dtype))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.__dict__.pop("_unipeft_quantized", None)
    return model


def merge_requantized(am, names: list[str]) -> dict[str, Any]:
    """Merge adapters into quantized weights: dequantize, fold exactly in float32 (the same `merge_into` as a plain
    base), requantize. Lossy — returns the largest rounding error it introduced and how many modules it touched."""
    worst, touched = 0.0, 0
    for w in am._wrappers.values():
        for n in names:
            if n not in w.adapters:
                continue
            if not is_quantized(w.base_layer):
                w.merge(n)
                continue
            temp = plain_linear(w.base_layer, torch.float32)
            for sa in w.sites_of(n):
                sa.merge_into(temp)
            worst = max(worst, requantize(w.base_layer, temp.weight.data))
            touched += 1
            w.merged.append(n)
            w._forget_plan()
    return {"adapters": list(names), "quantized_modules": touched, "max_abs_rounding_error": worst}


def merge_dequantized(am, dtype: torch.dtype | None = None) -> nn.Module:
    """The active adapters merged into the dequantized weights: a plain float model (returned; `am` is detached)."""
    names = [n for n in am.active if n not in am.merged]
    if any(n in getattr(am, "_requantized", ()) for n in am.merged):
        raise UnipeftError("an adapter was merged into the quantized weights with rounding; reload the base to "
                           "merge into dequantized weights exactly")
    if names:  # refuse what merge() would refuse before anything changes
        from .merging import check

        check(am, None)
    for w in am._wrappers.values():
        if is_quantized(w.base_layer):
            w.base_layer = plain_linear(w.base_layer, dtype)
            w._forget_plan()
    if names:
        am.merge()
    model = am.detach()
    return dequantize_model(model, dtype)
