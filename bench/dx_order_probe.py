"""In what order should a sibling group's backward compute dx = Σ_i g_i·W_i + ga·A_cat?

The group backward (siblings.py) runs the frozen GEMMs first — the first with beta = 0, the others accumulating
(beta = 1) — and adds the low-rank part last: a K = Σr GEMM that reads and writes the whole N × d_in dx again
(2 × 33.5 MB at N = 8192, d_in = 2048: ~20 µs of DRAM traffic). Taken first, the low-rank GEMM only writes dx,
and the first frozen GEMM reads it as its C: a compute-bound GEMM's epilogue may hide that read. A third order
rebuilds every W_i' = W_i + s_i·B_i·A_i (one merge launch) and needs no low-rank GEMM at all: fewer bytes than
the low-rank pass for q/k/v (3 × 2 × 8.4 MB), more for gate/up (2 × 2 × 23 MB).

Timed over 16 layers' distinct tensors (read from DRAM, as in a step), captured in one CUDA graph (no host
time), µs per layer, for the harness model's q/k/v (3 × 2048 → 2048) and gate/up (2 × 5632 → 2048) groups:
  frozen        Σ g_i·W_i only (what dx costs without LoRA, as the group computes it)
  frozen_beta1  the same with the first GEMM accumulating too (what reading C costs a frozen GEMM)
  current       frozen GEMMs, then + ga·A_cat
  lowrank_first ga·A_cat, then every frozen GEMM accumulating
  rebuild       W_i' built in one launch, then Σ g_i·W_i'

Usage (GPU machine): PYTHONPATH=src python3 bench/dx_order_probe.py [--out dx_order.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from merge_launch_probe import graph_time, write_rows  # (bench/ is on the path when a bench script runs)

H, FFN, R, L, N = 2048, 5632, 16, 16, 8192  # hidden, intermediate, rank, layers, tokens (the harness model)


def _layers(members: int, d_out: int, dev: str, dt: torch.dtype, s: float, n: int = N, h: int = H, r: int = R,
            layers: int = L) -> list[dict]:
    """Each layer's group: W_i (d_out × h), A_i, B_i, output gradients g_i (n × d_out), and gaᵀ = [s·(g_i·B_i)ᵀ]
    stacked (as the grads kernel makes it), so every order computes the same dx."""
    out = []
    for _ in range(layers):
        ws = [torch.randn(d_out, h, device=dev, dtype=dt) * 0.02 for _ in range(members)]
        as_ = [torch.randn(r, h, device=dev, dtype=dt) * 0.02 for _ in range(members)]
        bs = [torch.randn(d_out, r, device=dev, dtype=dt) * 0.02 for _ in range(members)]
        gs = [torch.randn(n, d_out, device=dev, dtype=dt) for _ in range(members)]
        ga_t = torch.cat([(s * (g.float() @ b.float())).t().to(dt) for g, b in zip(gs, bs)])
        out.append(dict(ws=ws, as_=as_, bs=bs, gs=gs, a_cat=torch.cat(as_), ga_t=ga_t.contiguous(),
                        dx=torch.empty(n, h, device=dev, dtype=dt)))
    return out


def expected_dx(layer: dict, s: float) -> torch.Tensor:
    """Σ_i g_i·(W_i + s·B_i·A_i) in fp64 — what every order computes."""
    return sum(g.double() @ (w.double() + s * b.double() @ a.double())
               for g, w, a, b in zip(layer["gs"], layer["ws"], layer["as_"], layer["bs"]))


def _variants(layers: list[dict], s: float) -> dict:
    from unipeft import kernels

    def frozen():
        for ly in layers:
            torch.mm(ly["gs"][0], ly["ws"][0], out=ly["dx"])
            for g, w in zip(ly["gs"][1:], ly["ws"][1:]):
                ly["dx"].addmm_(g, w)

    def frozen_beta1():
        for ly in layers:
            for g, w in zip(ly["gs"], ly["ws"]):
                ly["dx"].addmm_(g, w)

    def current():
        frozen()
        for ly in layers:
            ly["dx"].addmm_(ly["ga_t"].t(), ly["a_cat"])

    def current_interleaved():  # (the same, each layer's low-rank GEMM right after its frozen ones)
        for ly in layers:
            torch.mm(ly["gs"][0], ly["ws"][0], out=ly["dx"])
            for g, w in zip(ly["gs"][1:], ly["ws"][1:]):
                ly["dx"].addmm_(g, w)
            ly["dx"].addmm_(ly["ga_t"].t(), ly["a_cat"])

    def lowrank_first():
        for ly in layers:
            torch.mm(ly["ga_t"].t(), ly["a_cat"], out=ly["dx"])
            for g, w in zip(ly["gs"], ly["ws"]):
                ly["dx"].addmm_(g, w)

    def rebuild():
        for ly in layers:
            w_primes, _ = kernels.merged_weights(ly["ws"], ly["bs"], ly["as_"], [s] * len(ly["ws"]))
            torch.mm(ly["gs"][0], w_primes[0], out=ly["dx"])
            for g, w in zip(ly["gs"][1:], w_primes[1:]):
                ly["dx"].addmm_(g, w)

    return dict(frozen=frozen, frozen_beta1=frozen_beta1, current=current, current_interleaved=current_interleaved,
                lowrank_first=lowrank_first, rebuild=rebuild)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev, dt, s = "cuda", torch.bfloat16, 2.0
    rows = []
    for group, members, d_out in (("q/k/v", 3, H), ("gate/up", 2, FFN)):
        layers = _layers(members, d_out, dev, dt, s)
        fns = _variants(layers, s)
        errors = {}
        for name, fn in fns.items():  # each full order against the fp64 formula (first layer), relative to its max
            if name.startswith("frozen"):
                continue  # (the frozen part only)
            fn()
            want = expected_dx(layers[0], s)
            errors[name] = float((layers[0]["dx"].double() - want).abs().max() / want.abs().max())
        for sweep in range(2):  # every variant twice, in turn: drift slower than a sweep shows as a difference
            for name, fn in fns.items():
                us = graph_time(fn, args.reps) / L
                rows.append(dict(group=group, variant=name, sweep=sweep, us_per_layer=round(us, 2),
                                 ms_per_step=round(us * L / 1e3, 3)))
                print(json.dumps(rows[-1]), flush=True)
        rows.append(dict(group=group, variant="max error vs fp64, relative to max |dx|", errors=errors))
        del layers, fns
        torch.cuda.empty_cache()
    print("| group | variant | sweep | µs/layer | ms/16 layers |\n|---|---|---|---|---|")
    for r in rows:
        if "us_per_layer" in r:
            print(f"| {r['group']} | {r['variant']} | {r['sweep']} | {r['us_per_layer']} | {r['ms_per_step']} |")
        else:
            print(f"| {r['group']} | {r['variant']} | | {r['errors']} | |")
    if args.out:
        write_rows(args.out, rows)


if __name__ == "__main__":
    main()
