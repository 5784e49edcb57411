"""Prompt tuning's plumbing around the wrapped model's forward: the learned tokens go before the input embeddings,
and the attention mask, token types and labels grow to match; outputs are trimmed back to the caller's positions."""

from __future__ import annotations

from typing import Any

import torch

from .arch import accepts, is_encoder
from .errors import UnipeftError


def prompt_sources(am) -> list[tuple[str, torch.Tensor]]:
    """(adapter, its prompt tokens) for the adapters this call uses that have prompt tokens. Runs at every model
    call: without prompt adapters (the model keeps the flag, `AdaptedModel._refresh`) it reads no layer — a
    compiled call would otherwise guard every layer, reached both here and through the module tree."""
    if not am.__dict__.get("_has_prompt", True):
        return []
    routing_names = None
    for w in am._wrappers.values():
        routing_names = None if w.routing is None else w.routing.names
        break
    wanted = [n for n in dict.fromkeys(routing_names)] if routing_names is not None else am.active
    out = []
    for w in am._wrappers.values():
        if not w.holds_prompt:
            continue
        for n in wanted:
            for sa in w.sites_of(n):
                if sa.role == "embed":
                    out.append((n, sa.fn()))
    return out

def with_prompt(am, args: tuple, kwargs: dict) -> tuple[tuple, dict, int, torch.Tensor | None]:
    """Prompt tuning: embed the input, put the learned tokens first, extend mask / labels / token types. Returns the
    new call, the number of prompt positions and, for a routed encoder batch, each row's own number of them (the
    rows are packed; see `_pack_rows`), else None."""
    sources = prompt_sources(am)
    if not sources:
        return args, kwargs, 0, None
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        return args, kwargs, 0, None  # the prompt is already in the cache (and the caller's mask covers it)
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1:
            raise UnipeftError("with prompt tuning pass inputs as keywords (input_ids=..., attention_mask=...)")
        kwargs["input_ids"] = args[0]
    if kwargs.get("position_ids") is not None:
        raise UnipeftError("prompt tuning shifts positions: omit position_ids and let the model number them")
    input_ids = kwargs.pop("input_ids", None)
    embeds = kwargs.pop("inputs_embeds", None)
    if embeds is None:
        if input_ids is None:
            raise UnipeftError("prompt tuning needs input_ids or inputs_embeds")
        embeds = am.model.get_input_embeddings()(input_ids)
    batch, seq = embeds.shape[:2]
    routing = next(iter(am._wrappers.values())).routing
    chunks, masks = [], []
    for name, tokens in sources:
        t = tokens.to(embeds.dtype)[None].expand(batch, -1, -1)
        rows = torch.ones(batch, dtype=torch.bool, device=embeds.device)
        if routing is not None:
            idx = routing.rows(name, batch, embeds.device)
            rows = torch.zeros_like(rows)
            if idx is not None:
                rows[idx] = True
            t = t * rows[:, None, None].to(t.dtype)
        chunks.append(t)
        masks.append(rows[:, None].expand(batch, tokens.shape[0]))
    n_prompt = sum(c.shape[1] for c in chunks)
    kwargs["inputs_embeds"] = torch.cat([*chunks, embeds], dim=1)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.long, device=embeds.device)
    kwargs["attention_mask"] = torch.cat([torch.cat(masks, dim=1).to(mask.dtype), mask], dim=1)
    if kwargs.get("token_type_ids") is not None:
        tt = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([tt.new_zeros(batch, n_prompt), tt], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == seq:
        kwargs["labels"] = torch.cat([labels.new_full((batch, n_prompt), -100), labels], dim=1)
    visible = torch.cat(masks, dim=1)
    if routing is not None and not bool(visible.all()) and is_encoder(am.model):
        return (), _pack_rows(kwargs, visible, seq), n_prompt, visible.sum(dim=1)
    if routing is not None and not bool(kwargs["attention_mask"][:, :n_prompt].all()) and accepts(
            am.model, "position_ids"):
        # Rows without (all of) the prompt keep their real tokens at the positions they would have alone.
        skipped = (1 - visible.long()).sum(dim=1, keepdim=True)
        width = kwargs["attention_mask"].shape[1]
        positions = torch.arange(width, device=embeds.device)[None].expand(batch, -1)
        kwargs["position_ids"] = (positions - skipped).clamp(min=0)
    return (), kwargs, n_prompt, None


def _pack_rows(kwargs: dict, visible: torch.Tensor, seq: int) -> dict:
    """A routed batch on an encoder: each row's own prompt tokens first, then its input, then the prompt slots it
    does not use (masked) — so every row's first position is what it would be alone: BERT's pooler and
    first-token heads read [CLS] for rows without a prompt, not a masked slot. Positions are then 0, 1, … for every
    row, as alone (an encoder has no KV cache to keep consistent)."""
    batch, n = visible.shape
    cols = torch.arange(n + seq, device=visible.device)[None].expand(batch, -1)
    rank = torch.where(torch.cat([visible, visible.new_ones(batch, seq)], dim=1), cols, cols + 2 * (n + seq))
    order = torch.sort(rank, dim=1, stable=True).indices  # visible prompt slots, input, then the unused slots
    for key in ("inputs_embeds", "attention_mask", "token_type_ids", "labels"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == n + seq:
            index = order.view(batch, -1, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
            kwargs[key] = t.gather(1, index)
    return kwargs


def strip_prompt(out: Any, n: int, width: int, rows: torch.Tensor | None = None) -> Any:
    """Drop the prompt positions from per-token outputs so they line up with the caller's input (the loss was
    computed inside with the labels shifted accordingly). Outputs that cover fewer positions (logits_to_keep) stay.
    `rows`: each row's own number of prompt positions, for a packed batch (`_pack_rows`)."""
    def cut(t: torch.Tensor) -> torch.Tensor:
        if rows is None:
            return t[:, n:]
        index = (rows[:, None] + torch.arange(width - n, device=t.device)[None]).to(t.device)
        return t.gather(1, index[..., None].expand(-1, -1, t.shape[2]))

    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[1] == width:
            setattr(out, key, cut(t))
    hs = getattr(out, "hidden_states", None)
    if isinstance(hs, tuple):
        out.hidden_states = tuple(cut(h) if h.shape[1] == width else h for h in hs)
    return out


