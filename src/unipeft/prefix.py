"""Prefix tuning through transformers' attention-function interface — no copy of any model's attention code.

transformers ≥ 5 attention modules compute q, k, v (after RoPE, with the KV cache applied) and then call
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, ...)`. We register one function,
`unipeft_prefix`, give each adapted attention module its own shallow config copy that selects it, and in it prepend
the adapter's l prefix keys/values (per KV head, so GQA models work) before calling the model's original eager or
SDPA function. The mask gains l leading "attend" columns.

Semantics (document-worthy): with `positions: keep` (the default) prefix vectors are not stored in the KV cache and
do not take positions, so the real tokens keep positions 0..T-1 and `generate()` works unchanged with the cache; every
decoding step attends to the prefix again. peft feeds prefixes as past key/values instead, which moves the real
tokens to positions l..l+T-1; `positions: shift` reproduces that (a forward pre-hook adds l to the position ids, see
`shifted_positions`), so imported peft prefix adapters give peft's outputs. A gated prefix (UniPELT) mixes the
frozen and the prefixed attention per token with a learned sigmoid gate (see `prefix_attention`).
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from .errors import UnipeftError

NAME = "unipeft_prefix"
_SUPPORTED = ("eager", "sdpa")
#: keys in an adapted attention module's __dict__: its AdapterLayer wrapper and the config it had before (structural,
#: not per-call state). Kept on the module itself — not in a table keyed by the module — so that a deep copy or a
#: pickle of the model carries them along, each copy pointing at its own copied wrapper.
WRAPPER, ORIGINAL_CONFIG = "_unipeft_prefix_wrapper", "_unipeft_original_config"
_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, prefix_attention)
        _registered = True


def install(attn: nn.Module, wrapper: nn.Module, where: str) -> None:
    """Route `attn`'s attention call through `prefix_attention` (idempotent)."""
    if WRAPPER in attn.__dict__:
        return
    config = getattr(attn, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    if impl is None:
        impl = "eager"
    if impl not in _SUPPORTED:
        raise UnipeftError(f"prefix tuning at {where} needs eager or sdpa attention, not '{impl}'; load the model "
                           "with attn_implementation='sdpa'")
    if config is None:
        raise UnipeftError(f"{where} ({type(attn).__name__}) has no config, so its attention function cannot be "
                           "routed; prefix tuning needs a transformers attention module")
    _register()
    local = copy.copy(config)
    local._attn_implementation = NAME
    local.__dict__["_unipeft_original_attn"] = impl
    attn.__dict__[ORIGINAL_CONFIG] = config
    attn.config = local
    attn.__dict__[WRAPPER] = wrapper  # (a plain attribute: not a submodule, so not in the module tree twice)


def uninstall(attn: nn.Module) -> None:
    if WRAPPER in attn.__dict__:
        attn.config = attn.__dict__.pop(ORIGINAL_CONFIG)
        del attn.__dict__[WRAPPER]


def _original_function(module: nn.Module):
    impl = module.config.__dict__.get("_unipeft_original_attn", "eager")
    if impl == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise UnipeftError(f"{type(module).__name__}'s module has no eager_attention_forward; use sdpa attention")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs):
    """Prepend the active prefixes to key/value (B, H_kv, S, D) and extend the mask, then call the original.

    Gated prefixes (UniPELT): out = Attn(x) + g·(Attn_prefix(x) − Attn(x)), g = σ(w·x_t + b) per token — g = 0 is
    exactly the frozen attention, g = 1 plain prefix tuning, and each token's gate depends only on that token, so the
    KV cache gives the same result as recomputing the whole sequence.
    """
    original = _original_function(module)
    wrapper = module.__dict__.get(WRAPPER)
    call = None if wrapper is None else wrapper.prefix_call
    if not call or not call[0]:
        return original(module, query, key, value, attention_mask, **kwargs)
    items, hidden = call
    batch, q_len, s_len = query.shape[0], query.shape[2], key.shape[2]
    keys, values, visible = [], [], []
    gate = None
    for name, sa in items:
        pk, pv = sa.fn.kv()
        keys.append(pk.to(key.dtype)[None].expand(batch, -1, -1, -1))
        values.append(pv.to(value.dtype)[None].expand(batch, -1, -1, -1))
        rows = torch.ones(batch, dtype=torch.bool, device=key.device)
        if wrapper.routing is not None:
            idx = wrapper.routing.rows(name, batch, key.device)
            rows = torch.zeros_like(rows)
            if idx is not None:
                rows[idx] = True
        visible.append(rows[:, None].expand(batch, pk.shape[1]))
        if sa.composition == "gated" and hidden is not None:
            g = torch.sigmoid(sa.gate(hidden.to(sa.dtype))).to(query.dtype)  # (B, T, 1)
            g = torch.where(rows[:, None, None], g, torch.ones_like(g))
            gate = g if gate is None else gate * g
    col_ok = torch.cat(visible, dim=1)  # (B, L)
    full_key = torch.cat([*keys, key], dim=2)
    full_value = torch.cat([*values, value], dim=2)
    mask = _extend_mask(module, attention_mask, col_ok, q_len, s_len, query.dtype, kwargs.get("is_causal"))
    eager = module.config.__dict__.get("_unipeft_original_attn") == "eager"
    if mask is not None and mask.dtype == torch.bool and eager:
        # eager attention adds the mask to the scores: it needs 0 / -inf, not True / False
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    out, weights = original(module, query, full_key, full_value, mask, **kwargs)
    if gate is None:
        return out, weights
    base, _ = original(module, query, key, value, attention_mask, **kwargs)
    return base + gate[..., None] * (out - base), weights


def shifted_positions(args: tuple, kwargs: dict, lengths: list[tuple[str, int]], routing) -> tuple[tuple, dict]:
    """The wrapped model's (args, kwargs) with position_ids moved right by each row's prefix length.

    Without explicit position_ids the positions are the cache positions (past length + 0..T-1), as transformers
    numbers them; explicit ones (e.g. from `generate`, counted over the attention mask) are moved the same way."""
    ref = kwargs.get("input_ids")
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    if ref is None and args:
        ref = args[0]
    if ref is None:
        raise UnipeftError("a shifting prefix needs input_ids or inputs_embeds to number the positions")
    batch, seq, device = ref.shape[0], ref.shape[1], ref.device
    shift = torch.zeros(batch, dtype=torch.long, device=device)
    for name, length in lengths:
        if routing is None:
            shift += length
        else:
            idx = routing.rows(name, batch, device)
            if idx is not None:
                shift[idx] += length
    positions = kwargs.get("position_ids")
    if positions is None:
        start = kwargs.get("cache_position")
        if start is None:
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            positions = torch.arange(past, past + seq, device=device)[None].expand(batch, -1)
        else:
            positions = start.to(device)[None].expand(batch, -1)
    kwargs = dict(kwargs)
    kwargs["position_ids"] = positions + shift[:, None]
    return args, kwargs


def _extend_mask(module, mask, col_ok, q_len, s_len, dtype, is_causal_kw):
    """Give the mask l leading columns: 'attend' where the row uses that prefix, 'masked' otherwise."""
    batch, n_prefix = col_ok.shape
    device = col_ok.device
    if mask is None:
        causal = is_causal_kw if is_causal_kw is not None else getattr(module, "is_causal", False)
        if col_ok.all() and not (causal and q_len > 1):
            return None
        if causal and q_len > 1:
            i = torch.arange(q_len, device=device)[:, None]
            j = torch.arange(s_len, device=device)[None, :]
            base = j <= i + (s_len - q_len)
        else:
            base = torch.ones(q_len, s_len, dtype=torch.bool, device=device)
        pre = col_ok[:, None, None, :].expand(batch, 1, q_len, n_prefix)
        return torch.cat([pre, base[None, None].expand(batch, 1, q_len, s_len)], dim=-1)
    mb = mask.shape[0]
    if mb != batch and not col_ok.all():
        mask = mask.expand(batch, *mask.shape[1:])
        mb = batch
    ok = col_ok if mb == batch else col_ok[:1]
    pre = ok[:, None, None, :].expand(mb, mask.shape[1], mask.shape[2], n_prefix)
    if mask.dtype == torch.bool:
        return torch.cat([pre, mask], dim=-1)
    neg = torch.finfo(mask.dtype).min
    pre_f = torch.where(pre, torch.zeros((), dtype=mask.dtype, device=device),
                        torch.full((), neg, dtype=mask.dtype, device=device))
    return torch.cat([pre_f, mask], dim=-1)
