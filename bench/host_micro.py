"""Host µs per call of the eager LoRA step's pieces, on the machine that runs the GPU.

`bench/host_probe.py` says which phase of an eager step is slow on a host and cProfile says which Python functions
take the time — but cProfile (and torch.profiler) inflate exactly what is in question: many small calls. Here each
piece runs on its own in a loop of `--iters` calls, issued back to back with one synchronization at the end, at a
row count small enough that the GPU finishes each call before the host issues the next (so the time is the host's
cost), with the benchmark model's projection shapes:

    floor_qkv       three frozen F.linear, forward + backward (what the floor pays for q/k/v)
    group_qkv       the fused LoRA group (siblings._LoraGroup), forward + backward
    single_o        the fused LoRA projection (fused._LoraLinear, merged form), forward + backward
    group_fwd, single_fwd   the same, forward only
    floor_o         one frozen F.linear, forward + backward
    plain_fn_o      the same as a minimal Python autograd function (that machinery's own cost)
    merged_weights  kernels.merged_weights for q/k/v (one Triton launch and its two buffers)
    merged_weight   kernels.merged_weight for o
    lora_grads      kernels.lora_grads for q/k/v (the zeroed buffer, the output, one launch)
    op_qkv, op_o    a compiled backward's two-stream op for q/k/v and for o (overlap.lora_backward: x·Aᵀ, grads and
                    dA on the side stream, dx on the main one; the op's Python is host time a traced backward
                    otherwise does not have); op_qkv_one: the same on one stream (UNIPEFT_STREAMS=0)
    zeros, empty, mm, addmm_, view, split   the aten ops those use, one call each

Usage (GPU machine): PYTHONPATH=src python3 bench/host_micro.py [--single-thread] [--only a,b] [--cprofile PIECE]
    [--rows 128] [--iters 300] [--out micro.json]
--single-thread runs backward in the calling thread: with autograd's device thread, every backward call of these
loops pays a hand-over between threads (~100 µs on the GPU machine) that a training step pays once. On the CPU the
Triton pieces are skipped (tests/test_bench_host.py runs it there with tiny shapes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _timed(fn, iters: int, sync) -> float:
    """Median over five loops of `iters` calls of the host µs per call (each loop ends with a synchronization)."""
    for _ in range(3):
        fn()
    sync()
    loops = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        loops.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(loops)


def pieces(rows: int, d: int, d_kv: int, rank: int, device: str, dtype: torch.dtype) -> dict:
    """name -> zero-argument callable, for every piece that runs on this device."""
    from torch.nn import functional as F

    from unipeft import fused, kernels, overlap, siblings

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    outs = (d, d_kv, d_kv)
    ws = [rnd(o, d) for o in outs]
    as_ = [rnd(rank, d).requires_grad_() for _ in outs]
    bs = [rnd(o, rank).requires_grad_() for o in outs]
    x = rnd(rows, d, scale=1.0).requires_grad_()
    gys = [rnd(rows, o, scale=1.0) for o in outs]
    scales = (2.0, 2.0, 2.0)

    def floor_qkv():
        ys = [F.linear(x, w) for w in ws]
        torch.autograd.backward(ys, gys)

    spec = (scales, (None, None, None))  # (the scales, no 4-bit sources)
    group_args = (x, spec, *[t for i in range(3) for t in (ws[i], as_[i], bs[i])], None, None, None)

    def group_fwd():
        return siblings._LoraGroup.apply(*group_args)

    def group_qkv():
        torch.autograd.backward(group_fwd(), gys)

    def single_fwd():
        return fused._LoraLinear.apply(x, ws[0], None, as_[0], bs[0], 2.0, True, None)

    def single_o():
        single_fwd().backward(gys[0])

    class _Plain(torch.autograd.Function):  # the Python-function machinery alone: y = x·Wᵀ, dx = g·W
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(w)
            return F.linear(x, w)

        @staticmethod
        def backward(ctx, gy):
            (w,) = ctx.saved_tensors
            return torch.mm(gy, w), None

    def plain_fn_o():
        _Plain.apply(x, ws[0]).backward(gys[0])

    def floor_o():
        F.linear(x, ws[0]).backward(gys[0])

    flat = torch.zeros(3 * (d + rows) * rank, device=device)
    a_det, b_det = [a.detach() for a in as_], [b.detach() for b in bs]
    xa = rnd(rows, 3 * rank, scale=1.0)
    xas = list(xa.split_with_sizes([rank] * 3, 1))
    out: dict = dict(floor_qkv=floor_qkv, group_qkv=group_qkv, single_o=single_o, floor_o=floor_o,
                     plain_fn_o=plain_fn_o, single_fwd=single_fwd, group_fwd=group_fwd)
    if kernels.available(ws[0]):
        out["merged_weights"] = lambda: kernels.merged_weights(ws, b_det, a_det, list(scales))
        out["merged_weight"] = lambda: kernels.merged_weight(ws[0], b_det[0], a_det[0], 2.0)
    if kernels.grads_available(gys + xas, [rank] * 3):
        out["lora_grads"] = lambda: kernels.lora_grads(gys, b_det, xas, [0, rank, 2 * rank], list(scales), 3 * rank)
    a_cat = torch.cat(a_det)

    def op_qkv():
        overlap.lora_backward(gys, ws, b_det, x.detach(), a_cat, list(scales), [rank] * 3, True, True, False)

    def op_qkv_one():
        import os
        os.environ["UNIPEFT_STREAMS"] = "0"
        try:
            op_qkv()
        finally:
            del os.environ["UNIPEFT_STREAMS"]

    out.update(op_qkv=op_qkv, op_qkv_one=op_qkv_one,
               op_o=lambda: overlap.lora_backward(gys[:1], ws[:1], b_det[:1], x.detach(), a_det[0], [2.0], [rank],
                                                  True, True, True))
    acc = torch.zeros(rows, d, device=device, dtype=dtype)
    out.update(zeros=lambda: torch.zeros(flat.numel(), device=device),
               empty=lambda: torch.empty(flat.numel(), device=device, dtype=dtype),
               mm=lambda: torch.mm(gys[0], ws[0]),
               addmm_=lambda: acc.addmm_(gys[1], ws[1]),
               view=lambda: flat.view(-1, rank),
               split=lambda: xa.split_with_sizes([rank] * 3, 1))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--d-kv", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--only", default=None, help="comma-separated piece names")
    ap.add_argument("--out", default=None)
    ap.add_argument("--single-thread", action="store_true",
                    help="run backward in the calling thread (torch.autograd.set_multithreading_enabled(False))")
    ap.add_argument("--cprofile", default=None, help="also cProfile this piece (top 30 by own time)")
    args = ap.parse_args(argv)
    with torch.autograd.set_multithreading_enabled(not args.single_thread):
        return _run(args)


def _run(args) -> list[dict]:
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    table = pieces(args.rows, args.d, args.d_kv, args.rank, device, dtype)
    names = args.only.split(",") if args.only else list(table)
    rows = [dict(piece=n, host_us=round(_timed(table[n], args.iters, sync), 2)) for n in names if n in table]
    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.iters):
            table[args.cprofile]()
        sync()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    print("| piece | host µs per call |\n|---|---|")
    for r in rows:
        print(f"| {r['piece']} | {r['host_us']:.2f} |")
    if args.out:
        info = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, rows=args.rows)
        with open(args.out, "w") as f:
            json.dump(dict(pieces=rows, **info), f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
