"""Can LoRA's memory-bound kernels hide behind the frozen GEMMs on a second CUDA stream?

What the fused LoRA step adds to the GPU's work (docs/performance.md: W′ builds, the grads kernel, x·Aᵀ, dA) is
memory-bound and runs between the frozen GEMMs, which are compute-bound. Issued on a side stream while a GEMM
runs, such a kernel could use the bandwidth the GEMM leaves — if the GEMM leaves it any SMs. This probe times
pairs taken from one layer of the benchmark model (N = 8192 rows, bf16), each iteration from a flushed L2 and with
the host ahead of the GPU (a GPU sleep queued first):

    fwd_merge   the q/k/v forward GEMM (x · W′ᵀ, 6144 columns)  with  gate/up's W′ build (kernels.merged_weights)
    bwd_grads   gate's dx GEMM (g · W, K = 5632)                with  q/k/v's grads kernel (kernels.lora_grads)
    bwd_da      gate's dx GEMM                                  with  q/k/v's dA (gaᵀ · x, cuBLAS)
    bwd_xa      gate's dx GEMM                                  with  q/k/v's x · Aᵀ (cuBLAS)

and reports, per pair, the µs of the GEMM alone, the small kernel alone, both in sequence on one stream, and both
at once on two streams (the small kernel launched first or second; on a side stream of normal or high priority).
If "at once" is not well below "in sequence", streams are not a lever for this step.

Usage (GPU machine): PYTHONPATH=src python3 bench/overlap_probe.py [--out overlap.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from da_probe import time_from_dram  # (bench/ is on the path: scripts run from it)

N, D, DFF, R = 8192, 2048, 5632, 16


def _operands() -> dict:
    from unipeft import kernels

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

    x, w_qkv, g_gate, w_gate = rnd(N, D), rnd(3 * D, D, scale=0.02), rnd(N, DFF), rnd(DFF, D, scale=0.02)
    gu_w = [rnd(DFF, D, scale=0.02) for _ in range(2)]
    gu_a, gu_b = [rnd(R, D, scale=0.02) for _ in range(2)], [rnd(DFF, R, scale=0.02) for _ in range(2)]
    gs, bs = [rnd(N, D) for _ in range(3)], [rnd(D, R, scale=0.02) for _ in range(3)]
    xas = list(rnd(N, 3 * R).split_with_sizes([R] * 3, 1))
    ga_t, a_cat = rnd(3 * R, N), rnd(3 * R, D, scale=0.02)
    big = {"fwd": lambda: torch.mm(x, w_qkv.t()), "bwd": lambda: torch.mm(g_gate, w_gate)}
    small = {"merge": lambda: kernels.merged_weights(gu_w, gu_b, gu_a, [2.0, 2.0]),
             "grads": lambda: kernels.lora_grads(gs, bs, xas, [0, R, 2 * R], [2.0] * 3, 3 * R),
             "da": lambda: torch.mm(ga_t, x), "xa": lambda: torch.mm(x, a_cat.t())}
    return dict(big=big, small=small)


PAIRS = {"fwd_merge": ("fwd", "merge"), "bwd_grads": ("bwd", "grads"), "bwd_da": ("bwd", "da"),
         "bwd_xa": ("bwd", "xa")}


def _us(body) -> float:
    """Median µs of body from a flushed L2, host ahead (da_probe.time_from_dram)."""
    return round(time_from_dram(body, reps=30), 2)


def _together(big, small, side: torch.cuda.Stream, small_first: bool):
    """big on the current stream and small on `side`, both after everything queued so far; the current stream
    waits for small before going on."""
    def body():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        if not small_first:
            big()
        with torch.cuda.stream(side):
            small()
        if small_first:
            big()
        main.wait_stream(side)
    return body


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    ops = _operands()
    low, high = torch.cuda.Stream(), torch.cuda.Stream(priority=-1)
    rows = []
    for name, (b, s) in PAIRS.items():
        big, small = ops["big"][b], ops["small"][s]
        row = dict(pair=name, big_us=_us(big), small_us=_us(small),
                   sequence_us=_us(lambda big=big, small=small: (big(), small())))
        for label, side in (("normal", low), ("high", high)):
            for first in (False, True):
                key = f"together_{label}_{'small_first' if first else 'big_first'}_us"
                row[key] = _us(_together(big, small, side, first))
        row["best_together_us"] = min(v for k, v in row.items() if k.startswith("together_"))
        row["hidden_share"] = round((row["sequence_us"] - row["best_together_us"]) / row["small_us"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| pair | GEMM µs | small µs | in sequence | best together | share of small hidden |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['big_us']} | {r['small_us']} | {r['sequence_us']} | {r['best_together_us']} | "
              f"{r['hidden_share']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
