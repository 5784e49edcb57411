"""Eager training steps one by one, for several contenders built in turn in one process.

Why: `perf_vs_peft.py` times each contender once (median of 10 steps after 3 warm-up) and then the floor and LoRA in
turn. On a freshly started host (AI1, twenty-ninth session) the single eager LoRA run measured 118.6 ms (1.165×)
while the five rounds in turn minutes later ran 1.060–1.066×. Is a contender slow when it follows peft, or on its
first build in a process, or did the host run slower for a while? This probe builds the contenders in the order
given (`floor`, `peft`, `lora` — the harness's frozen floor, peft LoRA r=16, unipeft LoRA r=16, all seven
projections), times every step synchronized on its own, and records the steps in which Python ran a full (gen-2)
garbage collection.

Usage (GPU machine, harness carried as in perf_vs_peft.py):
    PYTHONPATH=src python3 bench/steps_in_order.py --harness .gpu_carry/bench \
        --cases floor,peft,lora,lora,floor,lora [--steps 30] --out steps.json
Runs on the CPU too (tests/test_bench_steps_in_order.py: tiny model, `time_steps` only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from first_steps import GcClock  # (bench/ is on the path: the script's own folder, or tests' bench_module)

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


def time_steps(model, params, x: torch.Tensor, steps: int, sync: Callable[[], None], warm: int = 3) -> dict:
    """`steps` harness steps (forward with labels = inputs, backward, AdamW, zero_grad), each synchronized: the
    per-step ms, their median after `warm`, and the indices of steps that ran a gen-2 collection."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    clock = GcClock()
    times, gen2 = [], []
    try:
        for i in range(steps):
            sync()
            clock.take()
            t0 = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(round((time.perf_counter() - t0) * 1e3, 1))
            if "gen2" in clock.take():
                gen2.append(i)
    finally:
        clock.close()
    return dict(median_ms=statistics.median(times[warm:]) if len(times) > warm else None, steps_ms=times,
                gen2_steps=gen2)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--cases", default="floor,peft,lora,lora,floor,lora")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, args.harness)
    import peft_baseline as h

    import unipeft

    rows = []
    for case in args.cases.split(","):
        model = h.make_model()
        if case == "floor":
            params = h.frozen_floor(model)
        elif case == "peft":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=h.TARGETS, lora_dropout=0.0))
            params = [p for p in model.parameters() if p.requires_grad]
        elif case == "lora":
            model = unipeft.attach(model, "lora", r=16, alpha=32, targets=SITES)
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            raise SystemExit(f"error: unknown case {case!r}; use floor, peft or lora")
        x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
        rows.append(dict(case=case, **time_steps(model, params, x, args.steps, torch.cuda.synchronize)))
        print(json.dumps(rows[-1]), flush=True)
        del model, params
        h.release()
    print("| # | case | median ms | gen-2 steps |\n|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {i} | {r['case']} | {r['median_ms']} | {r['gen2_steps']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=dict(device=torch.cuda.get_device_name(), torch=torch.__version__), rows=rows), f,
                      indent=1)
    return rows


if __name__ == "__main__":
    main()
