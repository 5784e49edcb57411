"""Host time vs GPU time of one training step, and the same step captured as a CUDA graph (probe for issue 5).

Usage (GPU machine): PYTHONPATH=src python3 bench/graph_probe.py --harness .gpu_carry/bench [--liger] [--compile]
Per case: eager wall ms, host ms (time until the CPU has issued the whole step, before the sync), graphed replay ms.
With --compile each model is wrapped in torch.compile (no capture) and the row adds the graph and graph-break counts.
--phases adds, per case, the GPU time of forward, backward and optimizer step between CUDA events (gaps between
kernels included, unlike a profiler's busy time) and the host time to issue each, medians of 8 synced steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def phases(h, model, params, steps: int = 12) -> dict:
    """Medians (ms) of the GPU time of each phase of a synced step (CUDA events at its boundaries) and of the host
    time to issue it: where a step with more, smaller kernels loses time to the gaps between them."""
    x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
    opt = torch.optim.AdamW(params, lr=1e-4)
    rows = []
    for i in range(steps):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        torch.cuda.synchronize()
        t = [time.perf_counter()]
        ev[0].record()
        loss = model(input_ids=x, labels=x).loss
        t.append(time.perf_counter())
        ev[1].record()
        loss.backward()
        t.append(time.perf_counter())
        ev[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        ev[3].record()
        torch.cuda.synchronize()
        if i >= 4:
            names = ("fwd", "bwd", "opt")
            rows.append(dict(wall=(time.perf_counter() - t[0]) * 1e3,
                             **{f"host_{p}": (t[j + 1] - t[j]) * 1e3 for j, p in enumerate(names)},
                             **{f"gpu_{p}": ev[j].elapsed_time(ev[j + 1]) for j, p in enumerate(names)}))
    return {f"phase_{k}_ms": round(_median([r[k] for r in rows]), 2) for k in rows[0]}


def measure(h, case: str, model, params, graph: bool = True, compile_: bool = False, phased: bool = False) -> dict:
    if compile_:
        torch._dynamo.reset()  # each variant compiles afresh (dynamo would reuse the last one's code)
        torch._dynamo.utils.counters.clear()
        model, graph = torch.compile(model), False
    x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
    opt = torch.optim.AdamW(params, lr=1e-4, capturable=True)
    walls, hosts = [], []
    for i in range(13):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        if i >= 3:
            walls.append(time.perf_counter() - t0)
            hosts.append(t1 - t0)
    row = dict(case=case, eager_ms=round(_median(walls) * 1e3, 2), host_ms=round(_median(hosts) * 1e3, 2),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    torch.cuda.reset_peak_memory_stats()
    if compile_:
        c = torch._dynamo.utils.counters
        row.update(graphs=c["stats"]["unique_graphs"], graph_breaks=sum(c["graph_break"].values()))
    if phased:
        row.update(phases(h, model, params))
    try:
        if not graph:
            raise RuntimeError("capture not attempted (--no-graph)")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
        ts = []
        for _ in range(13):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            g.replay()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        row["graphed_ms"] = round(_median(ts[3:]) * 1e3, 2)
        del g
    except Exception as e:  # noqa: BLE001 - a probe: report why capture failed
        row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--liger", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-graph", action="store_true", help="eager only (Liger's fused loss syncs: no capture)")
    ap.add_argument("--phases", action="store_true", help="also time each phase between CUDA events")
    ap.add_argument("--out", default="graph_probe.json")
    ap.add_argument("--variants", default="unipeft_lora", help="e.g. lora,lora_notriton:UNIPEFT_TRITON=0")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h

    import unipeft

    rows = []
    m = h.make_model()
    if args.liger:
        unipeft.accelerate(m)
    rows.append(measure(h, "floor", m, h.frozen_floor(m), graph=not args.no_graph, compile_=args.compile,
                        phased=args.phases))
    del m
    h.release()
    import os

    for variant in args.variants.split(","):  # name or name:ENV=VALUE;ENV=VALUE
        name, _, env = variant.partition(":")
        old = {k: os.environ.get(k) for k in (e.split("=")[0] for e in env.split(";") if e)}
        os.environ.update(dict(e.split("=", 1) for e in env.split(";") if e))
        m = h.make_model()
        if args.liger:
            unipeft.accelerate(m)
        am = unipeft.attach(m, "lora", r=16, alpha=32, targets=SITES)
        params = [p for p in am.parameters() if p.requires_grad]
        rows.append(measure(h, name, am, params, graph=not args.no_graph, compile_=args.compile,
                            phased=args.phases))
        del m, am
        h.release()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    json.dump(rows, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
