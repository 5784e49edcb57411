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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="routed.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    n, r, b = args.adapters, args.rank, args.rows
    results = []
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
