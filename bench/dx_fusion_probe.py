"""Probe: can a Triton GEMM for the backward's dx = g·W carry the LoRA grads pass for free?

The LoRA backward reads every projection's output gradient g (N × d_out) twice: cuBLAS reads it for the frozen
product dx = g·W, and the grads kernel (kernels.lora_grads) reads it again for ga = s·g·B and dB = s·gᵀ·xa — 2.2 ms
of the compiled step on the 953M benchmark model. A dx GEMM of our own could compute ga and dB from the g tiles
it already holds, but only pays if it keeps cuBLAS's speed on the frozen product, which dominates the step. This
probe answers that before any engine code is written, at the harness's shapes (N = 8192 tokens):

  cublas        torch.mm(g, W)
  triton        a plain Triton GEMM (grouped tile order), over a few Hopper tile configs
  fused0        the same, the programs of the first column block also accumulating ga and dB (dB by fp32 atomics)
  fusedbal      the same, the extra work spread over all column blocks (each takes every n-th K step; ga by atomics)
  current       cuBLAS's dx plus kernels.lora_grads (what the engine runs now), and lora_grads alone

Times are medians of triton.testing.do_bench (L2 cleared before each call). Writes JSON, prints a table.

Usage (GPU machine): PYTHONPATH=src python3 bench/dx_fusion_probe.py [--out dx.json] [--quick]
CPU check of the kernels' numbers (tiny shapes, interpreter):
    TRITON_INTERPRET=1 python3 bench/dx_fusion_probe.py --check
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

# (M = tokens, K = d_out: the reduction, N = d_in) of the benchmark model's backward dx products
SHAPES = [(8192, 2048, 2048), (8192, 6144, 2048), (8192, 2048, 5632), (8192, 5632, 2048), (8192, 11264, 2048)]
CONFIGS = [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3),
           (128, 256, 64, 8, 4)]  # BM, BN, BK, warps, stages
R = 16


@triton.jit
def _dx(g_ptr, w_ptr, b_ptr, xa_ptr, dx_ptr, ga_ptr, db_ptr, M, N, K, s,
        R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
        FUSE: tl.constexpr, KSTEPS: tl.constexpr):
    """dx = g·W (g: M × K, W: K × N, row-major; shapes divisible by the blocks). FUSE 1: the programs of column
    block 0 also add s·g·B into ga (M × R, fp32, stored) and s·gᵀ·xa into dB (K × R, fp32 atomics); FUSE 2: every
    column block takes the K steps k with k % n_col_blocks == its index, ga and dB both by atomics."""
    pid = tl.program_id(0)
    npm = M // BM
    npn = N // BN
    width = GROUP_M * npn
    first = (pid // width) * GROUP_M
    gsz = min(npm - first, GROUP_M)
    pm = first + (pid % width) % gsz
    pn = (pid % width) // gsz
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rr = tl.arange(0, R)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if FUSE != 0:
        xa = tl.load(xa_ptr + rm[:, None] * R + rr[None, :])
        accg = tl.zeros((BM, R), dtype=tl.float32)
    for step in range(0, KSTEPS):  # (constexpr: the interpreter cannot loop to a runtime bound)
        k0 = step * BK
        a = tl.load(g_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(w_ptr + (k0 + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
        if FUSE != 0:
            mine = pn == 0 if FUSE == 1 else step % npn == pn
            if mine:
                bb = tl.load(b_ptr + (k0 + rk)[:, None] * R + rr[None, :])
                accg = tl.dot(a, bb, accg)
                part = tl.dot(tl.trans(a), xa)
                tl.atomic_add(db_ptr + (k0 + rk)[:, None] * R + rr[None, :], part * s, sem="relaxed")
    tl.store(dx_ptr + rm[:, None] * N + rn[None, :], acc.to(dx_ptr.dtype.element_ty))
    if FUSE == 1:
        if pn == 0:
            tl.store(ga_ptr + rm[:, None] * R + rr[None, :], accg * s)
    elif FUSE == 2:
        tl.atomic_add(ga_ptr + rm[:, None] * R + rr[None, :], accg * s, sem="relaxed")


def run(g, w, b, xa, s, fuse, cfg):
    m, k = g.shape
    n = w.shape[1]
    bm, bn, bk, warps, stages = cfg
    dx = torch.empty(m, n, device=g.device, dtype=g.dtype)
    ga = torch.zeros(m, R, device=g.device, dtype=torch.float32)
    db = torch.zeros(k, R, device=g.device, dtype=torch.float32)
    kw = {} if g.device.type == "cpu" else dict(num_warps=warps, num_stages=stages)
    _dx[(m // bm * (n // bn),)](g, w, b, xa, dx, ga, db, m, n, k, s, R=R, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                                FUSE=fuse, KSTEPS=k // bk, **kw)
    return dx, ga, db


def check() -> None:
    """The kernel's numbers against torch (fp32, tiny shapes), every FUSE mode."""
    torch.manual_seed(0)
    m, k, n, s = 64, 64, 64, 0.5
    g, w = torch.randn(m, k), torch.randn(k, n)
    b, xa = torch.randn(k, R), torch.randn(m, R)
    for fuse in (0, 1, 2):
        dx, ga, db = run(g, w, b, xa, s, fuse, (16, 16, 16, 4, 1))
        err = [(dx - g @ w).abs().max().item()]
        if fuse:
            err += [(ga - s * g @ b).abs().max().item(), (db - s * g.t() @ xa).abs().max().item()]
        print(f"fuse {fuse}: max abs errors {err}")
        assert max(err) < 1e-3, err


def probe_shape(m: int, k: int, n: int, configs: list, rows: list) -> None:
    """Every variant at one (M, K, N), appended to rows."""
    from unipeft import kernels

    bench = triton.testing.do_bench
    torch.manual_seed(0)
    g = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(k, R, device="cuda", dtype=torch.bfloat16) / k**0.5
    xa = torch.randn(m, R, device="cuda", dtype=torch.bfloat16)
    ref = torch.mm(g, w).float()
    ref_ga, ref_db = (g.float() @ b.float()) * 2.0, (g.float().t() @ xa.float()) * 2.0
    flops = 2 * m * k * n

    def row(variant, ms, **extra):
        r = dict(shape=[m, k, n], variant=variant, us=round(ms * 1e3, 2), tflops=round(flops / ms / 1e9, 1), **extra)
        rows.append(r)
        print(json.dumps(r), flush=True)

    def grads():
        return kernels.lora_grads([g], [b], [xa], [0], [2.0], R)

    row("cublas", bench(lambda: torch.mm(g, w)))
    row("lora_grads", bench(grads))
    row("current: cublas + lora_grads", bench(lambda: (torch.mm(g, w), grads())))
    for cfg in configs:
        if n % cfg[1] or m % cfg[0] or k % cfg[2]:
            continue
        for fuse, name in ((0, "triton"), (1, "fused0"), (2, "fusedbal")):
            try:
                dx, ga, db = run(g, w, b, xa, 2.0, fuse, cfg)
                err = ((dx.float() - ref).norm() / ref.norm()).item()
                if fuse:
                    err = max(err, ((ga - ref_ga).norm() / ref_ga.norm()).item(),
                              ((db - ref_db).norm() / ref_db.norm()).item())
                ms = bench(lambda cfg=cfg, fuse=fuse: run(g, w, b, xa, 2.0, fuse, cfg))
                row(f"{name} {cfg}", ms, rel_err=float(f"{err:.2e}"))
            except Exception as e:  # (a config that does not fit this GPU's shared memory)
                print(json.dumps(dict(shape=[m, k, n], variant=f"{name} {cfg}", error=str(e)[:200])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="dx_fusion.json")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--quick", action="store_true", help="first two configs only")
    args = ap.parse_args()
    if args.check:
        check()
        return
    rows: list[dict] = []
    for m, k, n in SHAPES:
        probe_shape(m, k, n, CONFIGS[:2] if args.quick else CONFIGS, rows)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=rows), f, indent=1)
    print("\nshape               variant                                   µs    TFLOP/s")
    for r in rows:
        print(f"{str(r['shape']):20s}{r['variant']:40s}{r['us']:8.1f}{r['tflops']:8.0f}")


if __name__ == "__main__":
    main()
