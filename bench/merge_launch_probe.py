"""Would building a whole layer's W' in fewer, larger launches pay?

The compiled step builds W' = W + s·B·A in 4 launches per layer in forward (q/k/v, gate/up, o, down) and 2 in
backward (o, down): 96 launches, 1.55 ms a step of the 953M model (`profile_compiled_10_full.txt`), each at the
speed of a plain copy of its W (`skinny_3_diagnostics.json`) — so what is left is the ramp and tail of each launch.
This probe times, over 16 layers' distinct weights (W read from DRAM, as in a step), captured in one CUDA graph
(no host time): the product's launches, plain copies of the same partition, and the same bytes in fewer launches
(the merge kernel over all of a layer's 2048-wide members stacked as one, plus down; one plain copy per layer).

Usage (GPU machine): PYTHONPATH=src python3 bench/merge_launch_probe.py [--out merge_launch.json]
"""

from __future__ import annotations

import argparse
import json

import torch

H, FFN, R, L = 2048, 5632, 16, 16  # hidden, intermediate, rank, layers (the harness model)


def graph_time(fn, reps: int = 20) -> float:
    """µs per replay of fn captured in a CUDA graph (median of reps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up (Triton compiles) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times[3:])[reps // 2]


def write_rows(path: str, rows: list[dict]) -> None:
    """The probe's rows as JSON, with the torch version and GPU name."""
    with open(path, "w") as f:
        json.dump(dict(meta=dict(torch=torch.__version__, gpu=torch.cuda.get_device_name()), rows=rows), f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from unipeft import kernels

    dev, dt = "cuda", torch.bfloat16
    shapes = dict(q=(H, H), k=(H, H), v=(H, H), o=(H, H), gate=(FFN, H), up=(FFN, H), down=(H, FFN))
    rows_2048 = sum(m for m, n in shapes.values() if n == H)  # every member with d_in = 2048, stacked
    layers = []
    for _ in range(L):
        flat = torch.randn(sum(m * n for m, n in shapes.values()), device=dev, dtype=dt)
        ws, off = {}, 0
        for name, (m, n) in shapes.items():
            ws[name] = flat[off:off + m * n].view(m, n)
            off += m * n
        bs = {k: torch.randn(m, R, device=dev, dtype=dt) * 0.01 for k, (m, n) in shapes.items()}
        as_ = {k: torch.randn(R, n, device=dev, dtype=dt) * 0.01 for k, (m, n) in shapes.items()}
        stacked_b = torch.randn(rows_2048, R, device=dev, dtype=dt) * 0.01
        layers.append(dict(flat=flat, ws=ws, bs=bs, as_=as_, out=torch.empty_like(flat), stacked_b=stacked_b))
    # the 2048-wide members are contiguous in `flat` in the order q, k, v, o, gate, up: one (rows_2048 × H) view
    s = 2.0

    def product_forward():
        for ly in layers:
            w, b, a = ly["ws"], ly["bs"], ly["as_"]
            kernels.merged_weights([w["q"], w["k"], w["v"]], [b["q"], b["k"], b["v"]], [a["q"], a["k"], a["v"]],
                                   [s] * 3)
            kernels.merged_weights([w["gate"], w["up"]], [b["gate"], b["up"]], [a["gate"], a["up"]], [s] * 2)
            kernels.merged_weight(w["o"], b["o"], a["o"], s)
            kernels.merged_weight(w["down"], b["down"], a["down"], s)

    def product_backward():
        for ly in layers:
            w, b, a = ly["ws"], ly["bs"], ly["as_"]
            kernels.merged_weight(w["o"], b["o"], a["o"], s)
            kernels.merged_weight(w["down"], b["down"], a["down"], s)

    def merge_two_per_layer():  # same bytes as product_forward: every 2048-wide member as one, then down
        for ly in layers:
            w, b, a = ly["ws"], ly["bs"], ly["as_"]
            wide = ly["flat"][:rows_2048 * H].view(rows_2048, H)
            kernels.merged_weight(wide, ly["stacked_b"], a["q"], s, out=ly["out"][:rows_2048 * H].view(rows_2048, H))
            kernels.merged_weight(w["down"], b["down"], a["down"], s)

    def copy_groups():
        for ly in layers:
            src, dst, off = ly["flat"], ly["out"], 0
            for size in (3 * H * H, 2 * FFN * H, H * H, H * FFN):
                dst[off:off + size].copy_(src[off:off + size])
                off += size

    def copy_layer():
        for ly in layers:
            ly["out"].copy_(ly["flat"])

    rows = []
    per_layer_bytes = 2 * 2 * sum(m * n for m, n in shapes.values())
    for name, fn, nbytes in (("product forward (4 launches/layer)", product_forward, per_layer_bytes),
                             ("product backward o+down (2/layer)", product_backward, 4 * (H * H + H * FFN)),
                             ("merge kernel, 2 launches/layer", merge_two_per_layer, per_layer_bytes),
                             ("plain copies, forward's partition (4/layer)", copy_groups, per_layer_bytes),
                             ("plain copy, 1/layer", copy_layer, per_layer_bytes)):
        us = graph_time(fn) / L
        rows.append(dict(variant=name, us_per_layer=round(us, 2), ms_per_step_16_layers=round(us * L / 1e3, 3),
                         tb_s=round(nbytes / us / 1e6, 2)))
        print(json.dumps(rows[-1]), flush=True)
    print("| variant | µs/layer | ms/16 layers | TB/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['us_per_layer']} | {r['ms_per_step_16_layers']} | {r['tb_s']} |")
    if args.out:
        write_rows(args.out, rows)


if __name__ == "__main__":
    main()
