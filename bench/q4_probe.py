"""Probe: the 4-bit weight kernel's tile, warps and absmax mode (kernels_q4.TILE) against bitsandbytes, in GPU µs.

Each call is captured in a CUDA graph and replayed (triton.testing.do_bench_cudagraph), so the numbers are GPU time
without the host's launch cost — the kernel's own speed, which the eager step pays 224 times (16 layers × 7
projections × forward and backward). Shapes are the harness model's (H 2048, I 5632): q/k/v/o 2048 × 2048, gate/up
5632 × 2048, down 2048 × 5632; NF4, double-quantized, bf16, LoRA r = 16. The reference rows are bitsandbytes'
dequantize op alone and followed by addmm_ (the path the kernel replaces). Each variant is checked first: its
dequantization equal to bitsandbytes' bit for bit and W' within 1e-2 relative of addmm_'s. (Its first run,
q4_probe_1.json, also timed a code lookup by a tree of selects: within 5% of the gather, so the kernel lost it.)

Usage (on the GPU machine; carry the bitsandbytes wheel):
    PYTHONPATH=src python3 bench/q4_probe.py --out q4_probe.json
The JSON's meta.best_tile is the correct variant with the least mean W' time over the shapes, in the form
`qlora_bench.py --q4-tile` takes.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632)]
TILES = [(32, 128, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8), (32, 256, 4), (128, 256, 8)]


def _bnb(q, absmax, shape, dtype, b=None, a=None):
    w = torch.ops.bitsandbytes.dequantize_4bit.default(q, absmax, 64, "nf4", shape, dtype)
    return w if b is None else w.addmm_(b, a, alpha=0.5)


def _launch(kernel, grid, kargs, warps) -> None:
    from unipeft import kernels_q4

    k = len(kernels_q4._NAMES)
    kernel[grid](*kargs[:-k], **dict(zip(kernels_q4._NAMES, kargs[-k:])), num_warps=warps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="q4_probe.json")
    ap.add_argument("--nested-only", action="store_true",
                    help="only the double-quantized absmax decoded in the kernel vs decoded first (no tile sweep)")
    args = ap.parse_args()
    import bitsandbytes.functional as bf
    import triton
    from triton.testing import do_bench_cudagraph

    from unipeft import kernels, kernels_q4

    meta = dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name(),
                date=time.strftime("%Y-%m-%d"))
    print(json.dumps(meta), flush=True)
    rows = []
    kernel = kernels._kernel(kernels_q4._q4_kernel)
    for m, n in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(m + n)
        dtype = torch.bfloat16
        w = torch.randn(m, n, device="cuda", dtype=dtype, generator=g)
        b = torch.randn(m, 16, device="cuda", dtype=dtype, generator=g) * 0.01
        a = torch.randn(16, n, device="cuda", dtype=dtype, generator=g)
        q, st = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        ref = bf.dequantize_4bit(q, st)
        expected = ref.clone().addmm_(b, a, alpha=0.5)
        absmax = (bf.dequantize_blockwise(st.absmax, st.state2).float() + st.offset).float()
        codes = kernels_q4.table("nf4", q.device)
        base = {"bnb_dequant": functools.partial(_bnb, q, absmax, st.shape, dtype),
                "bnb_dequant_addmm": functools.partial(_bnb, q, absmax, st.shape, dtype, b, a)}
        for name, fn in base.items():
            rows.append({"shape": [m, n], "case": name, "gpu_us": round(do_bench_cudagraph(fn, rep=50) * 1e3, 2)})
            print(json.dumps(rows[-1]), flush=True)
        rows += _nested_rows(q, st, codes, b, a, (m, n), dtype, do_bench_cudagraph)
        if args.nested_only:
            continue
        out = torch.empty(m, n, device="cuda", dtype=dtype)
        for bm, bn, warps in TILES:
            for rows_mode in (True, False):
                for lora in (True, False):
                    grid, kargs = kernels_q4._grid_args(q, absmax, codes, b if lora else None, a if lora else None,
                                                        out, 0.5, 64, bm, bn, rows_mode)
                    fn = functools.partial(_launch, kernel, grid, kargs, warps)

                    fn()
                    torch.cuda.synchronize()
                    if lora:
                        ok = float((out.float() - expected.float()).norm() / expected.float().norm()) < 1e-2
                    else:
                        ok = bool(torch.equal(out, ref))
                    row = {"shape": [m, n], "case": "kernel", "bm": bm, "bn": bn, "warps": warps,
                           "rows": rows_mode, "lora": lora, "correct": ok,
                           "gpu_us": round(do_bench_cudagraph(fn, rep=50) * 1e3, 2)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.nested_only:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print("| shape | W' absmax decoded in the kernel | decoded first (bnb op + offset add) + kernel |")
        print("|---|---|---|")
        for m, n in SHAPES:
            us = {r["case"]: r["gpu_us"] for r in rows if r["shape"] == [m, n]}
            print(f"| {m}×{n} | {us['nested_in_kernel']} | {us['nested_decoded_first']} |")
        return
    configs = {}
    for r in rows:
        if r["case"] == "kernel" and r["lora"] and r["correct"]:
            configs.setdefault((r["bm"], r["bn"], r["warps"], int(r["rows"])), []).append(r["gpu_us"])
    best = min(configs, key=lambda c: sum(configs[c]))
    meta["best_tile"] = ",".join(map(str, best))  # as qlora_bench.py --q4-tile takes it
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print("| shape | bnb dequant | bnb + addmm_ | best kernel W' (tile, warps, rows) | best kernel dequant |")
    print("|---|---|---|---|---|")
    for m, n in SHAPES:
        rs = [r for r in rows if r["shape"] == [m, n]]
        ref = {r["case"]: r["gpu_us"] for r in rs if r["case"] != "kernel"}
        best = {lora: min((r for r in rs if r["case"] == "kernel" and r["lora"] == lora and r["correct"]),
                          key=lambda r: r["gpu_us"]) for lora in (True, False)}
        desc = {k: f"{r['gpu_us']} ({r['bm']}×{r['bn']}, {r['warps']}, {r['rows']})"
                for k, r in best.items()}
        print(f"| {m}×{n} | {ref['bnb_dequant']} | {ref['bnb_dequant_addmm']} | {desc[True]} | {desc[False]} |")
    print("| tile, warps, rows | mean W' µs over shapes |")
    print("|---|---|")
    for key, us in sorted(configs.items(), key=lambda kv: sum(kv[1])):
        print(f"| {key} | {sum(us) / len(us):.1f} |")


def _nested_rows(q, st, codes, b, a, shape, dtype, bench) -> list[dict]:
    """W' with the double-quantized absmax decoded inside the kernel (kernels_q4.Nested) against the path before:
    bitsandbytes' blockwise decode and the offset add, then the kernel — GPU µs, each checked equal first."""
    import bitsandbytes.functional as bf

    from unipeft import kernels_q4

    nested = kernels_q4.Nested(st.absmax, st.state2.code, st.state2.absmax, st.offset, st.state2.blocksize)

    def in_kernel():
        return kernels_q4.q4_weight(q, nested, codes, shape, 64, dtype, b, a, 0.5)

    def decoded_first():
        absmax = bf.dequantize_blockwise(st.absmax, st.state2).float() + st.offset
        return kernels_q4.q4_weight(q, absmax, codes, shape, 64, dtype, b, a, 0.5)

    equal = bool(torch.equal(in_kernel(), decoded_first()))
    rows = []
    for name, fn in (("nested_in_kernel", in_kernel), ("nested_decoded_first", decoded_first)):
        rows.append({"shape": list(shape), "case": name, "equal": equal,
                     "gpu_us": round(bench(fn, rep=50) * 1e3, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
