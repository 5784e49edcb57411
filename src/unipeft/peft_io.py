"""Hugging Face PEFT checkpoints (`adapter_config.json` + `adapter_model.safetensors`) in and out.

Methods: LoRA (rsLoRA, DoRA, rank/alpha patterns), IA3, prefix tuning and prompt tuning, plus `modules_to_save`
heads. This module reads and writes the folder and its keys; `peft_methods.py` holds what each method's tensors mean.

Key mapping is structural: a tuner key is `base_model.model.<module path>.<role>` (role: `lora_A.weight`,
`ia3_l`, ...), a prompt-learning key is `prompt_embeddings`, a `modules_to_save` key is `<prefix><module path>.<param>`.
We split a key into (module path, role) and look the path up among the model's own modules — never string
replacement of key fragments (the source of peft bugs #2772 and #2699). Nothing partial is ever loaded: every tensor
must find its place with the expected shape, and every adapter parameter must receive a tensor, or nothing changes.

Configs from other peft versions: fields this version of peft (0.21) does not have are ignored with one warning
naming them; missing fields take peft's defaults; known options that change what an adapter computes and that
unipeft does not reproduce (e.g. `lora_bias`, `layer_replication`, PiSSA-style inits that rewrite the base) are
refused with the reason, never silently ignored.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .arch import logical_modules
from .errors import UnipeftError
from .fsutil import atomic_folder

TUNER_PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."
PROMPT_KINDS = ("PREFIX_TUNING", "PROMPT_TUNING")

_COMMON = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
           "inference_mode", "modules_to_save"}
_PROMPT_COMMON = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"}
#: Every field peft 0.21 writes, per method (what we do not list here is "unknown": warned about and ignored).
KNOWN_FIELDS: dict[str, set[str]] = {
    "LORA": _COMMON | {"r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias",
                       "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
                       "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config",
                       "eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config",
                       "alora_invocation_tokens", "use_qalora", "qalora_group_size", "monteclora_config",
                       "layer_replication", "runtime_config", "lora_bias", "target_parameters", "use_bdlora",
                       "arrow_config", "kasa_config", "ensure_weight_tying"},
    "IA3": _COMMON | {"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights"},
    "PREFIX_TUNING": _COMMON | _PROMPT_COMMON | {"init_weights", "encoder_hidden_size", "prefix_projection"},
    "PROMPT_TUNING": _COMMON | _PROMPT_COMMON | {"prompt_tuning_init", "prompt_tuning_init_text",
                                                 "tokenizer_name_or_path", "tokenizer_kwargs"},
}
#: Options that change what the adapter computes and that unipeft does not reproduce: refused unless at the default.
_UNSUPPORTED: dict[str, dict[str, Any]] = {
    "LORA": {"bias": "none", "lora_bias": False, "layer_replication": None, "use_qalora": False,
             "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
             "use_bdlora": None, "arrow_config": None, "kasa_config": None, "velora_config": None,
             "monteclora_config": None, "megatron_config": None},
}
#: init_lora_weights values whose adapters only work on a base that the init rewrote (the residual of the init).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
#: peft adds these to modules_to_save for its task types.
_TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
               "QUESTION_ANS": ["qa_outputs"]}


def read_config(directory: Path) -> dict[str, Any]:
    """The checked adapter_config.json of a peft folder."""
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise UnipeftError(f"'{directory}' is not a peft adapter folder (no adapter_config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UnipeftError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise UnipeftError(f"{path} is not a JSON object")
    kind = cfg.get("peft_type")
    if kind not in KNOWN_FIELDS:
        raise UnipeftError(f"peft_type {kind!r} in {path} is not supported; unipeft reads "
                           f"{', '.join(KNOWN_FIELDS)}")
    unknown = sorted(set(cfg) - KNOWN_FIELDS[kind])
    if unknown:
        warnings.warn(f"{path}: ignoring config fields peft 0.21 does not know for {kind}: {', '.join(unknown)}",
                      stacklevel=3)
    for key, default in _UNSUPPORTED.get(kind, {}).items():
        value = cfg.get(key, default)
        if value != default and value not in (None, False, [], {}):
            raise UnipeftError(f"{path}: peft option {key}={value!r} changes what the adapter computes and unipeft "
                               "does not reproduce it; only plain LoRA/rsLoRA/DoRA adapters import")
    init = cfg.get("init_lora_weights")
    if kind == "LORA" and isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise UnipeftError(f"{path}: init_lora_weights={init!r} adapters need the base model that init rewrote; "
                           "save them with peft's path_initial_model_for_weight_conversion to get a plain LoRA first")
    if kind in PROMPT_KINDS and (cfg.get("num_transformer_submodules") or 1) != 1:
        raise UnipeftError(f"{path}: num_transformer_submodules={cfg['num_transformer_submodules']} is an "
                           "encoder-decoder prompt; unipeft maps decoder-only and encoder-only models")
    return cfg


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors, or an old adapter_model.bin through `torch.load(weights_only=True)` only."""
    st, binf = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    try:
        if st.is_file():
            return load_file(str(st))
        if binf.is_file():
            weights = torch.load(binf, map_location="cpu", weights_only=True)
            if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
                raise UnipeftError(f"'{binf}' is not a mapping of tensor names to tensors")
            return weights
    except UnipeftError:
        raise
    except Exception as e:
        raise UnipeftError(f"peft weights in '{directory}' are unreadable or need full pickle, which is refused: "
                           f"{str(e).splitlines()[0][:160]}") from None
    raise UnipeftError(f"'{directory}' has no adapter_model.safetensors or adapter_model.bin")


def split_weights(model: torch.nn.Module, cfg: dict[str, Any], weights: dict[str, torch.Tensor],
                  roles: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Parse every key into ({module path: {role: tensor}}, {head module path: {param: (key, tensor)}}).

    Tuner keys must name a module of `model`; prompt learning has the single key `prompt_embeddings` (returned under
    path ""). Anything else must belong to a `modules_to_save` module, or the checkpoint does not fit this model."""
    kind = cfg["peft_type"]
    prefix = PROMPT_PREFIX if kind in PROMPT_KINDS else TUNER_PREFIX
    modules = dict(logical_modules(model))
    paths = sorted((m for m in modules if m), key=len, reverse=True)
    save_roots = list(cfg.get("modules_to_save") or []) + _TASK_HEADS.get(str(cfg.get("task_type")), [])
    core: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        if kind in PROMPT_KINDS and key == "prompt_embeddings":
            core.setdefault("", {})[key] = tensor
            continue
        if not key.startswith(prefix):
            raise UnipeftError(f"peft tensor '{key}' does not start with '{prefix}' (a {kind} checkpoint)")
        rest = key[len(prefix):]
        role = next((r for r in roles if rest.endswith("." + r)), None)
        if role is not None:
            path = rest[: -len(role) - 1]
            if path not in modules:
                raise UnipeftError(f"peft tensor '{key}' targets '{path}', which {type(model).__name__} does not "
                                   "have: another base model?")
            core.setdefault(path, {})[role] = tensor
            continue
        owner = next((m for m in paths if rest.startswith(m + ".") and
                      any(m == s or m.endswith("." + s) for s in save_roots)), None)
        if owner is None:
            raise UnipeftError(f"peft tensor '{key}' fits no adapted module and no modules_to_save entry of "
                               f"{type(model).__name__}: another base model?")
        heads.setdefault(owner, {})[rest[len(owner) + 1:]] = (key, tensor)
    return core, heads


def copy_into(param: torch.Tensor, tensor: torch.Tensor, key: str) -> None:
    """Copy a peft tensor into an adapter parameter, refusing a shape mismatch with both shapes named."""
    if tuple(tensor.shape) != tuple(param.shape):
        raise UnipeftError(f"peft tensor '{key}' has shape {list(tensor.shape)}, this model expects "
                           f"{list(param.shape)}: another base model or a corrupt checkpoint")
    with torch.no_grad():
        param.copy_(tensor.to(param.device, param.dtype))


def import_peft(model: torch.nn.Module, directory: str | Path, name: str = "default"):
    """A peft checkpoint (LoRA, rsLoRA, DoRA, IA3, prefix or prompt tuning) as unipeft adapter `name` on `model`.

    Returns an `AdaptedModel` with the adapter active whose outputs equal peft's. On any error the model is left as
    it was."""
    import unipeft

    from .peft_methods import IMPORTERS, ROLES

    directory = Path(directory)
    cfg = read_config(directory)
    kind = cfg["peft_type"]
    weights = read_weights(directory)
    core, heads = split_weights(model, cfg, weights, ROLES[kind])
    if not core:
        raise UnipeftError(f"'{directory}' holds no {kind} tensors (only {', '.join(list(weights)[:3]) or 'nothing'})")
    recipe, fill = IMPORTERS[kind](model, cfg, core)
    am = unipeft.attach(model, recipe, name=name, train_modules=sorted(heads) or None)
    try:
        fill(am, name)
        for path, tensors in heads.items():
            params = dict(am._wrappers[path].copies[name].named_parameters())
            missing = sorted(set(params) - set(tensors))
            if missing:
                raise UnipeftError(f"the peft checkpoint saves module '{path}' but lacks its '{missing[0]}' "
                                   f"(shape {list(params[missing[0]].shape)})")
            for pn, (key, t) in tensors.items():
                if pn not in params:
                    raise UnipeftError(f"peft tensor '{key}': module '{path}' has no parameter '{pn}'")
                copy_into(params[pn], t, key)
    except BaseException:
        am.detach()
        raise
    return am


_TASKS = (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
          ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"))


def task_type(model: torch.nn.Module) -> str:
    """peft's task type for a transformers model class (prompt learning needs it to route inputs)."""
    cls = type(model).__name__
    return next((task for suffix, task in _TASKS if cls.endswith(suffix)), "FEATURE_EXTRACTION")


def export_peft(am, directory: str | Path, name: str | None = None) -> Path:
    """Write adapter `name` (default: the only one) in peft's format; refuses, with the reason, what peft cannot
    express exactly. Returns the folder."""
    from .peft_methods import EXPORTERS, peft_kind

    names = list(am.recipes)
    name = name or (names[0] if len(names) == 1 else None)
    if name is None:
        raise UnipeftError(f"the model has several adapters ({', '.join(names)}); pass name=")
    am._require(name)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UnipeftError(f"'{directory}' exists and is not empty; export into a new folder")
    kind = peft_kind(am.recipes[name], name)
    tensors, config = EXPORTERS[kind](am, name)
    prefix = PROMPT_PREFIX if kind in PROMPT_KINDS else TUNER_PREFIX
    for path, w in am._wrappers.items():
        if name in w.copies:
            for pn, t in w.copies[name].named_parameters():
                tensors[f"{prefix}{path}.{pn}"] = t.detach().cpu().contiguous()
    model_config = getattr(am.model, "config", None)
    config = {"peft_type": kind, "task_type": task_type(am.model), **config,
              "modules_to_save": am.train_modules.get(name) or None, "inference_mode": True,
              "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None}
    with atomic_folder(directory) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory
