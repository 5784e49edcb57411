"""`unipeft compare`: several methods on one task, one table and one plot (metric vs % trainable parameters).

Each (method, seed) is an ordinary run in OUT/<method>-s<seed>/ (so any of them can be evaluated, merged or resumed);
OUT/compare.json, compare.md and compare.png summarise them, full fine-tuning first as the reference row.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.console import Console

from .errors import UnipeftError
from .recipe import as_recipe
from .run import RunConfig, _write_atomic, train_run


def run_compare(data: str, methods: list[str], model: str, seeds: int, max_steps: int | None, epochs: int,
                batch_size: int, out: Path, overwrite: bool, console: Console,
                columns: dict[str, str] | None = None) -> dict:
    if not methods:
        raise UnipeftError("--methods is empty; e.g. --methods full,lora,houlsby")
    if seeds < 1:
        raise UnipeftError("--seeds must be >= 1")
    if (out / "compare.json").exists() and not overwrite:
        raise UnipeftError(f"'{out}' already holds a comparison; choose another --out or pass --overwrite")
    methods = sorted(methods, key=lambda m: m != "full")
    configs = {(m, seed): RunConfig(model=model, method=m, data=data, seed=seed, max_steps=max_steps, epochs=epochs,
                                    batch_size=batch_size, out=str(out / f"{m}-s{seed}"), **(columns or {}))
               for m in methods for seed in range(seeds)}
    for cfg in configs.values():  # every method and folder checked before hours of training, not when reached
        cfg.validate()
        if cfg.method != "full":
            as_recipe(cfg.method, **cfg.overrides)
        if not overwrite and Path(cfg.out).exists() and any(Path(cfg.out).iterdir()):
            raise UnipeftError(f"'{cfg.out}' already holds a run; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        results = []
        for seed in range(seeds):
            console.print(f"compare: {method}, seed {seed}")
            results.append(train_run(configs[method, seed], overwrite=overwrite, log=lambda m: None))
        key = "accuracy" if results[0]["summary"]["task"] == "classification" else "perplexity"
        values = [r["test"][key] for r in results]
        s = results[0]["summary"]
        rows.append({"method": method, "metric": key, "mean": statistics.fmean(values),
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values,
                     "trainable_parameters": s["trainable_parameters"], "trainable_percent": s["trainable_percent"],
                     "train_seconds": statistics.fmean(r["summary"]["train_seconds"] for r in results),
                     "tokens_per_s": statistics.fmean(r["summary"]["tokens_per_s"] for r in results),
                     "peak_memory_gib": max(r["summary"]["peak_memory_bytes"] for r in results) / 2**30,
                     "device": s["device"]})
    summary = {"data": data, "model": model, "seeds": seeds, "max_steps": max_steps, "epochs": epochs, "rows": rows}
    _write_atomic(out / "compare.json", json.dumps(summary, indent=2))
    _table(out, summary)
    _plot(out, rows)
    console.print((out / "compare.md").read_text())
    return summary


def _table(out: Path, summary: dict) -> None:
    rows = summary["rows"]
    key = rows[0]["metric"]
    budget = f"max {summary['max_steps']} steps" if summary["max_steps"] else f"{summary['epochs']} epoch(s)"
    lines = [f"# {summary['model']} on {summary['data']}: {len(rows)} methods, {summary['seeds']} seed(s), {budget}",
             "", f"| method | test {key} | trainable params | % trainable | train s | tokens/s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" ± {r['std']:.4f}" if summary["seeds"] > 1 else ""
        lines.append(f"| {r['method']} | {r['mean']:.4f}{spread} | {r['trainable_parameters']:,} | "
                     f"{r['trainable_percent']:.3f} | {r['train_seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_memory_gib']:.2f} |")
    lines += ["", f"device: {rows[0]['device']}", "", "![metric vs trainable parameters](compare.png)"]
    _write_atomic(out / "compare.md", "\n".join(lines) + "\n")


def _plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.errorbar(r["trainable_percent"], r["mean"], yerr=r["std"] or None, fmt="o", capsize=3)
        ax.annotate(r["method"], (r["trainable_percent"], r["mean"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("% trainable parameters (log)")
    ax.set_ylabel(f"test {rows[0]['metric']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
