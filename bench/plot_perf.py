"""Plot the perf_vs_peft.py ratios against the performance targets: bench/results/*.json → docs/perf_vs_peft.png.
Each bar is the latest file's ratio; where a file timed the contender and its reference in turn (LoRA training with
`perf_vs_peft.py --repeats`, the `decode` case), the median of the per-round ratios. Files whose meta says
`"plot": false` are skipped: A/B runs of code before a change, or of a change that was reverted; cases a file's
meta lists in `"plot_skip"` are skipped for that file (its `"note"` says why).

Usage: python bench/plot_perf.py [--results bench/results] [--out docs/perf_vs_peft.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: (label, contender case, reference case, target ratio)
PAIRS = [
    ("train, eager", "{who}_lora_r16", "frozen_floor", 1.10),
    ("train, eager + graphs", "{who}_lora_r16_graphed", "frozen_floor", 1.10),
    ("train, compiled", "compiled_{who}_lora_r16", "compiled_frozen_floor", 1.10),
    ("unmerged fwd", "{who}_unmerged_forward", "forward_merged", 1.10),
    ("4 adapters 8x1024", "{who}_mixed_4_adapters_forward", "forward_merged", 1.15),
    ("32 adapters 32x256", "{who}_32_adapters_forward_32x256", "forward_merged_32x256", 1.30),
    ("decode 32 adapters", "{who}_32_adapters_generate_32x256_32new", "generate_merged_32x256_32new", 1.50),
    ("decode 32, static cache", "{who}_32_adapters_generate_static_32x256_32new",
     "generate_merged_static_32x256_32new", 1.50),
    ("train, accel. base", "{who}_accel_lora_r16", "accel_frozen_floor", 1.10),
    ("train, accel. + graphs", "{who}_accel_lora_r16_graphed", "accel_frozen_floor", 1.10),
]
PEFT_DECODE = 21201 / 498  # the anchor (not re-run: 21 s per call)
PEFT_ACCEL = 155.4 / 66.5  # the Liger anchor: peft LoRA on a Liger-patched base / that base's floor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--out", default="docs/perf_vs_peft.png")
    args = ap.parse_args()
    ratios: dict[tuple[str, str], float] = {}  # (case, reference) -> ratio, both from one file (one process)
    for f in sorted(Path(args.results).glob("perf_*.json"), key=lambda f: int(f.stem.split("_")[1])):
        record = json.loads(f.read_text())
        if record.get("meta", {}).get("plot") is False:
            continue  # an A/B run of code that is not the current code (its description says which)
        data = record["rows"]
        skip = set(record.get("meta", {}).get("plot_skip", ()))  # cases a file's note says not to plot (and why)
        rows = {r["case"]: r["step_ms"] for r in data if "step_ms" in r and r["case"] not in skip}
        rounds = {r["case"]: r["rounds_ms"] for r in data if "rounds_ms" in r and r["case"] not in skip}
        for _, case, ref, _ in PAIRS:
            for who in ("unipeft", "peft"):
                name = case.format(who=who)
                if name in rows and ref in rows:
                    ratios[(name, ref)] = rows[name] / rows[ref]  # later files (newer runs) win
                if name in rounds and ref in rounds and len(rounds[name]) == len(rounds[ref]):
                    per_round = sorted(a / b for a, b in zip(rounds[name], rounds[ref]))  # (timed in turn)
                    ratios[(name, ref)] = per_round[len(per_round) // 2]
        for r in data:  # the median of rounds timed in turn (--repeats) beats a single pair from the same file
            if r["case"].endswith("interleaved_lora_over_floor"):
                tag = "compiled_" if r["case"].startswith("compiled_") else ""
                ratios[(f"{tag}unipeft_lora_r16", f"{tag}frozen_floor")] = r["median"]
    labels, ours, theirs, targets = [], [], [], []
    for label, case, ref, target in PAIRS:
        mine = ratios.get((case.format(who="unipeft"), ref))
        if mine is None:
            continue
        labels.append(label)
        targets.append(target)
        ours.append(mine)
        peft = ratios.get((case.format(who="peft").removesuffix("_graphed"), ref))  # (peft has no graphed mode)
        anchor = PEFT_DECODE if label == "decode 32 adapters" else PEFT_ACCEL if "accel" in label else float("nan")
        theirs.append(peft if peft else anchor)
    fig, ax = plt.subplots(figsize=(10, 4.6))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], theirs, 0.4, label="peft 0.21", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], ours, 0.4, label="unipeft", color="#3a6ea5")
    ax.scatter(list(xs), targets, marker="_", s=600, color="red", label="target", zorder=3)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    ax.set_ylabel("time / reference (log)")
    ax.set_title("LoRA r=16, Llama-shaped 953M, bf16, one H200 (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
