"""The routed LoRA kernel (routed_kernels.routed_lora) against the batched-GEMM path it replaces, per projection,
on the GPU.

Usage: PYTHONPATH=src python3 bench/routed_probe.py --out routed.json [--sweep]

Decoding shapes of the benchmark model (d 2048, ffn 5632): 32 rows of one token, each with its own of 32 LoRA
adapters (r = 16, scale folded into B). Per shape: the GPU time (calls replayed from a CUDA graph) of bmm +
baddbmm_ on per-row weights gathered once (what decoding ran before) and of the kernel reading the stacks by slot,
and each path's host time per call (launches only, no sync: what a CPU-bound decoding step pays). `--sweep` times
the kernel's block sizes and warps too. The kernel is checked against the fp32 formula first.
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from skinny_probe import _time  # (bench/ is on the path: scripts run from it)

from unipeft import routed_kernels

SHAPES = {"q/k/v/o": (2048, 2048), "gate/up": (2048, 5632), "down": (5632, 2048)}


def _gpu_us(fn, iters: int = 50) -> float:
    """GPU time per call: `iters` calls captured in one CUDA graph and replayed (a host-bound loop would time the
    host); skinny_probe's timer."""
    return _time([fn], reps=iters)


def _host_us(fn, iters: int = 300) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e6 / iters


def _probe(label: str, d_in: int, d_out: int, b: int, n: int, r: int, sweep_: bool) -> dict:
    dt, dev = torch.bfloat16, "cuda"
    x = torch.randn(b, 1, d_in, device=dev, dtype=dt)
    w = torch.randn(d_out, d_in, device=dev, dtype=dt) * 0.02
    a_stack = torch.randn(n + 1, r, d_in, device=dev, dtype=dt) * 0.02
    b_stack = torch.randn(n + 1, d_out, r, device=dev, dtype=dt) * 0.02
    slots = torch.randperm(n, device=dev)[:b] if b <= n else torch.randint(0, n + 1, (b,), device=dev)
    y = torch.nn.functional.linear(x, w)
    ref = y.float() + torch.einsum("btr,bnr->btn", torch.einsum("btk,brk->btr", x.float(),
                                                                 a_stack[slots].float()),
                                   b_stack[slots].float())
    err = (routed_kernels.routed_lora(y, x, a_stack, b_stack, slots).float() - ref).abs().max().item()
    a_rows = a_stack.index_select(0, slots).transpose(1, 2)
    b_rows = b_stack.index_select(0, slots).transpose(1, 2)

    def bmm_path():
        return torch.nn.functional.linear(x, w).baddbmm_(torch.bmm(x, a_rows), b_rows)

    def kernel_path():
        return routed_kernels.routed_lora(torch.nn.functional.linear(x, w), x, a_stack, b_stack, slots)

    def base_only():
        return torch.nn.functional.linear(x, w)

    row = dict(shape=label, d_in=d_in, d_out=d_out, max_abs_err_vs_fp32=round(err, 5),
               base_gpu_us=round(_gpu_us(base_only), 2), bmm_gpu_us=round(_gpu_us(bmm_path), 2),
               kernel_gpu_us=round(_gpu_us(kernel_path), 2), base_host_us=round(_host_us(base_only), 2),
               bmm_host_us=round(_host_us(bmm_path), 2), kernel_host_us=round(_host_us(kernel_path), 2),
               config=dict(BK=routed_kernels.ROUTED_BK, BN=routed_kernels.ROUTED_BN, warps=routed_kernels.ROUTED_WARPS))
    if sweep_:
        keep = (routed_kernels.ROUTED_BK, routed_kernels.ROUTED_BN, routed_kernels.ROUTED_WARPS)
        sweep = {}
        for bk, bn, warps in itertools.product((128, 256, 512), (128, 256, 512, 1024), (2, 4, 8)):
            routed_kernels.ROUTED_BK, routed_kernels.ROUTED_BN, routed_kernels.ROUTED_WARPS = bk, bn, warps
            sweep[f"BK{bk}_BN{bn}_w{warps}"] = round(_gpu_us(lambda: routed_kernels.routed_lora(
                y, x, a_stack, b_stack, slots)), 2)
        routed_kernels.ROUTED_BK, routed_kernels.ROUTED_BN, routed_kernels.ROUTED_WARPS = keep
        best = sorted(sweep.items(), key=lambda kv: kv[1])
        row["sweep_best"] = best[:5]
        row["sweep"] = sweep
    return row


def _layer_probe(b: int, n: int, r: int, layers: int = 8) -> dict:
    """A decoding layer's seven projections as in the model, with each layer's own weights and stacks (`layers` of
    them, more than L2 holds: every read comes from DRAM, as in a decoding step): GPU µs per layer (every layer's
    calls captured in one CUDA graph) of the base GEMMs alone, with `routed_lora` after each GEMM (one stream), and
    with `routed_linear` (the delta on a second stream beside the GEMM; without the add, which a compiled step
    fuses into the next kernel, and with it as its own launch). Checks routed_linear replayed from a graph against
    the fp32 formula."""
    dt, dev = torch.bfloat16, "cuda"
    dims = ((2048, 2048),) * 4 + ((2048, 5632),) * 2 + ((5632, 2048),)

    def build():
        return [(torch.randn(b, 1, d_in, device=dev, dtype=dt), torch.randn(d_out, d_in, device=dev, dtype=dt) * 0.02,
                 torch.randn(n + 1, r, d_in, device=dev, dtype=dt) * 0.02,
                 torch.randn(n + 1, d_out, r, device=dev, dtype=dt) * 0.02) for d_in, d_out in dims]

    stack = [build() for _ in range(layers)]
    slots = torch.randperm(n, device=dev)[:b] if b <= n else torch.randint(0, n + 1, (b,), device=dev)
    linear = torch.nn.functional.linear

    def base():
        for layer in stack:
            for x, w, _, _ in layer:
                linear(x, w)

    def one_stream():
        for layer in stack:
            for x, w, a, bb in layer:
                routed_kernels.routed_lora(linear(x, w), x, a, bb, slots)

    def side():
        for layer in stack:
            for x, w, a, bb in layer:
                routed_kernels.routed_linear(x, w, None, a, bb, slots)

    def side_add():
        for layer in stack:
            for x, w, a, bb in layer:
                y, d = routed_kernels.routed_linear(x, w, None, a, bb, slots)
                y + d

    errs = []  # routed_linear captured in a graph and replayed, against the fp32 formula
    for x, w, a, bb in stack[0]:
        outs = []
        graph = torch.cuda.CUDAGraph()
        routed_kernels.routed_linear(x, w, None, a, bb, slots)  # (compiles the kernels outside the capture)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            outs.append(routed_kernels.routed_linear(x, w, None, a, bb, slots))
        x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        y, d = outs[0]
        ref = torch.einsum("btr,bnr->btn", torch.einsum("btk,brk->btr", x.float(), a[slots].float()),
                           bb[slots].float())
        errs.append(max((y.float() - linear(x.float(), w.float())).abs().max().item(),
                        (d.float() - ref).abs().max().item()))
    per = lambda fn: round(_time([fn], reps=1) / layers, 2)  # noqa: E731 (one call = every layer)
    row = dict(layers=layers, graph_replay_max_abs_err=round(max(errs), 5), base_us=per(base),
               one_stream_us=per(one_stream), side_stream_us=per(side), side_stream_add_us=per(side_add))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="routed.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layer", action="store_true", help="only the per-layer comparison (one stream / two)")
    args = ap.parse_args()
    torch.manual_seed(0)
    n, r, b = args.adapters, args.rank, args.rows
    results = []
    if args.layer:
        with torch.no_grad():
            row = _layer_probe(b, n, r)
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=b, adapters=n, rank=r)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, layer=row), f, indent=1)
        print("| per layer µs | base GEMMs | + routed_lora, one stream | + delta on a side stream | same + add |")
        print("| | " + " | ".join(str(row[k]) for k in ("base_us", "one_stream_us", "side_stream_us",
                                                       "side_stream_add_us")) + " |")
        return
    with torch.no_grad():
        for label, (d_in, d_out) in SHAPES.items():
            row = _probe(label, d_in, d_out, b, n, r, args.sweep)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=b, adapters=n, rank=r)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=results), f, indent=1)
    print("| shape | base µs | bmm path µs (host) | kernel path µs (host) | err |")
    print("|---|---|---|---|---|")
    for row in results:
        print(f"| {row['shape']} | {row['base_gpu_us']} | {row['bmm_gpu_us']} ({row['bmm_host_us']}) | "
              f"{row['kernel_gpu_us']} ({row['kernel_host_us']}) | {row['max_abs_err_vs_fp32']} |")
        if "sweep_best" in row:
            print(f"|   best configs | {row['sweep_best']} |")


if __name__ == "__main__":
    main()
