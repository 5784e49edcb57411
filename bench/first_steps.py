"""The first training steps after torch.compile, one by one: are they slower than the steady state, and why?

The harness reports the median of 10 steps after 3 warm-up steps. On one host (V4, sixteenth session) the compiled
LoRA step with the two-stream backward ran at 85–91 ms for its first ~13 steps after compiling and ~75 ms later,
while the same model with one stream did not; another host did not show it. This probe builds one model (the
harness's frozen floor or LoRA r=16 on all seven projections), compiles it, and times `--steps` steps each
synchronized on its own, with the host's time per phase (forward call, backward call, optimizer), Python's garbage
collections inside each step (count and ms, by generation: a post-compile heap makes full collections slow) and the
GPU's own time between CUDA events, and the peak memory (of the compiling first step and of the steps after it,
as torch.cuda.max_memory_allocated, the harness's measure). Run one process per case, so each starts from the same
state.

Usage (GPU machine, harness carried as in perf_vs_peft.py):
    PYTHONPATH=src python3 bench/first_steps.py --harness .gpu_carry/bench --case lora [--env UNIPEFT_STREAMS=0] \\
        [--steps 40] --out first.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


class GcClock:
    """Python's garbage collections between `take()` calls: count and wall ms per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.log: list[tuple[int, float]] = []
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.log.append((info["generation"], (time.perf_counter() - self.started) * 1e3))
            self.started = None

    def take(self) -> dict:
        """The collections since the last call, as {"gen<g>": [count, ms]}."""
        out: dict = {}
        for gen, ms in self.log:
            count, total = out.get(f"gen{gen}", (0, 0.0))
            out[f"gen{gen}"] = (count + 1, round(total + ms, 3))
        self.log = []
        return out

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def summary(rows: list[dict], tail: int = 10) -> dict:
    """The steady state (median of the last `tail` steps) and how many of the steps before it ran more than 5%
    slower than that, and the GC time in the slow steps against the others."""
    steady = statistics.median(r["step_ms"] for r in rows[-tail:])
    slow = [r for r in rows[1:-tail] if r["step_ms"] > 1.05 * steady]  # (step 0 includes the compile)
    gc_ms = lambda rs: round(sum(ms for r in rs for _, ms in r["gc"].values()), 3)  # noqa: E731
    return dict(steady_ms=round(steady, 3), slow_steps=len(slow), slow_step_indices=[r["step"] for r in slow],
                gc_ms_in_slow_steps=gc_ms(slow), gc_ms_in_all_steps=gc_ms(rows[1:]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--case", choices=("floor", "lora"), default="lora")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE set before building (repeatable)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for item in args.env:
        key, _, value = item.partition("=")
        os.environ[key] = value
    sys.path.insert(0, args.harness)
    import peft_baseline as h
    import torch

    import unipeft

    model = h.make_model()
    if args.case == "floor":
        params = h.frozen_floor(model)
    else:
        model = unipeft.attach(model, "lora", r=16, alpha=32, targets=SITES)
        params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model)
    x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
    opt = torch.optim.AdamW(params, lr=1e-4)
    clock = GcClock()
    rows = []
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    torch.cuda.reset_peak_memory_stats()
    peaks = []
    for i in range(args.steps):
        torch.cuda.synchronize()
        clock.take()
        t0 = time.perf_counter()
        events[0].record()
        loss = compiled(input_ids=x, labels=x).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        events[1].record()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        rows.append(dict(step=i, step_ms=round((t4 - t0) * 1e3, 3), gpu_ms=round(events[0].elapsed_time(events[1]), 3),
                         host_fwd_ms=round((t1 - t0) * 1e3, 3), host_bwd_ms=round((t2 - t1) * 1e3, 3),
                         host_opt_ms=round((t3 - t2) * 1e3, 3), gc=clock.take()))
        peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        if i == 0:  # (the compiling step's peak apart)
            torch.cuda.reset_peak_memory_stats()
    clock.close()
    result = dict(case=args.case, env=args.env, steps=rows, summary=summary(rows),
                  peak_gib_first_step=round(peaks[0], 3), peak_gib_later=round(peaks[-1], 3),
                  device=torch.cuda.get_device_name(), torch=torch.__version__)
    print("| step | ms | GPU ms | host fwd | host bwd | host opt | gc |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['step_ms']:.2f} | {r['gpu_ms']:.2f} | {r['host_fwd_ms']:.2f} | "
              f"{r['host_bwd_ms']:.2f} | {r['host_opt_ms']:.2f} | {r['gc']} |")
    print(json.dumps(dict(result["summary"], peak_gib_first_step=result["peak_gib_first_step"],
                          peak_gib_later=result["peak_gib_later"])))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
