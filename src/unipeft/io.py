"""Saving and loading adapters: safetensors weights + recipe + format version + base fingerprint.

Folder layout (format 1):

    unipeft_adapters.json   {"format": "unipeft-adapters", "format_version": 1, "base": {...fingerprint...},
                             "active": [...], "adapters": {name: {"recipe": {...}, "train_modules": [...],
                                                                 "file": "<name>.safetensors", "sha256": "..."}}}
    <name>.safetensors      only that adapter's tensors (and its copies of extra trainable modules)

A composition travels with its adapters: "active" holds names and blocks ({"stack": [...]}, {"average": [...],
"weights": [...]}, {"fuse": [...]}, see compose.to_json), and "fusions": {name: {"units": [...], "file":
"fusion-<name>.safetensors", "sha256": "..."}} the AdapterFusion layers over saved adapters.

Nothing is loaded through pickle. Writes are atomic: the folder is written under a temporary name and renamed into
place. Loading is all-or-nothing: a checksum mismatch (truncated or corrupt file), another base architecture, a
missing, extra or mis-shaped tensor raises an error naming it, and the model is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UnipeftError
from .fsutil import atomic_folder
from .recipe import Recipe

if TYPE_CHECKING:
    from .model import AdaptedModel

INDEX = "unipeft_adapters.json"
FORMAT = "unipeft-adapters"
FORMAT_VERSION = 1


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """The base model's class, model_type and every frozen parameter's logical shape (adapters excluded; a 4-bit
    quantized weight counts as the float weight it stands for, so an adapter trained on a QLoRA base loads onto the
    float model and back), plus where it was loaded from (a hint for `unipeft convert`, not checked)."""
    shapes: dict[str, list[int]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if "adapters" in parts or "copies" in parts or "fusions" in parts:
            continue
        state = getattr(p, "quant_state", None)  # a 4-bit weight is packed; its logical shape is the model's
        shapes[".".join(c for c in parts if c != "base_layer")] = list(getattr(state, "shape", None) or p.shape)
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "model_type": getattr(config, "model_type", None), "shapes": shapes,
            "name_or_path": getattr(config, "_name_or_path", None) or None}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_adapters(am: AdaptedModel, directory: Path, names: list[str]) -> Path:
    for n in names:
        am._require(n)
    if not names:
        raise UnipeftError("nothing to save: the model has no adapters")
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir() or (any(directory.iterdir()) and not (directory / INDEX).is_file()):
            raise UnipeftError(f"'{directory}' exists and is not a unipeft adapter folder; choose a new or empty "
                               "folder")
        owned = {INDEX} | {f"{n}.safetensors" for n in _index_names(directory)} | {
            f"fusion-{n}.safetensors" for n in _index_names(directory, "fusions")}
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in owned)
        if foreign:
            raise UnipeftError(f"'{directory}' also holds {foreign[0]}, which saving would delete; move it or save "
                               "elsewhere")
    with atomic_folder(directory) as tmp:
        from .compose import adapter_names, to_json

        index: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "base": fingerprint(am.model),
                                 "active": [to_json(u) for u in am.active if set(adapter_names(u)) <= set(names)],
                                 "adapters": {}, "fusions": {}}
        for fname, fuse in am.fusions.items():
            if set(fuse.units) <= set(names):
                file = f"fusion-{fname}.safetensors"
                sha = _write_tensors(am.fusion_parameters(fname), tmp / file, {"fusion": fname})
                heads = [p for p, w in am._wrappers.items() if fname in w.copies]
                index["fusions"][fname] = {"units": list(fuse.units), "train_modules": heads, "file": file,
                                           "sha256": sha}
        for n in names:
            fname = f"{n}.safetensors"
            sha = _write_tensors(am.adapter_parameters(n), tmp / fname, {"adapter": n})
            index["adapters"][n] = {"recipe": am.recipes[n].to_dict(), "train_modules": am.train_modules[n],
                                    "file": fname, "sha256": sha}
        with open(tmp / INDEX, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
    return directory


def _write_tensors(params: dict[str, nn.Parameter], path: Path, meta: dict[str, str]) -> str:
    """Write parameters as safetensors (CPU, contiguous); returns the file's sha256."""
    save_file({k: p.detach().contiguous().cpu() for k, p in params.items()}, str(path),
              metadata={"format": FORMAT, **meta})
    return _sha256(path)


def _index_names(directory: Path, key: str = "adapters") -> list[str]:
    try:
        return list(json.loads((directory / INDEX).read_text(encoding="utf-8")).get(key, {}))
    except (OSError, ValueError, AttributeError):
        return []


def read_index(directory: Path) -> dict[str, Any]:
    path = Path(directory) / INDEX
    if not path.is_file():
        raise UnipeftError(f"'{directory}' is not a unipeft adapter folder (no {INDEX}); save one with am.save(dir)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnipeftError(f"{path} is corrupt: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("adapters"), dict):
        raise UnipeftError(f"{path} is not a unipeft adapter index")
    version = index.get("format_version")
    if not isinstance(version, int):
        raise UnipeftError(f"{path} has no integer format_version; it is corrupt")
    for name, entry in index["adapters"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("recipe"), dict) or not isinstance(
                entry.get("file"), str):
            raise UnipeftError(f"{path}: the entry of adapter '{name}' is corrupt (needs recipe and file)")
    if version > FORMAT_VERSION:
        raise UnipeftError(f"{path} has format version {index['format_version']}; this unipeft reads up to "
                           f"{FORMAT_VERSION}: upgrade unipeft")
    return index


def check_fingerprint(model: nn.Module, saved: dict[str, Any], where: Path) -> None:
    here = fingerprint(model)
    if (saved.get("class"), saved.get("model_type")) != (here["class"], here["model_type"]):
        raise UnipeftError(f"the adapters in '{where}' were saved for {saved.get('class')} "
                           f"(model_type {saved.get('model_type')!r}); this model is {here['class']} "
                           f"(model_type {here['model_type']!r})")
    theirs, ours = saved.get("shapes", {}), here["shapes"]
    for name, shape in theirs.items():
        if name not in ours:
            raise UnipeftError(f"the adapters in '{where}' were saved for a base with tensor '{name}' {shape}, which "
                               "this model lacks: another base architecture")
        if list(ours[name]) != list(shape):
            raise UnipeftError(f"base tensor '{name}' has shape {list(ours[name])} here but {shape} in the model the "
                               f"adapters in '{where}' were saved for: another base model")
    extra = [n for n in ours if n not in theirs]
    if extra:
        raise UnipeftError(f"this model has base tensor '{extra[0]}' that the model the adapters in '{where}' were "
                           "saved for lacks: another base architecture")


def _read_tensors(path: Path, sha: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UnipeftError(f"adapter weights '{path}' are missing")
    if sha is not None and _sha256(path) != sha:
        raise UnipeftError(f"adapter weights '{path}' are truncated or corrupt (checksum mismatch); re-save them")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise UnipeftError(f"adapter weights '{path}' are unreadable: {str(e).splitlines()[0]}") from None


def load_adapters(am: AdaptedModel, directory: Path, name: str | None = None, as_name: str | None = None) -> list[str]:
    """Add the saved adapters (all, or `name`; `as_name` renames a single one) to `am` and fill their weights; all or
    nothing."""
    index = read_index(directory)
    check_fingerprint(am.model, index.get("base", {}), directory)
    entries = index["adapters"]
    names = [name] if name is not None else list(entries)
    if name is not None and name not in entries:
        raise UnipeftError(f"'{directory}' has no adapter '{name}'; it has {', '.join(entries)}")
    if as_name is not None and len(names) != 1:
        raise UnipeftError(f"'{directory}' holds {len(names)} adapters; as_name renames one: pass name= too")
    target = {n: (as_name if as_name is not None else n) for n in names}
    clash = [target[n] for n in names if target[n] in am.recipes]
    if clash:
        raise UnipeftError(f"adapter '{clash[0]}' already exists in this model; remove it first")
    loaded: list[str] = []
    had_active = bool(am.active)
    try:
        for n in names:
            entry = entries[n]
            tensors = _read_tensors(Path(directory) / entry["file"], entry.get("sha256"))
            recipe = Recipe.from_dict(entry["recipe"])
            am.add(target[n], recipe, train_modules=entry.get("train_modules") or None)
            loaded.append(target[n])
            _fill(am.adapter_parameters(target[n]), tensors, Path(directory) / entry["file"])
        fusions = _load_fusions(am, directory, index, loaded) if as_name is None else []
    except BaseException:
        for fuse in reversed(locals().get("fusions") or []):
            am.remove_fusion(fuse)
        for n in reversed(loaded):
            if n in am.recipes:
                am.remove(n)
        raise
    if not had_active:
        from .compose import adapter_names, from_json

        units = [from_json(u) for u in index.get("active", [])]
        am.activate(*[u for u in units if set(adapter_names(u)) <= set(loaded)])
    return loaded


def _load_fusions(am: AdaptedModel, directory: Path, index: dict[str, Any], loaded: list[str]) -> list:
    from .compose import Fuse

    added = []
    try:
        for fname, entry in (index.get("fusions") or {}).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("units"), list) or not isinstance(
                    entry.get("file"), str):
                raise UnipeftError(f"{Path(directory) / INDEX}: the entry of fusion '{fname}' is corrupt")
            if not set(entry["units"]) <= set(loaded):
                continue
            fuse = Fuse(*entry["units"])
            am.add_fusion(fuse, train_modules=entry.get("train_modules") or None)
            added.append(fuse)
            path = Path(directory) / entry["file"]
            _fill(am.fusion_parameters(fuse), _read_tensors(path, entry.get("sha256")), path)
    except BaseException:
        for fuse in reversed(added):
            am.remove_fusion(fuse)
        raise
    return added


def _fill(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], path: Path) -> None:
    missing = [k for k in params if k not in tensors]
    if missing:
        raise UnipeftError(f"'{path}' lacks tensor '{missing[0]}' (shape {list(params[missing[0]].shape)}) that this "
                           "recipe on this model needs")
    extra = [k for k in tensors if k not in params]
    if extra:
        raise UnipeftError(f"'{path}' has tensor '{extra[0]}' that this model has no place for")
    for k, p in params.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise UnipeftError(f"tensor '{k}' in '{path}' has shape {list(tensors[k].shape)}, expected "
                               f"{list(p.shape)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))


def load(model: nn.Module, directory: str | Path) -> AdaptedModel:
    """`unipeft.load(model, dir)`: a new AdaptedModel with every saved adapter; the saved active set is active."""
    from .model import AdaptedModel

    index = read_index(Path(directory))
    check_fingerprint(model, index.get("base", {}), Path(directory))
    am = AdaptedModel(model)
    try:
        load_adapters(am, Path(directory))
    except BaseException:
        am.detach()
        raise
    return am
