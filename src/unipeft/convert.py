"""`unipeft convert SRC DST`: peft adapter folders to unipeft adapter folders and back.

The direction comes from the source: a peft folder (`adapter_config.json`) becomes a unipeft adapter folder; a
unipeft adapter folder (`unipeft_adapters.json`) or a `unipeft train` run folder becomes a peft folder. Converting
needs the base model (keys are parsed against its modules); by default it is the one the source names — peft's
`base_model_name_or_path`, the base recorded in a unipeft folder, or the run's model — and `--model` overrides it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UnipeftError

_HEADS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def source_kind(src: Path) -> str:
    """'peft', 'unipeft' (an adapter folder) or 'run' (a `unipeft train` output folder)."""
    if (src / "adapter_config.json").is_file():
        return "peft"
    if (src / "unipeft_adapters.json").is_file():
        return "unipeft"
    if (src / "config.yaml").is_file() and (src / "adapter").is_dir():
        return "run"
    if (src / "config.yaml").is_file() and (src / "model").is_dir():
        raise UnipeftError(f"'{src}' is a full fine-tuning run: there is no adapter to convert (its model/ folder "
                           "already is a plain transformers model)")
    if not src.exists():
        raise UnipeftError(f"'{src}' does not exist")
    raise UnipeftError(f"'{src}' is neither a peft adapter folder (adapter_config.json), a unipeft adapter folder "
                       "(unipeft_adapters.json) nor a unipeft run folder")


def _labels(shapes: dict[str, Any]) -> int | None:
    for key, shape in shapes.items():
        if key.endswith(_HEADS) and len(shape) == 2:
            return int(shape[0])
    return None


def _architecture(model: str | None) -> str | None:
    """The class a transformers checkpoint folder was saved from (config.json `architectures`), if it says."""
    import json

    from .assets import model_path

    try:
        archs = json.loads((model_path(model) / "config.json").read_text(encoding="utf-8")).get("architectures")
    except (UnipeftError, OSError, ValueError, TypeError, AttributeError):
        return None
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def _load(model: str | None, source: str, cls_name: str, num_labels: int | None):
    import transformers

    from .assets import model_path

    if not model:
        raise UnipeftError(f"{source} does not name its base model; pass --model PATH (or minilm, smollm2)")
    try:
        path = model_path(model)
    except UnipeftError:
        raise UnipeftError(f"the base model '{model}' ({source}) is not a folder here; pass --model PATH (or minilm, "
                           "smollm2)") from None
    cls = getattr(transformers, cls_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UnipeftError(f"transformers has no model class {cls_name}; pass the base with --model")
    kwargs = {"num_labels": num_labels} if num_labels else {}
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # (its load report calls the head "newly initialized": the adapter brings it)
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(str(path), **kwargs).eval()
    finally:
        hf_logging.set_verbosity(level)


def convert(src: str | Path, dst: str | Path, to: str | None = None, model: str | None = None,
            name: str | None = None) -> tuple[str, Path]:
    """Convert SRC into DST (a new or empty folder); returns (the format written, DST)."""
    import unipeft

    from .io import read_index
    from .peft_io import read_config, read_weights

    src, dst = Path(src), Path(dst)
    kind = source_kind(src)
    target = "unipeft" if kind == "peft" else "peft"
    if to is not None and to not in ("peft", "unipeft"):
        raise UnipeftError(f"--to is peft or unipeft, not '{to}'")
    if to is not None and to != target:
        raise UnipeftError(f"'{src}' is already a {to} {'adapter' if kind != 'run' else 'run'} folder; convert goes "
                           f"from {kind} to {target}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UnipeftError(f"'{dst}' exists and is not empty; convert into a new folder")
    if dst.resolve() == src.resolve():
        raise UnipeftError("DST must differ from SRC")
    if kind == "peft":
        cfg = read_config(src)
        task = cfg.get("task_type") or "FEATURE_EXTRACTION"
        classes = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM",
                   "FEATURE_EXTRACTION": "AutoModel", "TOKEN_CLS": "AutoModelForTokenClassification"}
        if task not in classes:
            raise UnipeftError(f"peft task_type {task} is not supported; unipeft converts {', '.join(classes)}")
        weights = read_weights(src)
        cls_name = classes[task]
        if cfg.get("task_type") is None:  # old or hand-written configs: the base checkpoint's own class
            cls_name = _architecture(model or cfg.get("base_model_name_or_path")) or cls_name
        labels = _labels({k: list(v.shape) for k, v in weights.items()}) if task in ("SEQ_CLS", "TOKEN_CLS") else None
        base = _load(model or cfg.get("base_model_name_or_path"), f"peft adapter '{src}'", cls_name, labels)
        am = unipeft.import_peft(base, src, name=name or "default")
        am.save(dst)
        return "unipeft", dst
    if kind == "run":
        if model:
            raise UnipeftError("a run folder records its base model; drop --model")
        am = unipeft.from_pretrained(src)
        if not isinstance(am, unipeft.AdaptedModel):
            raise UnipeftError(f"'{src}' is a full fine-tuning run: there is no adapter to convert")
    else:
        base_info = read_index(src).get("base", {})
        base = _load(model or base_info.get("name_or_path"), f"unipeft adapter folder '{src}'",
                     base_info.get("class") or "AutoModel", _labels(base_info.get("shapes", {})))
        am = unipeft.load(base, src)
    am.export_peft(dst, name)
    return "peft", dst
