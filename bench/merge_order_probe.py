"""Does building W' between a layer's norm and its GEMMs slow the GEMMs down (the norm's output evicted from L2)?

In a compiled LoRA step the W' build of a group (kernels.merged_weights: read W, write W', 50–92 MB for q/k/v or
gate/up) runs right before the group's first GEMM, i.e. between the kernel that wrote x (RMSNorm, SwiGLU, SDPA)
and the GEMMs that read it. In the frozen floor nothing sits there, so part of x is read from L2. This probe times
the GEMMs of one group after four orders, each iteration starting from a flushed L2 and with the host ahead of the
GPU (a GPU sleep queued first, so the events time GPU work, not launch latency):

- `floor`:  write x → GEMMs with W                         (what the frozen model does)
- `merge`:  write x → W' build → GEMMs with W'              (what the LoRA step does now)
- `stream`: write x → W' build with W loaded evict-first and W' stored streaming (.cs) → GEMMs with W'
- `early`:  W' build → write x → GEMMs with W'              (W' built before x's producer)

Reports, per group shape and order, the median µs of the GEMMs alone (CUDA events around them) and of the whole
sequence. Usage (GPU machine): PYTHONPATH=src python3 bench/merge_order_probe.py [--out merge_order.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

N = 8192
GROUPS = {"qkv": (2048, [2048, 2048, 2048]), "o": (2048, [2048]), "gate_up": (2048, [5632, 5632]),
          "down": (5632, [2048])}


def _stream_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def merge(w_ptr, b_ptr, a_ptr, o_ptr, M, K, R, s, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        kr = tl.arange(0, BR)
        bt = tl.load(b_ptr + rm[:, None] * R + kr[None, :], mask=(rm[:, None] < M) & (kr[None, :] < R), other=0.0)
        at = tl.load(a_ptr + kr[:, None] * K + rn[None, :], mask=(kr[:, None] < R) & (rn[None, :] < K), other=0.0)
        acc = tl.dot(bt, at)
        mask = (rm[:, None] < M) & (rn[None, :] < K)
        w = tl.load(w_ptr + rm[:, None] * K + rn[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        out = w.to(tl.float32) + s * acc
        tl.store(o_ptr + rm[:, None] * K + rn[None, :], out.to(o_ptr.dtype.element_ty), mask=mask,
                 cache_modifier=".cs")

    def run(ws, bs, as_, s):
        outs = []
        for w, b, a in zip(ws, bs, as_):
            o = torch.empty_like(w)
            m, k = w.shape
            merge[(triton.cdiv(m, 32), triton.cdiv(k, 128))](w, b, a, o, m, k, a.shape[0], s, BM=32, BN=128, BR=16,
                                                             num_warps=4)
            outs.append(o)
        return outs
    return run


def _time(order: str, x_src, ws, bs, as_, flush, stream, iters: int = 40) -> dict:
    from unipeft import kernels

    gemm, total = [], []
    for i in range(iters + 5):
        flush.zero_()
        torch.cuda._sleep(3_000_000)  # ~1.5 ms of GPU work queued first: the host issues what follows before the GPU
        e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]  # gets to it (events time the GPU alone)
        e[0].record()
        if order == "early":
            wp, _ = kernels.merged_weights(ws, bs, as_, [2.0] * len(ws))
        x = torch.mul(x_src, 1.0001)  # stands in for the norm writing the GEMMs' input
        if order == "merge":
            wp, _ = kernels.merged_weights(ws, bs, as_, [2.0] * len(ws))
        elif order == "stream":
            wp = stream(ws, bs, as_, 2.0)
        elif order == "floor":
            wp = ws
        e[1].record()
        for w in wp:
            torch.mm(x, w.t())
        e[2].record()
        torch.cuda.synchronize()
        if i >= 5:
            gemm.append(e[1].elapsed_time(e[2]) * 1e3)
            total.append(e[0].elapsed_time(e[2]) * 1e3)
    return dict(gemm_us=round(statistics.median(gemm), 1), total_us=round(statistics.median(total), 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)  # > L2 (50 MB on the H200)
    stream = _stream_kernel()
    rows = []
    for name, (d_in, outs) in GROUPS.items():
        x_src = torch.randn(N, d_in, device=dev, dtype=dt)
        ws = [torch.randn(d, d_in, device=dev, dtype=dt) * 0.02 for d in outs]
        bs = [torch.randn(d, 16, device=dev, dtype=dt) * 0.02 for d in outs]
        as_ = [torch.randn(16, d_in, device=dev, dtype=dt) * 0.02 for _ in outs]
        ref = kernels_check(ws, bs, as_, stream)
        for order in ("floor", "merge", "stream", "early", "floor", "merge"):  # floor and merge twice: drift
            r = _time(order, x_src, ws, bs, as_, flush, stream)
            rows.append(dict(group=name, order=order, **r, stream_err=ref))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| group | order | GEMMs µs | whole µs |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {r['order']} | {r['gemm_us']} | {r['total_us']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


def kernels_check(ws, bs, as_, stream) -> float:
    """The streaming variant computes the same W' as the product kernel (max abs difference)."""
    from unipeft import kernels

    a, _ = kernels.merged_weights(ws, bs, as_, [2.0] * len(ws))
    b = stream(ws, bs, as_, 2.0)
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


if __name__ == "__main__":
    main()
