"""Hugging Face PEFT checkpoints (`adapter_config.json` + `adapter_model.safetensors`): LoRA, rsLoRA and DoRA so far.

Key mapping is structural: a peft key is `base_model.model.<module path>.<lora_A.weight | lora_B.weight |
lora_magnitude_vector>` (or `base_model.model.<module>.<param>` for `modules_to_save`); we parse it into (module path,
tensor role) and check the path against the model's own modules — never string replacement of key fragments. Adapters
on part of a fused projection (GPT-2's `c_attn` q/k/v) have no exact peft form and are refused on export.

peft semantics reproduced: s = lora_alpha / r (use_rslora: / √r), per-module r and alpha from `rank_pattern` and
`alpha_pattern` (a pattern matches a module whose name ends with it, as a regex), DoRA's magnitude vector.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .arch import is_linear, logical_modules
from .errors import UnipeftError
from .fsutil import atomic_folder
from .recipe import Part, Recipe

PREFIX = "base_model.model."
_LORA_FIELDS = {"peft_type", "task_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora",
                "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out", "init_lora_weights",
                "base_model_name_or_path", "inference_mode", "layers_to_transform", "layers_pattern", "revision",
                "peft_version", "auto_mapping", "exclude_modules"}
_ROLES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


def _pattern_value(module: str, pattern: dict[str, Any], default: Any) -> Any:
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    st, binf = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    try:
        if st.is_file():
            return load_file(str(st))
        if binf.is_file():
            return torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnipeftError(f"peft weights in '{directory}' are unreadable or need full pickle, which is refused: "
                           f"{str(e).splitlines()[0][:160]}") from None
    raise UnipeftError(f"'{directory}' has no adapter_model.safetensors or adapter_model.bin")


def import_peft(model: torch.nn.Module, directory: str | Path, name: str = "default"):
    """A peft LoRA/rsLoRA/DoRA checkpoint as a unipeft adapter on `model` (an `AdaptedModel`, the adapter active)."""
    import unipeft

    directory = Path(directory)
    cfg_path = directory / "adapter_config.json"
    if not cfg_path.is_file():
        raise UnipeftError(f"'{directory}' is not a peft adapter folder (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UnipeftError(f"{cfg_path} is not valid JSON: {e}") from None
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise UnipeftError(f"peft_type {kind!r} is not supported yet (LoRA, rsLoRA and DoRA are); IA3, prefix and "
                           "prompt tuning import is planned")
    unknown = sorted(k for k, v in cfg.items() if k not in _LORA_FIELDS and v not in (None, False, {}, [], ""))
    if unknown:
        warnings.warn(f"ignoring peft config fields this importer does not use: {', '.join(unknown)}", stacklevel=2)
    weights = _read_weights(directory)
    modules = dict(logical_modules(model))
    lora: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    save_roots = sorted(cfg.get("modules_to_save") or [], key=len, reverse=True)
    for key, tensor in weights.items():
        if not key.startswith(PREFIX):
            raise UnipeftError(f"peft tensor '{key}' does not start with '{PREFIX}'")
        rest = key[len(PREFIX):]
        role = next((r for r in _ROLES if rest.endswith("." + r)), None)
        if role is not None:
            path = rest[: -len(role) - 1]
            if path not in modules or not is_linear(modules[path]):
                raise UnipeftError(f"peft tensor '{key}' targets '{path}', which is not a linear module of "
                                   f"{type(model).__name__}: another base model?")
            lora.setdefault(path, {})[role] = tensor
            continue
        owner = next((m for m in _module_paths(modules) if rest.startswith(m + ".") and
                      any(m == s or m.endswith("." + s) for s in save_roots)), None)
        if owner is None:
            raise UnipeftError(f"peft tensor '{key}' fits no LoRA module and no modules_to_save entry of this model")
        saved.setdefault(owner, {})[rest[len(owner) + 1:]] = tensor
    if not lora:
        raise UnipeftError(f"'{directory}' holds no LoRA tensors")
    groups: dict[tuple[int, float], list[str]] = {}
    for path, t in lora.items():
        if "lora_A.weight" not in t or "lora_B.weight" not in t:
            raise UnipeftError(f"peft module '{path}' lacks lora_A or lora_B")
        r = int(t["lora_A.weight"].shape[0])
        alpha = float(_pattern_value(path, cfg.get("alpha_pattern"), cfg.get("lora_alpha", 8)))
        groups.setdefault((r, alpha), []).append(path)
    rule = "alpha/sqrt(r)" if cfg.get("use_rslora") else "alpha/r"
    parts = tuple(Part(name=f"lora{i}" if len(groups) > 1 else "lora", function="lowrank", composition="scaled",
                       targets=tuple(sorted(paths)), r=r, alpha=alpha, scale=rule,
                       magnitude=bool(cfg.get("use_dora")), dropout=float(cfg.get("lora_dropout") or 0.0))
                  for i, ((r, alpha), paths) in enumerate(sorted(groups.items())))
    recipe = Recipe("peft_lora", parts, "imported from a peft LoRA checkpoint").validate()
    am = unipeft.attach(model, recipe, name=name, train_modules=sorted(saved) or None)
    try:
        params = am.adapter_parameters(name)
        expected: dict[str, torch.Tensor] = {}
        for part in recipe.parts:
            for path in part.targets:
                t = lora[path]
                expected[f"{path}::{part.name}.out.fn.down.weight"] = t["lora_A.weight"]
                expected[f"{path}::{part.name}.out.fn.up.weight"] = t["lora_B.weight"]
                if part.magnitude:
                    if "lora_magnitude_vector" not in t:
                        raise UnipeftError(f"use_dora is set but '{path}' has no lora_magnitude_vector")
                    expected[f"{path}::{part.name}.out.magnitude"] = t["lora_magnitude_vector"]
        for owner, tensors in saved.items():
            for pn, t in tensors.items():
                expected[f"{owner}::module.{pn}"] = t
        _fill(params, expected)
    except BaseException:
        am.detach()
        raise
    return am


def _module_paths(modules: dict[str, Any]) -> list[str]:
    return sorted((m for m in modules if m), key=len, reverse=True)


def _fill(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise UnipeftError(f"the peft checkpoint lacks a tensor for '{missing[0]}' (shape "
                           f"{list(params[missing[0]].shape)})")
    for k, p in params.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise UnipeftError(f"peft tensor for '{k}' has shape {list(tensors[k].shape)}, expected {list(p.shape)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(p.device, p.dtype))


def export_peft(am, directory: str | Path, name: str | None = None) -> Path:
    """Write adapter `name` (default: the only one) in peft's format; refuses what peft cannot express."""
    names = list(am.recipes)
    name = name or (names[0] if len(names) == 1 else None)
    if name is None:
        raise UnipeftError(f"the model has several adapters ({', '.join(names)}); pass name=")
    am._require(name)
    recipe = am.recipes[name]
    for p in recipe.parts:
        if p.function != "lowrank" or p.insertion != "parallel" or p.composition not in ("add", "scaled") or \
                any(s not in ("q", "k", "v", "o", "up", "gate", "down") for s in p.sites):
            raise UnipeftError(f"adapter '{name}' ({recipe.name}) part '{p.name}' ({p.function}, {p.composition}, "
                               f"{p.insertion} at {', '.join(p.sites or p.targets)}) has no peft LoRA form")
    if len({p.scale == "alpha/sqrt(r)" for p in recipe.parts}) > 1 or len({p.magnitude for p in recipe.parts}) > 1:
        raise UnipeftError(f"adapter '{name}' mixes rsLoRA/DoRA and plain parts; peft has one flag for the whole "
                           "adapter")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv1d = False
    for path, w in am._wrappers.items():
        if name in w.copies:
            for pn, t in w.copies[name].named_parameters():
                tensors[f"{PREFIX}{path}.{pn}"] = t.detach().cpu().contiguous()
        if name not in w.adapters:
            continue
        sites = [(part, sa) for part, d in w.adapters[name].items() for sa in d.values()]
        if len(sites) > 1 or sites[0][1].chunk is not None:
            raise UnipeftError(f"'{path}' carries part of a fused projection (or two parts); peft LoRA adapts whole "
                               "modules, so this adapter has no exact peft form")
        part_name, sa = sites[0]
        part = recipe.part(part_name)
        conv1d = conv1d or not isinstance(w.base_layer, torch.nn.Linear)
        r = sa.fn.down.weight.shape[0]
        s = float(sa.scale())
        ranks[path] = r
        alphas[path] = s * (r ** 0.5 if part.scale == "alpha/sqrt(r)" else r)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = sa.fn.down.weight.detach().cpu().contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = sa.fn.up.weight.detach().cpu().contiguous()
        if hasattr(sa, "magnitude"):
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = sa.magnitude.detach().cpu().contiguous()
    if not ranks:
        raise UnipeftError(f"adapter '{name}' has no LoRA modules to export")
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    first = recipe.parts[0]
    config = {"peft_type": "LORA", "task_type": None, "r": r0, "lora_alpha": a0,
              "target_modules": sorted(ranks), "lora_dropout": first.dropout, "bias": "none",
              "use_rslora": first.scale == "alpha/sqrt(r)", "use_dora": first.magnitude,
              "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != r0},
              "alpha_pattern": {re.escape(p): a for p, a in alphas.items() if a != a0},
              "modules_to_save": am.train_modules.get(name) or None, "fan_in_fan_out": conv1d,
              "init_lora_weights": True, "inference_mode": True,
              "base_model_name_or_path": getattr(getattr(am.model, "config", None), "_name_or_path", None)}
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise UnipeftError(f"'{directory}' is not empty; export into a new folder")
    with atomic_folder(directory) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory
