"""Would a grads kernel that loops over rows read g faster than the product's one-tile-per-program kernel?

The product's grads kernel (kernels._grads_kernel) gives each program BN = 128 rows × 512 columns of g: it loads
each g tile once, keeps the rows' gaᵀ partial in registers over its columns, and adds every 64-column chunk's dB
partial to memory with atomics at once — 2.1 M fp32 atomics for dB at N 8192, d 2048, r 16, against 0.5 M for gaᵀ,
and no loop over rows for the compiler to pipeline. It takes 2.2 ms a step of the 953M model, ~16 µs for one
2048-wide g (33.5 MB) where a plain copy of a layer's weights streams 4.09 TB/s (`merge_launch_1.json`): ~8 µs.

The variant here turns the loop the other way: a program owns BD columns (their B block loaded once) and walks
ROWS rows in tiles of BN — the row loop is what Triton software-pipelines (num_stages) — adding each tile's gaᵀ
partial with atomics and keeping the dB block (BD × r, fp32) in registers until the end: dB atomics fall by
ROWS / BN. Timed like `skinny_probe.py` (CUDA graph, g cycled over copies larger than L2, so read from DRAM) against
the product's `lora_grads` at the harness shapes, and checked against the fp64 formulas.

Usage (GPU machine): PYTHONPATH=src python3 bench/grads_loop_probe.py [--out grads_loop.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

tl = None  # triton.language, bound when the kernel is built (as kernels.py does)
N = 8192


def _loop_kernel(g_ptr, b_ptr, xa_ptr, out_ptr, N, D, R, s, ga_off, db_off, sgn, sgd, sbd, sbr, sxn, sxr,
                 ROWS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr):
    """Columns [pid1·BD, +BD) × rows [pid0·ROWS, +ROWS) of g (N × D): gaᵀ += s·(g·B)ᵀ per BN-row tile (atomics,
    element (n, j) at ga_off + j·N + n), dB (D × R at db_off) += s·gᵀ·xa kept in registers over the rows, added
    once at the end."""
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    rr = tl.arange(0, BR)
    md, mr = rd < D, rr < R
    b = tl.load(b_ptr + rd[:, None] * sbd + rr[None, :] * sbr, mask=md[:, None] & mr[None, :], other=0.0)
    dbacc = tl.zeros((BD, BR), dtype=tl.float32)
    row0 = tl.program_id(0) * ROWS
    for t in range(0, ROWS, BN):
        rn = row0 + t + tl.arange(0, BN)
        mn = rn < N
        g = tl.load(g_ptr + rn[:, None] * sgn + rd[None, :] * sgd, mask=mn[:, None] & md[None, :], other=0.0)
        xa = tl.load(xa_ptr + rn[:, None] * sxn + rr[None, :] * sxr, mask=mn[:, None] & mr[None, :], other=0.0)
        if IEEE:
            ga = tl.dot(g, b, input_precision="ieee")
            dbacc += tl.dot(tl.trans(g), xa, input_precision="ieee")
        else:
            ga = tl.dot(g, b)
            dbacc += tl.dot(tl.trans(g), xa)
        tl.atomic_add(out_ptr + ga_off + rr[None, :] * N + rn[:, None], ga * s, mask=mn[:, None] & mr[None, :],
                      sem="relaxed")
    tl.atomic_add(out_ptr + db_off + rd[:, None] * R + rr[None, :], dbacc * s, mask=md[:, None] & mr[None, :],
                  sem="relaxed")


_BUILT: dict = {}


def _kernel():
    import triton
    import triton.language

    key = os.environ.get("TRITON_INTERPRET")
    if key not in _BUILT:
        globals()["tl"] = triton.language
        _BUILT[key] = triton.jit(_loop_kernel)
    return _BUILT[key]


def loop_grads(g: torch.Tensor, b: torch.Tensor, xa: torch.Tensor, s: float, rows: int, bn: int, bd: int,
               warps: int = 4, stages: int = 3, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gaᵀ, dB) in fp32 = (s·(g·B)ᵀ, s·gᵀ·xa) by the looping kernel; `out` (fp32, r·N + d·r) is zeroed here."""
    n, d = g.shape
    r = b.shape[1]
    if out is None:
        out = torch.zeros(r * n + d * r, device=g.device, dtype=torch.float32)
    else:
        out.zero_()
    grid = ((n + rows - 1) // rows, (d + bd - 1) // bd)
    _kernel()[grid](g, b, xa, out, n, d, r, float(s), 0, r * n, *g.stride(), *b.stride(), *xa.stride(),
                    ROWS=rows, BN=bn, BD=bd, BR=max(16, 1 << (r - 1).bit_length()), IEEE=g.dtype == torch.float32,
                    num_warps=warps, num_stages=stages)
    return out[:r * n].view(r, n), out[r * n:].view(d, r)


CONFIGS = ((256, 64, 512, 4, 3), (256, 64, 1024, 8, 3), (512, 32, 256, 8, 3), (512, 32, 512, 8, 3),
           (128, 64, 1024, 4, 4), (256, 64, 256, 4, 3), (256, 32, 512, 4, 4), (128, 128, 512, 8, 3))
#: (BD, BN, ROWS, warps, stages)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from skinny_probe import _copies, _time

    from unipeft import kernels

    rows = []
    r, s = 16, 2.0
    for d in (2048, 5632):
        gs = _copies((N, d))
        b = torch.randn(d, r, device="cuda", dtype=torch.bfloat16) * 0.05
        xa = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
        ga64 = s * (gs[0].double() @ b.double()).t()
        db64 = s * gs[0].double().t() @ xa.double()
        scale = float(ga64.abs().max()), float(db64.abs().max())
        us = _time([functools.partial(kernels.lora_grads, [g], [b], [xa], [0], [s], r) for g in gs])
        ga_p, db_p = kernels.lora_grads([gs[0]], [b], [xa], [0], [s], r)
        db_p = db_p.view(d, r)
        err = max(float((ga_p.double() - ga64).abs().max()) / scale[0], float((db_p.double() - db64).abs().max())
                  / scale[1])
        rows.append(dict(d=d, variant="product lora_grads (zeroing, kernel, rounding)", us=round(us, 2),
                         rel_err=err))
        print(json.dumps(rows[-1]), flush=True)
        out = torch.zeros(r * N + d * r, device="cuda", dtype=torch.float32)
        for bd, bn, rws, warps, stages in CONFIGS:
            try:
                us = _time([functools.partial(loop_grads, g, b, xa, s, rws, bn, bd, warps, stages, out) for g in gs])
                ga, db = loop_grads(gs[0], b, xa, s, rws, bn, bd, warps, stages)
                err = max(float((ga.double() - ga64).abs().max()) / scale[0],
                          float((db.double() - db64).abs().max()) / scale[1])
            except Exception as e:  # a configuration that does not build (shared memory): reported, not fatal
                us, err = None, f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(dict(d=d, variant=f"loop bd{bd} bn{bn} rows{rws} w{warps} s{stages} (zeroing, kernel)",
                             us=None if us is None else round(us, 2), rel_err=err))
            print(json.dumps(rows[-1]), flush=True)
        zero_us = _time([out.zero_])
        rows.append(dict(d=d, variant="zeroing the fp32 buffer alone", us=round(zero_us, 2), rel_err=0.0))
        print(json.dumps(rows[-1]), flush=True)
        del gs
        torch.cuda.empty_cache()
    print("| d | variant | µs | max rel. error |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['d']} | {row['variant']} | {row['us']} | {row['rel_err']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), N=N, r=r), rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
