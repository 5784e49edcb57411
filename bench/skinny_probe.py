"""Probe: the LoRA step's skinny products and W' builds on the GPU — cuBLAS against Triton kernels and their tile
choices — at the harness shapes (N = 8192 rows, d 2048 / 5632, r 16–48), with operands read from DRAM: each call
in the timed CUDA graph reads its own copy of the big operand (copies cycled over more than 4× the L2 cache), as
in a real step, where g, x and W were not just read. Prints tables and writes JSON.

  grads : ga = s·g·B (N × r) and dB = s·gᵀ·xa (d × r): cuBLAS's two GEMMs vs kernels.lora_grads's kernel
  rows  : xa = x·Aᵀ (N × r, forward): cuBLAS vs a Triton kernel owning whole rows (no atomics)
  cols  : dA = gaᵀ·x (r × d, backward): cuBLAS vs a Triton kernel adding column-block partials with fp32 atomics
  merge : W' = W + s·B·A: kernels.merged_weight against addmm and a plain copy of W (the same bytes), and its tiles
  mref  : the same references without the tile sweep
  parts : where the grads kernel's time goes — timing-only variants that store instead of adding atomically, or
          skip the stores (wrong results, only timed), against a clone of g (read + write)
  widths: the frozen GEMM x·Wᵀ against its output width — whether appending A's rows to W' (xa from the same
          GEMM) costs less than the separate x·Aᵀ
  layout: dA and xa with their operands in either layout
  l2    : a skinny pass right after a frozen GEMM that read the same tensor, against one that reads another copy

Usage (GPU machine): PYTHONPATH=src python3 bench/skinny_probe.py [--out skinny.json] [--only grads,parts,...]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from unipeft import kernels, launching

N = 8192
L2_BYTES = 50 * 2**20


@triton.jit
def _rows(x_ptr, m_ptr, out_ptr, N, D, R, sxn, sxd, smd, smr,
          BN: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, ND: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BN, BR), dtype=tl.float32)
    for i in range(ND):
        rd = i * BD + tl.arange(0, BD)
        x = tl.load(x_ptr + rn[:, None] * sxn + rd[None, :] * sxd, mask=(rn[:, None] < N) & (rd[None, :] < D),
                    other=0.0)
        m = tl.load(m_ptr + rd[:, None] * smd + rr[None, :] * smr, mask=(rd[:, None] < D) & (rr[None, :] < R),
                    other=0.0)
        acc += tl.dot(x, m)
    tl.store(out_ptr + rn[:, None] * R + rr[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rr[None, :] < R))


@triton.jit
def _cols(x_ptr, y_ptr, out_ptr, N, D, R, sxn, sxd, syn, syr,
          BN: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, ND: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    y = tl.load(y_ptr + rn[:, None] * syn + rr[None, :] * syr, mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
    d_start = tl.program_id(1) * (ND * BD)
    for i in range(ND):
        rd = d_start + i * BD + tl.arange(0, BD)
        x = tl.load(x_ptr + rn[:, None] * sxn + rd[None, :] * sxd, mask=(rn[:, None] < N) & (rd[None, :] < D),
                    other=0.0)
        part = tl.dot(tl.trans(x), y)
        tl.atomic_add(out_ptr + rr[None, :] * D + rd[:, None], part, mask=(rd[:, None] < D) & (rr[None, :] < R),
                      sem="relaxed")


def _time(fns, reps: int = 40) -> float:
    """Mean GPU µs per call: `reps` calls (cycling over `fns`, one per operand copy) in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def _copies(shape, dtype=torch.bfloat16) -> list[torch.Tensor]:
    size = torch.Size(shape).numel() * 2
    k = max(2, -(-4 * L2_BYTES // size))
    return [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(k)]


ROWS: list[dict] = []


def _row(kind: str, shape, variant: str, us: float, bytes_: int) -> None:
    ideal = bytes_ / 4.8e12 * 1e6
    ROWS.append(dict(kind=kind, shape=list(shape), variant=variant, us=round(us, 2), ideal_us=round(ideal, 2)))
    print(f"| {kind} | {shape} | {variant} | {us:.1f} | {ideal:.1f} |", flush=True)


def grads(d: int, r: int = 16) -> None:
    gs = _copies((N, d))
    b = torch.randn(d, r, device="cuda", dtype=torch.bfloat16) * 0.05
    xa = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
    zero = torch.zeros((), device="cuda", dtype=torch.bfloat16)
    ga_t = torch.empty(r, N, device="cuda", dtype=torch.bfloat16)
    db = torch.empty(d, r, device="cuda", dtype=torch.bfloat16)

    def cublas(g):
        torch.addmm(zero, b.t(), g.t(), beta=0, alpha=2.0, out=ga_t)
        torch.addmm(zero, g.t(), xa, beta=0, alpha=2.0, out=db)
    _row("grads", (N, d, r), "cublas", _time([lambda g=g: cublas(g) for g in gs]), gs[0].numel() * 2)
    saved = (kernels._GRAD_BN, kernels._GRAD_BD, kernels._GRAD_COLS, kernels._GRAD_WARPS, kernels._GRAD_STAGES)
    for cfg in ((128, 64, 512, 4, 3), (128, 64, 1024, 4, 3), (64, 64, 512, 4, 3), (128, 128, 512, 8, 3),
                (256, 64, 512, 8, 3), (128, 64, 256, 4, 3), (128, 32, 512, 4, 4), (64, 128, 1024, 4, 3)):
        kernels._GRAD_BN, kernels._GRAD_BD, kernels._GRAD_COLS, kernels._GRAD_WARPS, kernels._GRAD_STAGES = cfg
        launching._COMPILED.clear()
        us = _time([lambda g=g: kernels.lora_grads([g], [b], [xa], [0], [2.0], r) for g in gs])
        _row("grads", (N, d, r), "kernel bn{} bd{} cols{} w{} s{}".format(*cfg), us, gs[0].numel() * 2)
    kernels._GRAD_BN, kernels._GRAD_BD, kernels._GRAD_COLS, kernels._GRAD_WARPS, kernels._GRAD_STAGES = saved
    launching._COMPILED.clear()


def rows(d: int, r: int) -> None:
    xs = _copies((N, d))
    a = torch.randn(r, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(N, r, device="cuda", dtype=torch.bfloat16)
    _row("rows", (N, d, r), "cublas", _time([lambda x=x: torch.mm(x, a.t(), out=out) for x in xs]),
         xs[0].numel() * 2)
    br = max(16, triton.next_power_of_2(r))
    for bn, bd, warps, stages in ((64, 128, 4, 3), (64, 64, 4, 4), (32, 128, 4, 3), (64, 256, 8, 3),
                                  (128, 64, 4, 3), (32, 256, 4, 3)):
        def launch(x, bn=bn, bd=bd, warps=warps, stages=stages):
            _rows[(triton.cdiv(N, bn),)](x, a, out, N, d, r, *x.stride(), a.stride(1), a.stride(0),
                                         BN=bn, BD=bd, BR=br, ND=triton.cdiv(d, bd), num_warps=warps,
                                         num_stages=stages)
        launch(xs[0])
        err = float((out.float() - (xs[0] @ a.t()).float()).abs().max())
        _row("rows", (N, d, r), f"triton bn{bn} bd{bd} w{warps} s{stages} err{err:.1e}",
             _time([lambda x=x: launch(x) for x in xs]), xs[0].numel() * 2)


def cols(d: int, r: int) -> None:
    xs = _copies((N, d))
    ga_t = torch.randn(r, N, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(r, d, device="cuda", dtype=torch.bfloat16)
    _row("cols", (N, d, r), "cublas", _time([lambda x=x: torch.mm(ga_t, x, out=out) for x in xs]),
         xs[0].numel() * 2)
    acc = torch.zeros(r, d, device="cuda", dtype=torch.float32)
    br = max(16, triton.next_power_of_2(r))
    for bn, bd, cols_, warps, stages in ((128, 64, 512, 4, 3), (128, 64, 1024, 4, 3), (256, 64, 512, 8, 3),
                                         (128, 128, 512, 8, 3), (64, 64, 512, 4, 3)):
        nd = triton.cdiv(min(cols_, d), bd)

        def launch(x, bn=bn, bd=bd, nd=nd, warps=warps, stages=stages):
            acc.zero_()
            _cols[(triton.cdiv(N, bn), triton.cdiv(d, nd * bd))](x, ga_t, acc, N, d, r, *x.stride(), 1, N,
                                                                 BN=bn, BD=bd, BR=br, ND=nd, num_warps=warps,
                                                                 num_stages=stages)
            out.copy_(acc)
        launch(xs[0])
        err = float((out.float() - (ga_t @ xs[0]).float()).abs().max() / (ga_t @ xs[0]).float().abs().max())
        _row("cols", (N, d, r), f"triton bn{bn} bd{bd} cols{cols_} w{warps} s{stages} rel{err:.1e}",
             _time([lambda x=x: launch(x) for x in xs]), xs[0].numel() * 2)


def merge(m: int, n: int, r: int = 16, tiles: bool = True) -> None:
    """W' builds against addmm and a plain copy of W (the same bytes); with `tiles`, the kernel's tile choices too
    (section "merge"; without them section "mref")."""
    kind = "merge" if tiles else "mref"
    ws = _copies((m, n))
    b = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, n, device="cuda", dtype=torch.bfloat16)
    outs = [torch.empty_like(w) for w in ws]
    kernel = kernels._kernel()
    _row(kind, (m, n, r), "addmm", _time([lambda w=w: torch.addmm(w, b, a, alpha=2.0) for w in ws]),
         ws[0].numel() * 4)
    _row(kind, (m, n, r), "copy_ of W (the same bytes)",
         _time([lambda w=w, o=o: o.copy_(w) for w, o in zip(ws, outs)]), ws[0].numel() * 4)
    _row(kind, (m, n, r), "merged_weight",
         _time([lambda w=w, o=o: kernels.merged_weight(w, b, a, 2.0, out=o) for w, o in zip(ws, outs)]),
         ws[0].numel() * 4)
    if not tiles:
        return
    for bm, bn, warps, stages in ((64, 128, 4, 1), (32, 128, 4, 1), (64, 256, 8, 1), (128, 128, 8, 1),
                                  (128, 256, 8, 1), (32, 256, 4, 1), (64, 64, 4, 1)):
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), 1)

        def launch(w, o, bm=bm, bn=bn, warps=warps, stages=stages, grid=grid):
            args = kernels._grid_args([w], [b], [a], [2.0], o)[1][:-5]  # (the tile sizes replaced below)
            kernel[grid](*args, BM=bm, BN=bn, BR=16, NR=1, IEEE=False, num_warps=warps, num_stages=stages)
        _row("merge", (m, n, r), f"bm{bm} bn{bn} w{warps} s{stages}",
             _time([lambda w=w, o=o: launch(w, o) for w, o in zip(ws, outs)]), ws[0].numel() * 4)


@triton.jit
def _grads_parts(g_ptr, b_ptr, xa_ptr, out_ptr, N, D, R, sgn, sgd, sbd, sbr, sxn, sxr, db_off,
                 BN: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, ND: tl.constexpr, STORE: tl.constexpr):
    """kernels._grads_kernel's loop with its outputs replaced: STORE 0 atomics (as the real kernel), 1 plain stores,
    2 none (one token store per program, so the loads and dots are not optimized away)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    mn, mr = rn < N, rr < R
    xa = tl.load(xa_ptr + rn[:, None] * sxn + rr[None, :] * sxr, mask=mn[:, None] & mr[None, :], other=0.0)
    acc = tl.zeros((BN, BR), dtype=tl.float32)
    dacc = tl.zeros((BD, BR), dtype=tl.float32)
    d_start = tl.program_id(1) * (ND * BD)
    for i in range(ND):
        rd = d_start + i * BD + tl.arange(0, BD)
        md = rd < D
        g = tl.load(g_ptr + rn[:, None] * sgn + rd[None, :] * sgd, mask=mn[:, None] & md[None, :], other=0.0)
        b = tl.load(b_ptr + rd[:, None] * sbd + rr[None, :] * sbr, mask=md[:, None] & mr[None, :], other=0.0)
        acc += tl.dot(g, b)
        part = tl.dot(tl.trans(g), xa)
        if STORE == 0:
            tl.atomic_add(out_ptr + db_off + rd[:, None] * R + rr[None, :], part, mask=md[:, None] & mr[None, :],
                          sem="relaxed")
        elif STORE == 1:
            tl.store(out_ptr + db_off + rd[:, None] * R + rr[None, :], part, mask=md[:, None] & mr[None, :])
        else:
            dacc += part
    if STORE == 0:
        tl.atomic_add(out_ptr + rr[None, :] * N + rn[:, None], acc, mask=mn[:, None] & mr[None, :], sem="relaxed")
    elif STORE == 1:
        tl.store(out_ptr + rr[None, :] * N + rn[:, None], acc, mask=mn[:, None] & mr[None, :])
    else:
        one = (tl.arange(0, BN)[:, None] < 1) & (rr[None, :] < 1)
        tl.store(out_ptr + tl.program_id(0) * 0 + rr[None, :] * 0 + tl.arange(0, BN)[:, None] * 0,
                 tl.sum(acc, 0)[None, :] + tl.sum(dacc, 0)[None, :], mask=one)


def parts(d: int, r: int = 16) -> None:
    gs = _copies((N, d))
    b = torch.randn(d, r, device="cuda", dtype=torch.bfloat16) * 0.05
    xa = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(N * r + d * r, device="cuda", dtype=torch.float32)
    _row("parts", (N, d, r), "clone of g (read + write)", _time([lambda g=g: g.clone() for g in gs]),
         gs[0].numel() * 4)
    _row("parts", (N, d, r), "lora_grads (zeroing and rounding included)",
         _time([lambda g=g: kernels.lora_grads([g], [b], [xa], [0], [2.0], r) for g in gs]), gs[0].numel() * 2)
    for bn, warps in ((128, 4), (256, 8)):
        nd = triton.cdiv(min(512, d), 64)
        grid = (triton.cdiv(N, bn), triton.cdiv(d, nd * 64))
        for store, what in ((0, "atomics"), (1, "plain stores (timing only)"), (2, "no stores (timing only)")):
            def launch(g, store=store, bn=bn, warps=warps, nd=nd, grid=grid):
                _grads_parts[grid](g, b, xa, out, N, d, r, *g.stride(), *b.stride(), *xa.stride(), N * r,
                                   BN=bn, BD=64, BR=16, ND=nd, STORE=store, num_warps=warps, num_stages=3)
            _row("parts", (N, d, r), f"bn{bn} w{warps} kernel only, {what}",
                 _time([lambda g=g: launch(g) for g in gs]), gs[0].numel() * 2)


def widths() -> None:
    for d_in, outs in ((2048, (2048, 2096, 4096, 4144, 6144, 6192, 5632, 5664, 11264, 11296)), (5632, (2048, 2064))):
        xs = _copies((N, d_in))
        for d_out in outs:
            w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16)
            _row("widths", (N, d_in, d_out), "x·Wᵀ", _time([lambda x=x, w=w: F.linear(x, w) for x in xs], reps=20),
                 (N * d_in + N * d_out + d_out * d_in) * 2)
        for r in (16, 48):
            a = torch.randn(r, d_in, device="cuda", dtype=torch.bfloat16)
            _row("widths", (N, d_in, r), "x·Aᵀ alone", _time([lambda x=x, a=a: F.linear(x, a) for x in xs]),
                 N * d_in * 2)
        y = torch.randn(N, d_in + 48, device="cuda", dtype=torch.bfloat16)
        tail = _time([lambda y=y, d_in=d_in: y[:, d_in:].contiguous()])
        _row("widths", (N, 48), "copy of xa out of a wider output", tail, N * 48 * 4)


def layout(d: int, r: int) -> None:
    xs = _copies((N, d))
    ga_t = torch.randn(r, N, device="cuda", dtype=torch.bfloat16)
    ga = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, d, device="cuda", dtype=torch.bfloat16)
    for name, f in (("dA = gaᵀ·x, gaᵀ stored (as used)", lambda x: torch.mm(ga_t, x)),
                    ("dA = gaᵀ·x, ga stored", lambda x: torch.mm(ga.t(), x)),
                    ("dAᵀ = xᵀ·ga", lambda x: torch.mm(x.t(), ga)),
                    ("xa = x·Aᵀ (as used)", lambda x: F.linear(x, a)),
                    ("xaᵀ = A·xᵀ", lambda x: torch.mm(a, x.t()))):
        _row("layout", (N, d, r), name, _time([lambda x=x, f=f: f(x) for x in xs]), N * d * 2)


def l2(d_out: int, d_in: int) -> None:
    gs, xs = _copies((N, d_out)), _copies((N, d_in))
    w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(d_out, 16, device="cuda", dtype=torch.bfloat16) * 0.05
    a = torch.randn(48, d_in, device="cuda", dtype=torch.bfloat16)
    xa = torch.randn(N, 16, device="cuda", dtype=torch.bfloat16)
    kg, kx = len(gs), len(xs)

    def grads(g):
        return kernels.lora_grads([g], [b], [xa], [0], [2.0], 16)
    shape = (N, d_in, d_out)
    _row("l2", shape, "g·W", _time([lambda g=g: torch.mm(g, w) for g in gs]), 0)
    _row("l2", shape, "g·W, then grads on the same g", _time([lambda g=g: (torch.mm(g, w), grads(g)) for g in gs]), 0)
    _row("l2", shape, "g·W, then grads on another g",
         _time([lambda i=i: (torch.mm(gs[i], w), grads(gs[(i + 1) % kg])) for i in range(kg)]), 0)
    _row("l2", shape, "x·Wᵀ", _time([lambda x=x: F.linear(x, w) for x in xs]), 0)
    _row("l2", shape, "x·Wᵀ, then x·Aᵀ on the same x",
         _time([lambda x=x: (F.linear(x, w), F.linear(x, a)) for x in xs]), 0)
    _row("l2", shape, "x·Wᵀ, then x·Aᵀ on another x",
         _time([lambda i=i: (F.linear(xs[i], w), F.linear(xs[(i + 1) % kx], a)) for i in range(kx)]), 0)


SECTIONS = ("grads", "rows", "cols", "merge", "parts", "mref", "widths", "layout", "l2")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="skinny.json")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    args = ap.parse_args()
    want = set(args.only.split(","))
    print("| kind | shape | variant | µs | ideal µs (4.8 TB/s) |")
    print("|---|---|---|---|---|")
    for d in (2048, 5632):
        if "grads" in want:
            grads(d)
        if "parts" in want:
            parts(d)
    for d, r in ((2048, 48), (2048, 32), (2048, 16), (5632, 16)):
        if "rows" in want:
            rows(d, r)
        if "cols" in want:
            cols(d, r)
        if "layout" in want:
            layout(d, r)
    for m, n in ((2048, 2048), (5632, 2048), (2048, 5632)):
        if "merge" in want:
            merge(m, n)
        if "mref" in want and "merge" not in want:
            merge(m, n, tiles=False)
        if "l2" in want:
            l2(m, n)
    if "widths" in want:
        widths()
    with open(args.out, "w") as f:
        json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
