"""What each peft method's tensors mean, in unipeft's knobs — both directions.

- LoRA: lora_A.weight (r × in), lora_B.weight (out × r), DoRA's lora_magnitude_vector (out) per module →
  lowrank, scaled, s = lora_alpha / r (rsLoRA: / √r), `magnitude` for DoRA.
- IA3: ia3_l per module, (out × 1) scales the output, (1 × in) the input (a `feedforward_modules` entry) →
  vector, multiply, on the module's output (or its input: target `module:in`).
- prefix tuning: prompt_embeddings (l × L·2·n_kv·d_head): per virtual token, layer i's keys then its values →
  prefix, add, `positions: shift` (peft's semantics: the real tokens sit after the prefix).
- prompt tuning: prompt_embeddings (l × d_model) → tokens, concat, at the input embeddings.

Import builds the recipe from the *tensors* (ranks from shapes, IA3's side from its shape), so target_modules may be
a list or a regex, and rank/alpha patterns need no pattern matching beyond alpha. Export writes exactly what peft
computes; where a unipeft adapter has no exact peft form (a bottleneck, a gated prefix, DoRA on part of a fused
projection, a prefix on some layers only) it refuses with the reason. LoRA or IA3 on parts of a fused projection
(GPT-2's `c_attn` q/k/v chunks) do have an exact form: a block-structured LoRA of rank Σr on the whole module, or
an IA3 vector with ones on the unadapted rows.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import torch

from .arch import family_of, find_layers, is_linear, linear_dims, logical_modules, resolve, text_config
from .errors import UnipeftError
from .peft_io import copy_into
from .recipe import Part, Recipe

ROLES = {"LORA": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"), "IA3": ("ia3_l",),
         "PREFIX_TUNING": (), "PROMPT_TUNING": ()}
Filler = Callable[[Any, str], None]


def _pattern_value(module: str, pattern: dict[str, Any] | None, default: Any) -> Any:
    """peft's rank/alpha pattern lookup: a key matches a module whose name ends with it (as a regex)."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _sites(am, path: str, name: str) -> list:
    return list(am._wrappers[path].sites_of(name))


def _linear(model: torch.nn.Module, path: str) -> torch.nn.Module:
    module = dict(logical_modules(model))[path]
    if not is_linear(module):
        raise UnipeftError(f"peft adapts '{path}', which is a {type(module).__name__}, not a linear layer; unipeft "
                           "imports adapters on linear (and Conv1D) layers")
    return module


# ---- import ----------------------------------------------------------------------------------------------------------
def _import_lora(model, cfg: dict[str, Any], core: dict) -> tuple[Recipe, Filler]:
    groups: dict[tuple[int, float], list[str]] = {}
    for path, t in core.items():
        _linear(model, path)
        for role in ("lora_A.weight", "lora_B.weight"):
            if role not in t:
                raise UnipeftError(f"peft module '{path}' has no {role} (base_model.model.{path}.{role})")
        if cfg.get("use_dora") and "lora_magnitude_vector" not in t:
            raise UnipeftError(f"use_dora is set but '{path}' has no lora_magnitude_vector")
        r = int(t["lora_A.weight"].shape[0])
        alpha = float(_pattern_value(path, cfg.get("alpha_pattern"), cfg.get("lora_alpha", 8)))
        groups.setdefault((r, alpha), []).append(path)
    rule = "alpha/sqrt(r)" if cfg.get("use_rslora") else "alpha/r"
    parts = tuple(Part(name=f"lora{i}" if len(groups) > 1 else "lora", function="lowrank", composition="scaled",
                       targets=tuple(sorted(paths)), r=r, alpha=alpha, scale=rule,
                       magnitude=bool(cfg.get("use_dora")), dropout=float(cfg.get("lora_dropout") or 0.0))
                  for i, ((r, alpha), paths) in enumerate(sorted(groups.items())))

    def fill(am, name: str) -> None:
        for path, t in core.items():
            (sa,) = _sites(am, path, name)
            key = f"base_model.model.{path}."
            copy_into(sa.fn.down.weight, t["lora_A.weight"], key + "lora_A.weight")
            copy_into(sa.fn.up.weight, t["lora_B.weight"], key + "lora_B.weight")
            if hasattr(sa, "magnitude"):
                copy_into(sa.magnitude, t["lora_magnitude_vector"], key + "lora_magnitude_vector")

    return Recipe("peft_lora", parts, "imported from a peft LoRA checkpoint").validate(), fill


def _import_ia3(model, cfg: dict[str, Any], core: dict) -> tuple[Recipe, Filler]:
    outs, ins = [], []
    for path, t in core.items():
        d_in, d_out = linear_dims(_linear(model, path))
        shape = tuple(t["ia3_l"].shape)
        if shape == (d_out, 1):
            outs.append(path)
        elif shape == (1, d_in):
            ins.append(path)
        else:
            raise UnipeftError(f"peft tensor 'base_model.model.{path}.ia3_l' has shape {list(shape)}; this model's "
                               f"'{path}' expects [{d_out}, 1] (output scale) or [1, {d_in}] (feedforward input "
                               "scale): another base model?")
    parts = []
    if outs:
        parts.append(Part(name="ia3", function="vector", composition="multiply", targets=tuple(sorted(outs))))
    if ins:
        parts.append(Part(name="ia3_ff", function="vector", composition="multiply",
                          targets=tuple(sorted(f"{p}:in" for p in ins))))

    def fill(am, name: str) -> None:
        for path, t in core.items():
            (sa,) = _sites(am, path, name)
            copy_into(sa.fn.scale, t["ia3_l"].flatten(), f"base_model.model.{path}.ia3_l")

    return Recipe("peft_ia3", tuple(parts), "imported from a peft IA3 checkpoint").validate(), fill


def _table(cfg: dict[str, Any], core: dict) -> torch.Tensor:
    table = core[""]["prompt_embeddings"]
    n = cfg.get("num_virtual_tokens")
    if table.dim() != 2 or (n is not None and table.shape[0] != n):
        raise UnipeftError(f"peft tensor 'prompt_embeddings' has shape {list(table.shape)}; the config says "
                           f"num_virtual_tokens={n}, so [{n}, width] was expected")
    return table


def _import_prefix(model, cfg: dict[str, Any], core: dict) -> tuple[Recipe, Filler]:
    table = _table(cfg, core)
    length = int(table.shape[0])
    part = Part(name="prefix", function="prefix", composition="add", sites=("kv",), length=length, positions="shift")
    bindings = resolve(model, part)

    def fill(am, name: str) -> None:
        sas = [(b.layer, _sites(am, b.module, name)[0]) for b in bindings]
        width = sas[0][1].fn.prefix.shape[2]
        expected = [length, len(sas) * 2 * width]
        if list(table.shape) != expected:
            raise UnipeftError(f"peft tensor 'prompt_embeddings' has shape {list(table.shape)}, this model expects "
                               f"{expected} ({len(sas)} layers × keys and values × {width}): another base model?")
        for layer, sa in sas:
            kv = table[:, 2 * layer * width:(2 * layer + 2) * width].reshape(length, 2, width).transpose(0, 1)
            copy_into(sa.fn.prefix, kv, f"prompt_embeddings[:, layer {layer}]")

    return Recipe("peft_prefix", (part,), "imported from a peft prefix-tuning checkpoint").validate(), fill


def _import_prompt(model, cfg: dict[str, Any], core: dict) -> tuple[Recipe, Filler]:
    table = _table(cfg, core)
    part = Part(name="prompt", function="tokens", composition="concat", sites=("embeddings",),
                length=int(table.shape[0]), init="bert")

    def fill(am, name: str) -> None:
        (sa,) = [sa for w in am._wrappers.values() for sa in w.sites_of(name)]
        copy_into(sa.fn.weight, table, "prompt_embeddings")

    return Recipe("peft_prompt", (part,), "imported from a peft prompt-tuning checkpoint").validate(), fill


IMPORTERS: dict[str, Callable[..., tuple[Recipe, Filler]]] = {
    "LORA": _import_lora, "IA3": _import_ia3, "PREFIX_TUNING": _import_prefix, "PROMPT_TUNING": _import_prompt}


# ---- export ----------------------------------------------------------------------------------------------------------
_KIND_OF = {"lowrank": "LORA", "vector": "IA3", "prefix": "PREFIX_TUNING", "tokens": "PROMPT_TUNING"}


def peft_kind(recipe: Recipe, name: str) -> str:
    """The one peft method that expresses `recipe`, or an error saying why none does."""
    where = f"adapter '{name}' ({recipe.name})"
    kinds = {_KIND_OF.get(p.function) for p in recipe.parts}
    if None in kinds or len(kinds) > 1:
        functions = ", ".join(f"{p.name}: {p.function}" for p in recipe.parts)
        raise UnipeftError(f"{where} has no peft form: peft saves one method per adapter — lowrank (LoRA), vector "
                           f"(IA3), prefix or prompt tokens — and this one has {functions}")
    kind = kinds.pop()
    for p in recipe.parts:
        if p.function == "lowrank" and (p.insertion != "parallel" or p.composition not in ("add", "scaled")):
            raise UnipeftError(f"{where} part '{p.name}' is a {p.insertion} {p.composition} lowrank; peft LoRA is "
                               "parallel with a constant scale")
        if p.function == "prefix" and p.composition != "add":
            raise UnipeftError(f"{where} part '{p.name}' is a gated prefix; peft prefix tuning has no gate")
        if p.function == "prefix" and p.positions != "shift":
            raise UnipeftError(f"{where} part '{p.name}' keeps the real tokens at positions 0..T-1 (positions: keep), "
                               "but peft's prefixes move them after the prefix, so peft would compute something "
                               "else; train with positions=shift to export")
    if kind in ("PREFIX_TUNING", "PROMPT_TUNING") and len(recipe.parts) > 1:
        raise UnipeftError(f"{where} has {len(recipe.parts)} {kind.lower()} parts; peft has one table per adapter")
    return kind


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous()


def _export_lora(am, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    recipe = am.recipes[name]
    rs = {p.scale == "alpha/sqrt(r)" for p in recipe.parts}
    dora = {p.magnitude for p in recipe.parts}
    if len(rs) > 1 or len(dora) > 1:
        raise UnipeftError(f"adapter '{name}' mixes rsLoRA/DoRA and plain parts; peft has one flag for the whole "
                           "adapter")
    rslora, use_dora = rs.pop(), dora.pop()
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv1d = False
    for path, w in am._wrappers.items():
        sites = list(w.sites_of(name))
        if not sites:
            continue
        if any(sa.role != "out" for sa in sites):
            raise UnipeftError(f"adapter '{name}' adapts '{path}' at a {sites[0].role} site; peft LoRA adapts a "
                               "linear layer's output")
        fused = len(sites) > 1 or sites[0].chunk is not None
        if use_dora and fused:
            raise UnipeftError(f"adapter '{name}' puts DoRA on part of the fused projection '{path}'; DoRA normalises "
                               "the whole weight, so this has no exact peft form")
        scales = {float(sa.scale()) for sa in sites}
        if len(scales) > 1:
            raise UnipeftError(f"'{path}' carries LoRA parts with different scales {sorted(scales)}; peft has one "
                               "scale per module")
        s = scales.pop()
        down = torch.cat([sa.fn.down.weight for sa in sites])
        if fused:  # block-structured: rows of each chunk take their own columns of B
            d_full = linear_dims(w.base_layer)[1]
            up = down.new_zeros(d_full, down.shape[0])
            col = 0
            for sa in sites:
                r_i = sa.fn.up.weight.shape[1]
                up[sa.span[0]:sa.span[1], col:col + r_i] = sa.fn.up.weight
                col += r_i
        else:
            up = sites[0].fn.up.weight
        r = int(down.shape[0])
        conv1d = conv1d or not isinstance(w.base_layer, torch.nn.Linear)
        ranks[path] = r
        alphas[path] = s * (r ** 0.5 if rslora else r)
        tensors[f"base_model.model.{path}.lora_A.weight"] = _detached(down)
        tensors[f"base_model.model.{path}.lora_B.weight"] = _detached(up)
        if use_dora:
            tensors[f"base_model.model.{path}.lora_magnitude_vector"] = _detached(sites[0].magnitude)
    if not ranks:
        raise UnipeftError(f"adapter '{name}' has no LoRA modules to export")
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {"r": r0, "lora_alpha": a0, "target_modules": sorted(ranks), "lora_dropout": recipe.parts[0].dropout,
              "bias": "none", "use_rslora": rslora, "use_dora": use_dora,
              "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != r0},
              "alpha_pattern": {re.escape(p): a for p, a in alphas.items() if a != a0},
              "fan_in_fan_out": conv1d, "init_lora_weights": True}
    return tensors, config


def _export_ia3(am, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    targets, feedforward = [], []
    conv1d = False
    for path, w in am._wrappers.items():
        sites = list(w.sites_of(name))
        if not sites:
            continue
        roles = {sa.role for sa in sites}
        if roles - {"out", "in"} or len(roles) > 1:
            raise UnipeftError(f"adapter '{name}' scales '{path}' at {', '.join(sorted(roles))}; peft IA3 scales one "
                               "side (output, or input for feedforward_modules) of a linear layer")
        d_in, d_out = linear_dims(w.base_layer)
        sa0 = sites[0]
        vec = torch.ones(d_in if sa0.role == "in" else d_out, dtype=sa0.dtype, device=sa0.fn.scale.device)
        for sa in sites:
            a, b = (0, d_in) if sa.role == "in" else sa.span
            vec[a:b] = vec[a:b] * sa.fn.scale.detach()
        targets.append(path)
        conv1d = conv1d or not isinstance(w.base_layer, torch.nn.Linear)
        if sa0.role == "in":
            feedforward.append(path)
            tensors[f"base_model.model.{path}.ia3_l"] = _detached(vec[None, :])
        else:
            tensors[f"base_model.model.{path}.ia3_l"] = _detached(vec[:, None])
    config = {"target_modules": sorted(targets), "feedforward_modules": sorted(feedforward), "fan_in_fan_out": conv1d,
              "init_ia3_weights": True}
    return tensors, config


def _prompt_config(am, length: int, width: int, heads: int | None = None) -> dict[str, Any]:
    cfg = text_config(am.model)
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    return {"num_virtual_tokens": length, "token_dim": width, "num_transformer_submodules": 1,
            "num_attention_heads": heads or n_heads, "num_layers": n_layers}


def _export_prefix(am, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from .peft_io import task_type

    takes_cache = any("past_key_values" in inspect.signature(m.forward).parameters
                      for m in (am.model, getattr(am.model, "base_model", am.model)))
    if task_type(am.model) != "CAUSAL_LM" and not takes_cache:
        raise UnipeftError(f"peft runs prefix tuning on a {task_type(am.model)} model only if its forward declares "
                           f"past_key_values, which {type(am.model).__name__}'s does not: peft could not load this "
                           "prefix adapter (causal LMs work)")
    fmap = family_of(am.model)
    n_layers = len(find_layers(am.model, fmap)[1]) if fmap is not None else None
    (part,) = am.recipes[name].parts
    layers = {b.layer: b.module for b in resolve(am.model, part)}
    if n_layers is None or sorted(layers) != list(range(n_layers)):
        raise UnipeftError(f"adapter '{name}' has prefixes on layers {sorted(layers)}; peft prefix tuning puts one on "
                           "every layer")
    rows = []
    for i in range(n_layers):
        (sa,) = _sites(am, layers[i], name)
        k, v = sa.fn.kv()  # each (n_kv, l, d_head)
        n_kv = k.shape[0]
        rows += [k.permute(1, 0, 2).reshape(part.length, -1), v.permute(1, 0, 2).reshape(part.length, -1)]
    table = torch.cat(rows, dim=1)
    width = rows[0].shape[1]
    config = {**_prompt_config(am, part.length, width, heads=n_kv), "encoder_hidden_size": width,
              "prefix_projection": False}
    return {"prompt_embeddings": _detached(table)}, config


def _export_prompt(am, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    (sa,) = [sa for w in am._wrappers.values() for sa in w.sites_of(name)]
    table = sa.fn.weight
    return {"prompt_embeddings": _detached(table)}, {**_prompt_config(am, table.shape[0], table.shape[1]),
                                                      "prompt_tuning_init": "RANDOM"}


EXPORTERS: dict[str, Callable[[Any, str], tuple[dict[str, torch.Tensor], dict[str, Any]]]] = {
    "LORA": _export_lora, "IA3": _export_ia3, "PREFIX_TUNING": _export_prefix, "PROMPT_TUNING": _export_prompt}
