"""How much host time the compiled LoRA step's backward has to spare: added CPU time per call of the two-stream op.

The compiled LoRA step is GPU-bound on a fast host, but its backward keeps the CPU busy for much of the GPU's time
(docs/performance.md), and some hosts ran slow LoRA rounds while the floor held. This probe adds a busy-wait of
N µs to every call of `overlap.lora_backward` (64 a step on the benchmark model: a stand-in for a slower CPU in the
op's Python, which is where the backward's host time goes) and times the floor and the LoRA step in turn at each
level, the levels in a back-and-forth order (0, 100, …, max, max, …, 0) so drift cancels. The level where the
ratio starts to climb is the host margin that the op's body has on this host; a change that cuts the op's host time
buys that much more margin, and nothing where the margin is already large.

`--squeeze CORES:HOGS` adds rounds on a slower CPU as a whole: every thread of the process is pinned to CORES
cores, beside HOGS busy-looping processes pinned to the same ones, started after compiling and stopped after each
such round (4:4 leaves the step's busy thread — the Python thread in forward, autograd's device thread in backward
— between four fifths and half of a core, as the scheduler places it: the effect differs between hosts).
`--eager` times the models uncompiled (the op is then not called; squeeze rounds only). `--mode reduce-overhead`
compiles both models in that torch.compile mode (CUDA graphs: each step replays recorded graphs, so the host issues
almost nothing; the two-stream op stays off while a graph is captured, so the backward runs on one stream).

Usage (GPU machine):
    python3 bench/spin_probe.py --harness .gpu_carry/bench --levels 0,100,200,400 --passes 2 [--squeeze 4:4] \
        [--eager | --mode reduce-overhead] --out spin.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

from ab_step import _median

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


def spin_wrapper(inner, level: list[float]):
    """`inner` with a busy-wait of level[0] µs before each call (host time only: nothing is queued meanwhile)."""
    def call(*args, **kwargs):
        if level[0] > 0:
            end = time.perf_counter() + level[0] * 1e-6
            while time.perf_counter() < end:
                pass
        return inner(*args, **kwargs)
    return call


def order(levels: list, passes: int) -> list:
    """The levels up and back down, `passes` times (each level twice a pass, once on each side)."""
    return (levels + levels[::-1]) * passes


@contextlib.contextmanager
def squeezed(spec: str | None):
    """Within: this process's threads pinned to the first CORES of its cores, beside HOGS busy loops pinned there
    too ("CORES:HOGS"; None: nothing changes). Afterwards the hogs are killed and every thread's affinity restored."""
    if not spec:
        yield
        return
    n_cores, n_hogs = (int(v) for v in spec.split(":"))
    allowed = sorted(os.sched_getaffinity(0))
    cores = set(allowed[:n_cores])
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    before = {}
    for tid in tids:
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cores)
        except OSError:  # (a thread that ended meanwhile)
            pass
    code = f"import os\nos.sched_setaffinity(0, {sorted(cores)})\nwhile True:\n    pass\n"
    hogs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n_hogs)]
    try:
        time.sleep(0.2)
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        for tid, mask in before.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass


def summarize(rounds: list[dict]) -> list[dict]:
    """Per condition (busy-wait level, squeeze): the LoRA / floor ratios of its rounds and their median, the median
    LoRA and floor ms."""
    out = []
    def cond(r):
        return r["spin_us"], r.get("squeeze") or ""
    for lvl, sq in sorted({cond(r) for r in rounds}):
        rs = [r for r in rounds if cond(r) == (lvl, sq)]
        out.append(dict(spin_us=lvl, squeeze=sq or None,
                        per_step_ms=round(lvl * rs[0]["calls_per_step"] / 1e3, 2),
                        ratios=[round(r["lora"] / r["floor"], 4) for r in rs],
                        median_ratio=round(_median([r["lora"] / r["floor"] for r in rs]), 4),
                        lora_ms=round(_median([r["lora"] for r in rs]), 2),
                        floor_ms=round(_median([r["floor"] for r in rs]), 2)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--levels", default="0,100,200,400", help="busy-wait µs per op call, comma-separated")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--squeeze", default=None, help="CORES:HOGS[,CORES:HOGS] — also rounds on a squeezed CPU (spin 0)")
    ap.add_argument("--eager", action="store_true", help="time the models uncompiled")
    ap.add_argument("--mode", default=None, help="torch.compile mode for both models (e.g. reduce-overhead)")
    ap.add_argument("--out", default="spin.json")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h
    import torch

    import unipeft
    from unipeft import overlap

    level = [0.0]
    calls = [0]
    inner = overlap.lora_backward

    def counted(*a, **k):
        calls[0] += 1
        return inner(*a, **k)
    overlap.lora_backward = spin_wrapper(counted, level)  # (the op's body looks the name up at every call)
    floor = h.make_model()
    floor_params = h.frozen_floor(floor)
    lora = unipeft.attach(h.make_model(), "lora", r=16, alpha=32, targets=SITES)
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    def wrap(m):
        return m if args.eager else torch.compile(m, mode=args.mode)
    models = (("floor", wrap(floor), floor_params), ("lora", wrap(lora), lora_params))
    for case, model, params in models:
        h.time_train(f"warm_{case}", model, params)
    calls[0] = 0
    h.time_train("count_lora", models[1][1], lora_params)
    per_step = calls[0] / (h.STEPS + h.WARM)
    rounds = []
    conditions = [(float(x), None) for x in args.levels.split(",")]
    conditions += [(0.0, q) for q in args.squeeze.split(",")] if args.squeeze else []
    for i, (lvl, sq) in enumerate(order(conditions, args.passes)):
        level[0] = lvl
        row = dict(round=i, spin_us=lvl, squeeze=sq, calls_per_step=per_step)
        with squeezed(sq):
            for case, model, params in models:
                row[case] = h.time_train(f"{case}_{i}_spin{lvl:g}_{sq}", model, params)["step_ms"]
        rounds.append(row)
        print(json.dumps(row), flush=True)
    result = dict(meta=dict(date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(),
                            torch=torch.__version__, unipeft=os.path.dirname(unipeft.__file__),
                            calls_per_step=per_step, compiled=not args.eager, mode=args.mode,
                            cpus=len(os.sched_getaffinity(0))),
                  rounds=rounds, summary=summarize(rounds))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'spin µs/call':>12} {'squeeze':>8} {'ms/step':>8} {'LoRA ms':>8} {'floor ms':>9} {'ratio':>7}")
    for s in result["summary"]:
        print(f"{s['spin_us']:>12g} {s['squeeze'] or '-':>8} {s['per_step_ms']:>8} {s['lora_ms']:>8} "
              f"{s['floor_ms']:>9} {s['median_ratio']:>7}")


if __name__ == "__main__":
    main()
