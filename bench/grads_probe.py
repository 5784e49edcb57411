"""The grads kernel's bandwidth: does computing dB without transposing the g tile read g faster?

kernels._grads_kernel reads each g tile once for two products: ga += g·B (g as the left operand, as loaded) and the
dB part gᵀ·xa, which takes the (BN × BD) tile transposed. In the compiled step it reads g at 50–60% of DRAM
bandwidth (45 µs for q/k/v's 96 MB on the H200), and without its stores it still took 10.9 µs where reading g
once takes ~8.4 (skinny_3_diagnostics.json), so the loop itself is the bound. The variant here computes the same
part as dBᵀ = xaᵀ·g — the small xa tile is loaded transposed once per program, g stays as loaded — and adds it
into dB's unchanged row-major layout with transposed addresses. Everything else (grid, atomics, last-arriver
rounding) is the product kernel's: the variant is made from its source by two replacements.

Usage (GPU machine): PYTHONPATH=src python3 bench/grads_probe.py [--sweep] [--out grads.json]
Prints µs per group shape (L2 flushed, host ahead of the GPU) for the product kernel and the variant, the time of
one plain read of the group's g (a sum: the bandwidth floor) and the largest difference between their results.
--sweep: both kernels again under every tile configuration in CONFIGS (rows per program, columns per step, columns
per program, warps, pipeline stages), each checked against the product kernel's result.
tests/test_bench_grads.py checks the variant, and a swept configuration, in Triton's interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json

import torch
from da_probe import save_rows, time_from_dram  # (bench/ is on the path: scripts run from it)

from unipeft import kernels

_OLD_XA = ("    xa = tl.load(xa_ptr + rn[:, None] * sxn + rr[None, :] * sxr, mask=mn[:, None] & mr[None, :], "
           "other=0.0)\n")
_NEW_XA = ("    xat = tl.load(xa_ptr + rr[:, None] * sxr + rn[None, :] * sxn, mask=mr[:, None] & mn[None, :], "
           "other=0.0)\n")
_OLD_PART = ("            part = tl.dot(tl.trans(g), xa, input_precision=\"ieee\")\n",
             "            part = tl.dot(tl.trans(g), xa)\n")
_NEW_PART = ("            part = tl.dot(xat, g, input_precision=\"ieee\")\n", "            part = tl.dot(xat, g)\n")
_OLD_ADD = ("        tl.atomic_add(out_ptr + db_off + rd[:, None] * R + rr[None, :], part * s, "
            "mask=md[:, None] & mr[None, :],\n")
_NEW_ADD = ("        tl.atomic_add(out_ptr + db_off + rd[None, :] * R + rr[:, None], part * s, "
            "mask=mr[:, None] & md[None, :],\n")


@functools.cache
def variant():
    """The product kernel's source with dB as xaᵀ·g, jitted once. Written to a module file of its own: Triton reads
    a kernel's source through `inspect`, which cannot see code made by exec."""
    import importlib.util
    import tempfile
    from pathlib import Path

    import triton

    src = inspect.getsource(kernels._grads_kernel)
    for old, new in ((_OLD_XA, _NEW_XA), *zip(_OLD_PART, _NEW_PART), (_OLD_ADD, _NEW_ADD)):
        if src.count(old) != 1:
            raise RuntimeError(f"the grads kernel changed; the probe's replacement no longer applies: {old.strip()}")
        src = src.replace(old, new)
    path = Path(tempfile.mkdtemp()) / "grads_variant.py"
    path.write_text("import triton.language as tl\n\n\n" + src)
    spec = importlib.util.spec_from_file_location("grads_variant", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return triton.jit(mod._grads_kernel)


#: (rows per program BN, columns per step BD, columns per program, warps, stages); the first is the product's
CONFIGS = [(128, 64, 512, 4, 3), (128, 64, 512, 8, 3), (128, 64, 256, 4, 3), (128, 64, 1024, 4, 3),
           (128, 64, 2048, 4, 3), (128, 64, 512, 4, 2), (128, 64, 512, 4, 4), (128, 32, 512, 4, 4),
           (128, 128, 512, 4, 3), (128, 128, 512, 8, 3), (128, 128, 1024, 8, 3), (64, 64, 512, 4, 3),
           (64, 128, 512, 4, 3), (64, 64, 1024, 4, 4), (256, 64, 512, 8, 3), (256, 64, 1024, 8, 3),
           (256, 32, 512, 8, 4), (256, 128, 512, 8, 2)]


@contextlib.contextmanager
def tiles(bn: int, bd: int, cols: int):
    """The product module's tile constants set for one configuration (the grid, the counters' layout and the
    constexprs are all derived from them at call time), restored afterwards."""
    old = kernels._GRAD_BN, kernels._GRAD_BD, kernels._GRAD_COLS
    kernels._GRAD_BN, kernels._GRAD_BD, kernels._GRAD_COLS = bn, bd, cols
    try:
        yield
    finally:
        kernels._GRAD_BN, kernels._GRAD_BD, kernels._GRAD_COLS = old


def run(gs, bs, xas, rows, scales, total_rank: int, use_variant: bool, config: tuple | None = None) -> torch.Tensor:
    """kernels._lora_grads with the product kernel or the variant (same grid, arguments, buffer and rounding);
    `config` (an entry of CONFIGS) launches it with those tiles, warps and stages instead of the product's."""
    if not use_variant and config is None:
        return kernels._lora_grads(gs, bs, xas, rows, scales, total_rank, kernels._launch_grads)
    k = len(kernels._GRAD_NAMES)
    fn = variant() if use_variant else kernels._kernel(kernels._grads_kernel)
    bn, bd, cols, warps, stages = config or (kernels._GRAD_BN, kernels._GRAD_BD, kernels._GRAD_COLS, None, None)

    def launch(grid, args):
        fn[grid](*args[:-k], **dict(zip(kernels._GRAD_NAMES, args[-k:])), num_warps=warps or kernels._GRAD_WARPS,
                 num_stages=stages or kernels._grad_stages(args[0].dtype, args[-4]))
    with tiles(bn, bd, cols):
        return kernels._lora_grads(gs, bs, xas, rows, scales, total_rank, launch)


GROUPS = {"qkv": [2048, 2048, 2048], "gate_up": [5632, 5632], "o": [2048], "down": [2048]}


def _group(name: str, widths: list[int], sweep: bool, n: int = 8192, r: int = 16) -> dict:
    gs = [torch.randn(n, d, device="cuda", dtype=torch.bfloat16) for d in widths]
    bs = [torch.randn(d, r, device="cuda", dtype=torch.bfloat16) * 0.05 for d in widths]
    xas = [torch.randn(n, r, device="cuda", dtype=torch.bfloat16) for _ in widths]
    offs, scales, total = [i * r for i in range(len(widths))], [2.0] * len(widths), r * len(widths)

    def call(use_variant: bool, config: tuple | None = None) -> torch.Tensor:
        return run(gs, bs, xas, offs, scales, total, use_variant, config)

    a = call(False).float()

    def rel(t: torch.Tensor) -> float:
        return float((t.float() - a).abs().max() / a.abs().max())
    row = dict(group=name, widths=widths, mb_of_g=round(sum(g.numel() for g in gs) * 2 / 2**20, 1),
               read_us=round(time_from_dram(lambda: [g.sum() for g in gs]), 2),
               product_us=round(time_from_dram(lambda: call(False)), 2),
               variant_us=round(time_from_dram(lambda: call(True)), 2), max_rel_diff=rel(call(True)))
    if sweep:
        row["sweep"] = []
        for cfg in CONFIGS:
            for use_variant in (False, True):
                def once(v: bool = use_variant, c: tuple = cfg) -> torch.Tensor:
                    return call(v, c)
                row["sweep"].append(dict(config=list(cfg), variant=use_variant, us=round(time_from_dram(once), 2),
                                         max_rel_diff=rel(once())))
                print(json.dumps(dict(group=name, **row["sweep"][-1])), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, widths in GROUPS.items():
        rows.append(_group(name, widths, args.sweep))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "sweep"}), flush=True)
    print("\n| group | MB of g | read g µs | product µs | variant µs | best swept µs (config, variant) "
          "| max rel. diff |\n|---|---|---|---|---|---|---|")
    for row in rows:
        best = min(row.get("sweep", []), key=lambda e: e["us"], default=None)
        swept = f"{best['us']} ({best['config']}, {best['variant']})" if best else "-"
        print(f"| {row['group']} | {row['mb_of_g']} | {row['read_us']} | {row['product_us']} | {row['variant_us']} | "
              f"{swept} | {row['max_rel_diff']:.1e} |")
    save_rows(args.out, rows)


if __name__ == "__main__":
    main()
