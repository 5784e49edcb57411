"""The training loop behind `unipeft train`: AdamW, warmup + linear/cosine decay, gradient accumulation, clipping, bf16
autocast on the GPU, periodic evaluation that keeps the best weights, and checkpoints that resume bit-identically.

A checkpoint (`OUT/checkpoint.pt`, read back with `torch.load(weights_only=True)`) holds the trainable tensors, the
optimizer and scheduler states, the RNG state, the data position (epoch, micro-batch) and the best weights so far. The
epoch's data order is a permutation seeded by (seed, epoch), so a resumed run sees exactly the batches an uninterrupted
run would have seen, and on CPU reaches bit-identical final weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import Encoded, collate
from .errors import UnipeftError

_STEP_SLEEP = float(os.environ.get("UNIPEFT_TEST_STEP_SLEEP", "0") or 0)


@dataclass
class LoopConfig:
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 32
    grad_accum: int = 1
    warmup: float = 0.06
    schedule: str = "linear"
    clip: float = 1.0
    weight_decay: float = 0.0
    eval_every: int | None = None
    save_every: int | None = None
    seed: int = 0
    optim: str = "adamw"
    pad_to: int | None = None  # every training batch padded to this many tokens (CUDA graphs want one shape)


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    micro: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    metric_lines: int = 0
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def steps_per_epoch(n: int, cfg: LoopConfig) -> int:
    return max(1, math.ceil(n / cfg.batch_size) // cfg.grad_accum)


def total_steps(n: int, cfg: LoopConfig) -> int:
    """epochs × steps per epoch, capped by max_steps."""
    full = cfg.epochs * steps_per_epoch(n, cfg)
    return min(cfg.max_steps, full) if cfg.max_steps else full


def lr_lambda(cfg: LoopConfig, total: int):
    warm = int(round(cfg.warmup * total))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "constant":
            return 1.0
        return max(0.0, 1.0 - progress)

    return f


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches(lengths: list[int], cfg: LoopConfig, epoch: int) -> list[list[int]]:
    """The epoch's batches: a seeded shuffle, then length-grouping inside windows of 64 batches (far less padding on
    CPU), then a seeded shuffle of the batches. Deterministic in (seed, epoch), which is what makes resume exact."""
    n = len(lengths)
    order = epoch_order(n, cfg.seed, epoch)
    window = cfg.batch_size * 64
    out: list[list[int]] = []
    for w in range(0, n, window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        out.extend(chunk[i:i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size))
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 7)
    return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]


@torch.no_grad()
def evaluate(model: torch.nn.Module, enc: Encoded, task: str, pad_id: int, batch_size: int | None = None
             ) -> dict[str, float]:
    """Accuracy (+ loss) for classification; token-weighted loss and perplexity for causal LM."""
    batch_size = batch_size or (64 if task == "classification" else 8)  # LM logits are batch × length × vocab
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))  # length-sorted: less padding
    hits, loss_sum, count = 0, 0.0, 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        b = {k: v.to(device) for k, v in collate([enc.input_ids[j] for j in idx], [enc.labels[j] for j in idx],
                                                   pad_id, task).items()}
        with _autocast(device):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        logits = out.logits.float()
        if task == "classification":
            hits += int((logits.argmax(-1) == b["labels"]).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
            count += len(idx)
        else:
            lab = b["labels"][:, 1:]
            tok_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         lab.reshape(-1), reduction="sum", ignore_index=-100)
            loss_sum += float(tok_loss)
            count += int((lab != -100).sum())
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    if task == "classification":
        return {"accuracy": hits / max(count, 1), "loss": loss}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def make_optimizer(cfg: LoopConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (block-wise quantized moments: ~2 bytes of state per parameter instead
    of 8). No paged optimizers: they use CUDA managed memory, which can hang a shared GPU.

    AdamW runs fused wherever torch has the kernel: an adapter is many small tensors (224 for LoRA on every
    linear of a 16-layer Llama), and the default foreach path pays a sequence of multi-tensor ops over them every
    step — on the H200 the fused update made a compiled LoRA step ~0.6% faster (docs/performance-log.md), on a
    2-core CPU the update of 24 LoRA tensors 4× faster. Same formula; results agree to rounding."""
    if cfg.optim == "adamw8bit":
        from .quant import _bnb

        return _bnb().optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fusable(params) or None)


def fusable(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused AdamW takes these tensors: floating point, on devices it has the kernel for (torch
    checks only at the first step, so this asks first; a torch without the list gets the default path)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    devices = set(_get_fused_kernels_supported_devices())
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


class Trainer:
    """Runs the loop for one model; `params` are the trainable tensors by stable names (what checkpoints hold)."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter], train: Encoded,
                 validation: Encoded, task: str, pad_id: int, cfg: LoopConfig, out: Path, log=None) -> None:
        self.model, self.params, self.train_set, self.validation = model, params, train, validation
        self.task, self.pad_id, self.cfg, self.out = task, pad_id, cfg, out
        self.log = log or (lambda *a, **k: None)
        self.device = next(p for p in model.parameters()).device
        self.total = total_steps(len(train), cfg)
        self.optimizer = make_optimizer(cfg, list(params.values()))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total))
        self.state = LoopState()
        self.best: dict[str, torch.Tensor] | None = None
        self.ckpt = out / "checkpoint.pt"
        self.metrics_path = out / "metrics.jsonl"
        self.eval_every = cfg.eval_every or steps_per_epoch(len(train), cfg)
        self.save_every = cfg.save_every or self.eval_every

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.params.values()):
            kept = f"the last good checkpoint is {self.ckpt}" if self.ckpt.exists() else "no checkpoint was kept"
            raise UnipeftError(f"the weights became non-finite at step {self.state.step}; training stopped and {kept}; "
                               "lower --lr (then --resume)")
        blob = {"params": {k: p.detach().cpu().clone() for k, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": _py_rng_state()},
                "state": {k: v for k, v in vars(self.state).items() if k != "history"},
                "history": json.dumps(self.state.history), "best": self.best}
        if torch.cuda.is_available():
            blob["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self.ckpt)

    def load_checkpoint(self) -> None:
        if not self.ckpt.is_file():
            raise UnipeftError(f"nothing to resume: {self.ckpt} does not exist")
        try:
            blob = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UnipeftError(f"checkpoint {self.ckpt} is unreadable ({str(e).splitlines()[0][:120]}); start over "
                               "with --overwrite") from None
        keys = ("params", "optimizer", "scheduler", "rng", "state", "history", "best")
        if not isinstance(blob, dict) or any(k not in blob for k in keys) or not isinstance(blob["params"], dict):
            raise UnipeftError(f"{self.ckpt} is not a unipeft training checkpoint; start over with --overwrite")
        if set(blob["params"]) != set(self.params):
            raise UnipeftError(f"checkpoint {self.ckpt} belongs to another configuration (its tensors differ); use "
                               "the same flags as the interrupted run")
        try:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(blob["params"][k].to(p.device, p.dtype))
            self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
            torch.set_rng_state(blob["rng"]["torch"])
            _set_py_rng_state(blob["rng"]["python"])
            if "cuda" in blob["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
            self.state = LoopState(**blob["state"], history=json.loads(blob["history"]))
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            why = str(e).splitlines()[0][:100] if str(e) else "-"
            raise UnipeftError(f"checkpoint {self.ckpt} does not fit this run ({type(e).__name__}: {why}); start over "
                               "with --overwrite") from None
        self.best = blob["best"]
        lines = self.metrics_path.read_text().splitlines(keepends=True) if self.metrics_path.exists() else []
        self.metrics_path.write_text("".join(lines[: self.state.metric_lines]))

    # -- logging --------------------------------------------------------------------------------------------------
    def _record(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.state.metric_lines += 1
        self.state.history.append(row)

    def _better(self, metrics: dict[str, float]) -> bool:
        key = "accuracy" if self.task == "classification" else "loss"
        value = metrics[key]
        best = self.state.best_metric
        return best is None or (value > best if key == "accuracy" else value < best)

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self, progress=None) -> LoopState:
        cfg, st = self.cfg, self.state
        self.model.train()
        t0 = time.perf_counter() - st.seconds
        while st.step < self.total:
            plan = batches([len(x) for x in self.train_set.input_ids], cfg, st.epoch)
            usable = (len(plan) // cfg.grad_accum) * cfg.grad_accum or len(plan)
            while st.micro < usable and st.step < self.total:
                loss_value, ntok = 0.0, 0
                for _ in range(min(cfg.grad_accum, usable - st.micro)):
                    idx = plan[st.micro]
                    b = {k: v.to(self.device) for k, v in collate(
                        [self.train_set.input_ids[j] for j in idx], [self.train_set.labels[j] for j in idx],
                        self.pad_id, self.task, cfg.pad_to).items()}
                    with _autocast(self.device):
                        loss = self.model(**b).loss
                    if not torch.isfinite(loss):
                        kept = f"the last good checkpoint is {self.ckpt}" if self.ckpt.exists() else \
                            "no checkpoint was written yet"
                        raise UnipeftError(f"the loss became {loss.item()} at step {st.step + 1}; training stopped "
                                           f"and {kept}; lower --lr and start again with --overwrite")
                    (loss / cfg.grad_accum).backward()
                    loss_value += float(loss.detach()) / cfg.grad_accum
                    ntok += int(b["attention_mask"].sum())
                    st.micro += 1
                if cfg.clip:
                    torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.clip)
                lr = self.scheduler.get_last_lr()[0]  # the rate this step used
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                st.step += 1
                st.tokens += ntok
                st.seconds = time.perf_counter() - t0
                self._record({"step": st.step, "epoch": st.epoch, "loss": round(loss_value, 6), "lr": lr,
                              "tokens_per_s": round(st.tokens / max(st.seconds, 1e-9), 1)})
                if progress is not None:
                    progress(st, loss_value, lr)
                if _STEP_SLEEP:  # test aid: slows steps so a kill can land mid-run
                    time.sleep(_STEP_SLEEP)
                if st.step % self.eval_every == 0 or st.step == self.total:
                    metrics = evaluate(self.model, self.validation, self.task, self.pad_id)
                    self._record({"step": st.step, "split": "validation", **metrics})
                    self.log(f"step {st.step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                    if self._better(metrics):
                        st.best_metric = metrics["accuracy" if self.task == "classification" else "loss"]
                        st.best_step = st.step
                        self.best = {k: p.detach().cpu().clone() for k, p in self.params.items()}
                if st.step % self.save_every == 0 and st.step < self.total:
                    self.save_checkpoint()
            if st.micro >= usable:
                st.epoch += 1
                st.micro = 0
        st.seconds = time.perf_counter() - t0
        if self.best is not None:  # keep the best: the run's adapter is the best on validation
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.best[k].to(p.device, p.dtype))
        return st


def _py_rng_state() -> torch.Tensor:
    """Python's random state as a tensor, so weights_only loading can read it back."""
    version, internal, gauss = random.getstate()
    return torch.tensor(list(internal) + [version, -1 if gauss is None else 1], dtype=torch.float64)


def _set_py_rng_state(t: torch.Tensor) -> None:
    values = [int(v) for v in t.tolist()]
    random.setstate((values[-2], tuple(values[:-2]), None))
