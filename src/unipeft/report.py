"""`report.md` for a run: loss and validation curves as PNG (matplotlib, headless), and the run's figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plot(out: Path, history: list[dict[str, Any]], task: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    steps = [h for h in history if "split" not in h]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([h["step"] for h in steps], [h["loss"] for h in steps], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=110)
        plt.close(fig)
        made.append("loss.png")
    evals = [h for h in history if h.get("split") == "validation"]
    if evals:
        key = "accuracy" if task == "classification" else "perplexity"
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([h["step"] for h in evals], [h[key] for h in evals], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {key}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "validation.png", dpi=110)
        plt.close(fig)
        made.append("validation.png")
    return made


def write_report(out: Path, cfg, summary: dict[str, Any], history: list[dict[str, Any]],
                 test: dict[str, float]) -> None:
    images = _plot(out, history, summary["task"])
    mem = summary["peak_memory_bytes"] / 2**30
    lines = [f"# unipeft run: {cfg.method} on {cfg.model} ({summary['task']}, data {cfg.data})", "",
             "| | |", "|---|---|",
             *(f"| test {k} | {v:.4f} |" for k, v in test.items()),
             f"| trainable / total parameters | {summary['trainable_parameters']:,} / "
             f"{summary['total_parameters']:,} ({summary['trainable_percent']:.3f}%) |",
             f"| steps (best on validation) | {summary['steps']} ({summary['best_step']}) |",
             f"| examples train / validation / test | {summary['train_examples']:,} / "
             f"{summary['validation_examples']:,} / {summary['test_examples']:,} |",
             f"| tokens/s (training, incl. padding-free count) | {summary['tokens_per_s']:,.0f} |",
             f"| peak memory ({'GPU allocated' if summary['device'].startswith('cuda') else 'process RSS'}) | "
             f"{mem:.2f} GiB |",
             f"| training time / wall time | {summary['train_seconds']:.1f} s / {summary['wall_seconds']:.1f} s |",
             f"| device | {summary['device']} |", ""]
    lines += [f"![{name}]({name})" for name in images]
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out / "report.md")
