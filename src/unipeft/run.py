"""A training run end to end: the run configuration, model + data + method, the loop, and the output folder.

Output folder (`--out`):

    adapter/         the adapter (unipeft.load) — or model/ for --method full (transformers.from_pretrained)
    config.yaml      the run's configuration as run (re-run it: `unipeft train OUT/config.yaml`)
    metrics.jsonl    one line per step (loss, lr, tokens/s) and per evaluation
    report.md        curves (PNG), parameters, tokens/s, peak memory, wall time
    results.json     {"test": {...}} — written last: its presence marks a finished run
    checkpoint.pt    the latest checkpoint (kept until the run finishes)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from .data import Columns, Encoded, encode_chat, encode_classification, encode_plain_lm, load_splits
from .errors import UnipeftError
from .train import LoopConfig, Trainer, evaluate, peak_memory_bytes

#: Learning rates that work out of the box, from a sweep on Rotten Tomatoes + MiniLM (docs/training.md): a full
#: fine-tune needs a much smaller one, and the prefix-based methods diverge at the adapters' 2e-3.
DEFAULT_LR = {"full": 5e-5, "prompt": 3e-3, "prefix": 1e-3, "mam": 5e-4, "unipelt": 1e-3}
#: AdapterFusion's query/key/value matrices are d × d: a gentler rate than the adapters' (value starts at identity).
FUSION_LR = 5e-4


@dataclass
class RunConfig:
    model: str = "minilm"
    task: str | None = None
    method: str = "lora"
    overrides: dict[str, Any] = field(default_factory=dict)
    data: str = "rotten_tomatoes"
    eval_data: str | None = None
    test_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    epochs: int = 2
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 128
    warmup: float = 0.06
    schedule: str = "linear"
    clip: float = 1.0
    weight_decay: float = 0.0
    eval_every: int | None = None
    save_every: int | None = None
    seed: int = 0
    max_eval_examples: int | None = None
    chat: bool | None = None
    out: str = "runs/default"
    quantize: str | None = None
    optim: str = "adamw"
    base_adapters: list[str] = field(default_factory=list)
    fuse: bool = False
    accelerate: bool = False
    cuda_graphs: bool = False
    label_names: list[str] = field(default_factory=list)

    def loop(self) -> LoopConfig:
        """The loop's knobs are the same-named fields of this config; only lr gets a per-method default."""
        values = {f.name: getattr(self, f.name) for f in fields(LoopConfig) if f.name != "pad_to"}
        values["lr"] = self.lr if self.lr is not None else (
            FUSION_LR if self.fuse else DEFAULT_LR.get(self.method, 2e-3))
        return LoopConfig(**values)

    def columns(self) -> Columns:
        return Columns(self.text_column, self.label_column, self.prompt_column, self.response_column)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise UnipeftError(f"run config '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UnipeftError(f"run config '{path}' must be a mapping of settings")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UnipeftError(f"run config '{path}' has unknown key(s) {', '.join(unknown)}")
        data["overrides"] = data.get("overrides") or {}
        data["label_names"] = data.get("label_names") or []
        for f in fields(cls):
            if f.name in data:
                data[f.name] = _typed(path, f.name, str(f.type), data[f.name])
        return cls(**data)

    def validate(self) -> RunConfig:
        checks = [(self.lr is None or math.isfinite(self.lr), "--lr must be a finite number"),
                  (0 <= self.warmup < 1, "--warmup is the fraction of steps spent warming up: 0 <= warmup < 1"),
                  (self.eval_every is None or self.eval_every >= 1, "--eval-every must be >= 1"),
                  (self.save_every is None or self.save_every >= 1, "--save-every must be >= 1"),
                  (self.clip >= 0 and math.isfinite(self.clip), "--clip must be >= 0 (0: no clipping)"),
                  (self.weight_decay >= 0, "--weight-decay must be >= 0"),
                  (self.batch_size >= 1, "--batch-size must be >= 1"), (self.epochs >= 1, "--epochs must be >= 1"),
                  (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
                  (self.grad_accum >= 1, "--grad-accum must be >= 1"),
                  (self.max_length >= 8, "--max-length must be >= 8"),
                  (self.max_eval_examples is None or self.max_eval_examples >= 1, "--max-eval-examples must be >= 1"),
                  (self.lr is None or self.lr > 0, "--lr must be > 0"),
                  (self.schedule in ("linear", "cosine", "constant"), "--schedule is linear, cosine or constant"),
                  (self.task in (None, "classification", "causal-lm"), "--task is classification or causal-lm"),
                  (self.quantize in (None, "nf4", "fp4", "int8"), "--quantize is nf4, fp4 or int8"),
                  (self.optim in ("adamw", "adamw8bit"), "--optim is adamw or adamw8bit"),
                  (not (self.quantize and self.method == "full"),
                   "--quantize freezes a quantized base for adapters; --method full trains every weight"),
                  (not (self.fuse and len(self.base_adapters) < 2),
                   "--fuse trains AdapterFusion over the adapters of at least two --base-adapters runs"),
                  (not (self.base_adapters and self.method == "full"),
                   "--base-adapters adds adapters to a frozen base; --method full trains every weight")]
        for ok, msg in checks:
            if not ok:
                raise UnipeftError(msg)
        return self


_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _typed(path, key: str, annotation: str, value):
    """A run config value checked against its field's annotation ("float | None", "list[str]", ...). YAML 1.1 reads
    `1e-3` (no dot) as a string, so a float field takes a numeric string too."""
    parts = [t.strip() for t in annotation.split("|")]
    kind = next(t for t in parts if t != "None").split("[")[0]
    if value is None:
        if "None" in parts:
            return None
        raise UnipeftError(f"run config '{path}': {key} cannot be empty (null); remove the line for the default")
    if kind == "float" and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    expected = _KINDS.get(kind, (dict,) if kind == "dict" else (list,) if kind == "list" else (object,))
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        raise UnipeftError(f"run config '{path}': {key} must be {kind}, not {value!r}")
    return value


# ---- the output folder -----------------------------------------------------------------------------------------------
#: What a run writes; --overwrite deletes these and nothing else.
RUN_FILES = ("config.yaml", "metrics.jsonl", "report.md", "results.json", "checkpoint.pt", "checkpoint.tmp",
             "loss.png", "validation.png", "adapter", "model", "tokenizer", ".report.md.tmp", ".results.json.tmp",
             ".config.yaml.tmp")


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and any((path / f).exists() for f in
                                                    ("metrics.jsonl", "results.json", "checkpoint.pt"))


def clear_run(out: Path) -> None:
    """--overwrite: remove the previous run's files (only those), after the new run's inputs were checked."""
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Check the output folder before any work; nothing is deleted here."""
    if out.exists() and not out.is_dir():
        raise UnipeftError(f"--out '{out}' is a file; give a folder")
    finished = (out / "results.json").is_file()
    started = is_run_folder(out) or (out / "config.yaml").is_file()  # (killed before its first step: config only)
    if resume:
        if finished:
            raise UnipeftError(f"'{out}' holds a finished run; nothing to resume")
        if not (out / "config.yaml").is_file():
            raise UnipeftError(f"'{out}' is not a unipeft run (no config.yaml); nothing to resume")
        if not (out / "checkpoint.pt").is_file():
            raise UnipeftError(f"'{out}' has no checkpoint to resume from; start without --resume")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            what = "a finished run" if finished else ("an unfinished run (use --resume to continue)" if started else
                                                      "other files")
            raise UnipeftError(f"'{out}' already holds {what}; choose another --out or pass --overwrite")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and p.name != ".write-test")
        if not started or foreign:
            raise UnipeftError(f"'{out}' holds files that are not a unipeft run ({(foreign or ['?'])[0]}); refusing "
                               "to overwrite them")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UnipeftError(f"cannot write to --out '{out}': {e.strerror or e}") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- model, method, data --------------------------------------------------------------------------------------------
def load_base(cfg: RunConfig, task: str, label_names: list[str]):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .assets import model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(model_path(cfg.model))
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if task == "classification":
        torch.manual_seed(cfg.seed)  # the new head's initialisation is part of the run
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)}, output_loading_info=True)
        model._unipeft_missing_keys = list(info.get("missing_keys", []))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    else:
        from transformers import AutoConfig

        from .arch import is_encoder

        config = AutoConfig.from_pretrained(path)
        if is_encoder(config):  # (its LM head would attend both ways: nothing to learn)
            raise UnipeftError(f"--model {cfg.model} is an encoder ({config.model_type}); causal-LM training needs a "
                               "decoder such as --model smollm2 (for classification, the data needs a label column: "
                               "--label-column NAME)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.to("cuda")
    if cfg.quantize:  # QLoRA: bf16 compute on the GPU, fp32 on the CPU
        from .quant import quantize

        quantize(model, cfg.quantize, compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    if cfg.accelerate:  # fused RMSNorm / SwiGLU / RoPE / linear + cross-entropy (GPU, Llama family)
        from .base_ops import accelerate

        accelerate(model)
    if cfg.cuda_graphs:  # the layers replayed from CUDA graphs (train_run pads batches to one shape)
        from .graphs import graph_layers

        graph_layers(model)
    return model, tok


def head_modules(model: torch.nn.Module, missing_keys: list[str]) -> list[str]:
    """What trains (and is saved) with the adapter for classification: every module the checkpoint did not provide
    (the new head, whatever its name) and BERT's [CLS] pooler, which a sentence-embedding checkpoint never trained."""
    owners = {k.rsplit(".", 1)[0] for k in missing_keys if "." in k}
    heads = sorted({o for o in owners if not any(o != p and o.startswith(p + ".") for p in owners)})
    heads += [n for n, _ in model.named_modules() if n.split(".")[-1] == "pooler" and n not in heads]
    return heads


def encode(cfg: RunConfig, splits, tok) -> tuple[Encoded, Encoded, Encoded, int]:
    cols = cfg.columns()
    limit = min(cfg.max_length, getattr(tok, "model_max_length", cfg.max_length) or cfg.max_length)
    if splits.task == "classification":
        parts = [encode_classification(s, tok, cols, splits.label_names, limit)
                 for s in (splits.train, splits.validation, splits.test)]
    elif splits.chat:
        parts = [encode_chat(s, tok, cols, limit) for s in (splits.train, splits.validation, splits.test)]
    else:
        parts = [encode_plain_lm(s, tok, cols, limit) for s in (splits.train, splits.validation, splits.test)]
    for name, p in zip(("train", "validation", "test"), parts):
        if len(p) == 0:
            raise UnipeftError(f"the {name} split produced no examples after tokenisation")
    return parts[0], parts[1], parts[2], sum(p.truncated for p in parts)


def attach_method(model, cfg: RunConfig, task: str):
    """(module to train, trainable params by name, adapted model or None for full fine-tuning)."""
    import unipeft

    if cfg.method == "full":
        if cfg.overrides:
            raise UnipeftError("--set overrides recipe knobs; --method full has none")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return model, params, None
    heads = head_modules(model, getattr(model, "_unipeft_missing_keys", [])) if task == "classification" else None
    if not cfg.base_adapters:
        am = unipeft.attach(model, cfg.method, train_modules=heads, **cfg.overrides)
        return am, am.adapter_parameters("default"), am
    am = unipeft.AdaptedModel(model)
    names = load_base_adapters(am, cfg, task)
    if cfg.fuse:  # AdapterFusion over the earlier runs' adapters, which stay frozen
        fuse = unipeft.Fuse(*names)
        am.add_fusion(fuse, train_modules=heads)
        am.activate(fuse)
        return am, am.fusion_parameters(fuse), am
    am.add("default", cfg.method, train_modules=heads, **cfg.overrides)
    am.activate("default")
    return am, am.adapter_parameters("default"), am


def load_base_adapters(am, cfg: RunConfig, task: str) -> list[str]:
    """Load each earlier run's adapter (frozen, inactive) under the run folder's name: sequential multi-task
    training adds a new adapter next to them, so their behaviour cannot change (the base never moves)."""
    import re

    from .assets import model_path

    names = []
    for run in cfg.base_adapters:
        rcfg, rdir = read_run(run)
        if rcfg.method == "full":
            raise UnipeftError(f"--base-adapters '{run}' is a full fine-tune, not an adapter run")
        if model_path(rcfg.model).resolve() != model_path(cfg.model).resolve() or rcfg.quantize != cfg.quantize:
            raise UnipeftError(f"--base-adapters '{run}' was trained on model {rcfg.model}"
                               f"{' (' + rcfg.quantize + ')' if rcfg.quantize else ''}; this run uses {cfg.model}"
                               f"{' (' + cfg.quantize + ')' if cfg.quantize else ''}")
        if rcfg.task != task or (task == "classification" and rcfg.label_names != cfg.label_names):
            raise UnipeftError(f"--base-adapters '{run}' is a {rcfg.task} run with labels {rcfg.label_names}; this "
                               f"run is {task} with labels {cfg.label_names}")
        name = re.sub(r"\W", "_", Path(rdir).resolve().name) or "run"
        name = name if name[0].isalpha() else "run_" + name
        if name in am.recipes or name == "default":
            raise UnipeftError(f"two --base-adapters runs would both be called '{name}'; give their folders "
                               "distinct names")
        am.load(Path(rdir) / "adapter", name="default", as_name=name)
        names.append(name)
    return names


# ---- the run --------------------------------------------------------------------------------------------------------
def train_run(cfg: RunConfig, resume: bool = False, overwrite: bool = False, log=print,
              progress_factory=None) -> dict:
    """Train, evaluate and write the output folder; `progress_factory(total_steps)` may return a per-step callback."""
    cfg.validate()
    out = Path(cfg.out)
    if resume:
        if (out / "config.yaml").is_file():  # a resumed run continues exactly the configuration it started with
            cfg = RunConfig.from_file(out / "config.yaml")
            cfg.out = str(out)
    created = not out.exists()
    prepare_out(out, resume, overwrite)
    try:
        return _train(cfg, out, resume, log, progress_factory)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # failed before writing anything: leave no trace
            out.rmdir()
        raise


def _train(cfg: RunConfig, out: Path, resume: bool, log, progress_factory) -> dict:
    started = time.time()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # per run, also when compare runs several in one process
    splits = load_splits(cfg.data, cfg.eval_data, cfg.test_data, cfg.task, cfg.columns(), cfg.seed,
                         cfg.label_names or None)
    cfg.task, cfg.label_names, cfg.chat = splits.task, splits.label_names, splits.chat
    model, tok = load_base(cfg, splits.task, splits.label_names)
    train, validation, test, truncated = encode(cfg, splits, tok)
    if cfg.max_eval_examples:  # a fixed, seeded subset: the same examples at every evaluation
        validation, test = (_subset(e, cfg.max_eval_examples, cfg.seed) for e in (validation, test))
    if truncated:
        log(f"warning: {truncated} example(s) longer than {cfg.max_length} tokens were truncated (raise --max-length "
            "to keep them whole)")
    torch.manual_seed(cfg.seed)
    module, params, am = attach_method(model, cfg, splits.task)
    if not resume:  # inputs, model and method are all checked: only now replace a previous run
        clear_run(out)
        _write_atomic(out / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
    loop = cfg.loop()
    if cfg.cuda_graphs:  # graphs replay one call signature: one width for every batch, the longest example + 1 so
        loop.pad_to = max(len(x) for x in train.input_ids) + 1  # that every batch has padding (an all-ones mask
        # lets transformers drop the mask tensor for SDPA's causal flag, which would be another signature)
    trainer = Trainer(module, params, train, validation, splits.task, tok.pad_token_id, loop, out, log=log)
    if resume:
        trainer.load_checkpoint()
        log(f"resumed from step {trainer.state.step} of {trainer.total}")
    state = trainer.run(progress=progress_factory(trainer.total) if progress_factory else None)
    device = next(module.parameters()).device
    test_metrics = evaluate(module, test, splits.task, tok.pad_token_id)
    if not all(math.isfinite(v) for v in test_metrics.values()):
        raise UnipeftError(f"training diverged: test {', '.join(f'{k} {v}' for k, v in test_metrics.items())}; "
                           f"nothing was saved as a result: lower --lr and start again with --overwrite")
    if am is not None:
        am.save(out / "adapter")
    else:
        model.save_pretrained(out / "model")
    tok.save_pretrained(out / "tokenizer")
    total = sum(p.numel() for p in model.parameters()) if am is None else am.base_parameter_count()
    trainable = sum(p.numel() for p in params.values())
    summary = {"task": splits.task, "model": cfg.model, "method": cfg.method, "trainable_parameters": trainable,
               "total_parameters": total, "trainable_percent": 100 * trainable / total, "steps": state.step,
               "best_step": state.best_step, "tokens_per_s": state.tokens / max(state.seconds, 1e-9),
               "train_seconds": state.seconds, "wall_seconds": time.time() - started,
               "peak_memory_bytes": peak_memory_bytes(device), "device": str(device),
               "train_examples": len(train), "validation_examples": len(validation), "test_examples": len(test)}
    from .report import write_report

    write_report(out, cfg, summary, state.history, test_metrics)
    if (out / "checkpoint.pt").exists():
        (out / "checkpoint.pt").unlink()
    results = {"test": test_metrics, "summary": summary}
    _write_atomic(out / "results.json", json.dumps(results, indent=2))
    return results


# ---- using a finished run -------------------------------------------------------------------------------------------
def _subset(enc: Encoded, n: int, seed: int) -> Encoded:
    if len(enc) <= n:
        return enc
    import random

    idx = sorted(random.Random(seed).sample(range(len(enc)), n))
    return Encoded([enc.input_ids[i] for i in idx], [enc.labels[i] for i in idx], enc.truncated)


def read_run(out: str | Path) -> tuple[RunConfig, Path]:
    out = Path(out)
    if not (out / "config.yaml").is_file():
        raise UnipeftError(f"'{out}' is not a unipeft run folder (no config.yaml)")
    if not (out / "results.json").is_file():
        raise UnipeftError(f"'{out}' holds an unfinished run; finish it with `unipeft train --out {out} --resume`")
    cfg = RunConfig.from_file(out / "config.yaml")
    for part in ("tokenizer", "model" if cfg.method == "full" else "adapter"):
        if not (out / part).is_dir():
            raise UnipeftError(f"run folder '{out}' has no {part}/ folder; it is incomplete (train it again with "
                               "--overwrite)")
    return cfg, out


def from_pretrained(out: str | Path):
    """`unipeft.from_pretrained(OUT)`: the run's base model with its adapter attached (an `AdaptedModel`), or the
    fine-tuned model for a `full` run; in eval mode."""
    import unipeft

    cfg, out = read_run(out)
    if cfg.method == "full":
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification if cfg.task == "classification" else AutoModelForCausalLM
        return cls.from_pretrained(out / "model").eval()
    model, _ = load_base(cfg, cfg.task, cfg.label_names)
    return unipeft.load(model, out / "adapter").eval()


def run_tokenizer(out: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(out) / "tokenizer")

