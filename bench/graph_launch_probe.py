"""The host time of one CUDA-graph replay (cudaGraphLaunch) against the graph's size and shape.

A static-cache decoding step replays one CUDA graph; unipeft's graph has ~229 more kernel nodes than the merged
model's (the routed shrink and expand of 112 projections) on a second stream forked and joined per projection, and
its compiled call took ~0.35 ms more host time (bench/results/decode_7_ab_streams.json). This probe captures graphs
of N tiny kernels — on one stream, and as "projections" of one main-stream kernel beside two side-stream kernels
with a fork and a join each, as the routed op records them — and times `replay()` on the host (the queue drained
before each, so no launch waits), to say how much of that is the launch of a bigger graph.

Usage (GPU machine): python3 bench/graph_launch_probe.py --out graph_launch.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _graph(nodes: int, forked: bool) -> torch.cuda.CUDAGraph:
    bufs = [torch.zeros(64, device="cuda") for _ in range(8)]
    side = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        if not forked:
            for i in range(nodes):
                bufs[i % 8].add_(1)
        else:
            main = torch.cuda.current_stream()
            for i in range(nodes // 3):  # one "projection": a main kernel beside two side kernels
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    bufs[(i + 1) % 8].add_(1)
                    bufs[(i + 2) % 8].add_(1)
                bufs[i % 8].add_(1)
                main.wait_stream(side)
    graph.bufs = bufs  # (kept alive with the graph)
    return graph


def _host_us(graph: torch.cuda.CUDAGraph, reps: int = 200) -> dict:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return dict(median_us=round(times[len(times) // 2], 2), p10_us=round(times[len(times) // 10], 2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="30,150,300,540,900")
    ap.add_argument("--out", default="graph_launch.json")
    args = ap.parse_args()
    rows = []
    for forked in (False, True):
        for n in (int(v) for v in args.nodes.split(",")):
            graph = _graph(n, forked)
            graph.replay()
            rows.append(dict(nodes=n, forked=forked, **_host_us(graph)))
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                 date=time.strftime("%Y-%m-%d")), rows=rows), f, indent=1)
    print(f"{'nodes':>6} {'forked':>7} {'median µs':>10} {'p10 µs':>8}")
    for r in rows:
        print(f"{r['nodes']:6} {str(r['forked']):>7} {r['median_us']:10} {r['p10_us']:8}")


if __name__ == "__main__":
    main()
