"""The grads kernel's bandwidth: do variants of it read g faster?

kernels._grads_kernel reads each g tile once for two products: ga += g·B (g as the left operand, as loaded) and the
dB part gᵀ·xa, which takes the (BN × BD) tile transposed. In the compiled step it reads g at 50–60% of DRAM
bandwidth (45 µs for q/k/v's 96 MB on the H200). Two variants, each made from the product kernel's source by a few
replacements (VARIANTS), everything else — grid, atomics, last-arriver rounding — the product's:

- `notrans`: the dB part as dBᵀ = xaᵀ·g (the small xa tile loaded transposed once per program, g as loaded), added
  into dB's row-major layout with transposed addresses. Equal to the product kernel (`grads_1.json`).
- `tma`: the g tiles loaded by the Hopper tensor-memory accelerator (a device-side descriptor per program). Slower
  at every shape (`grads_2.json`: 55.2 against 48.3 µs for q/k/v).

Each is timed with L2 flushed by a write (as the other probes do: the kernel then also writes the flush's dirty lines
back) and by a read (no dirty lines), beside two bandwidth floors: a torch `sum` of g, and a TMA kernel that only
reads g in the product kernel's tiles.

Usage (GPU machine): PYTHONPATH=src python3 bench/grads_probe.py [--sweep] [--kinds notrans,tma] [--out grads.json]
--sweep: every kernel again under its tile configurations (CONFIGS for the product and `notrans`, TMA_CONFIGS for
`tma`: rows per program, columns per step, columns per program, warps, pipeline stages), each checked against the
product kernel's result. tests/test_bench_grads.py checks both variants, and a swept configuration, in Triton's
interpreter.
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


_OLD_G = ("        g = tl.load(g_ptr + rn[:, None] * sgn + rd[None, :] * sgd, mask=mn[:, None] & md[None, :], "
          "other=0.0)\n")
_NEW_G = "        g = gdesc.load([tl.program_id(0) * BN, d_start + i * BD])\n"
_OLD_START = "    rn = tl.program_id(0) * BN + tl.arange(0, BN)\n"
_NEW_START = ("    gdesc = tl.make_tensor_descriptor(g_ptr, shape=[N, D], strides=[sgn, 1], block_shape=[BN, BD])\n"
              + _OLD_START)
#: the variants, each as the product source's replacements: "notrans" computes dB as xaᵀ·g (the g tile is never
#: transposed); "tma" loads the g tiles with the Hopper tensor-memory accelerator (a descriptor made per program
#: from the member's pointer; rows past N and columns past D come back as zeros), everything else unchanged
VARIANTS = {"notrans": ((_OLD_XA, _NEW_XA), *zip(_OLD_PART, _NEW_PART), (_OLD_ADD, _NEW_ADD)),
            "tma": ((_OLD_START, _NEW_START), (_OLD_G, _NEW_G))}


@functools.cache
def variant(kind: str = "notrans"):
    """The product kernel's source with one of VARIANTS' replacements, jitted once. Written to a module file of its
    own: Triton reads a kernel's source through `inspect`, which cannot see code made by exec."""
    import importlib.util
    import tempfile
    from pathlib import Path

    import triton

    src = inspect.getsource(kernels._grads_kernel)
    for old, new in VARIANTS[kind]:
        if src.count(old) != 1:
            raise RuntimeError(f"the grads kernel changed; the probe's replacement no longer applies: {old.strip()}")
        src = src.replace(old, new)
    path = Path(tempfile.mkdtemp()) / f"grads_{kind}.py"
    path.write_text("import triton.language as tl\n\n\n" + src)
    spec = importlib.util.spec_from_file_location(f"grads_{kind}", path)
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


def run(gs, bs, xas, rows, scales, total_rank: int, kind: str | None = None,
        config: tuple | None = None) -> torch.Tensor:
    """kernels._lora_grads with the product kernel (kind None) or a variant of VARIANTS (same grid, arguments, buffer
    and rounding); `config` (an entry of CONFIGS) launches it with those tiles, warps and stages instead."""
    if kind is None and config is None:
        return kernels._lora_grads(gs, bs, xas, rows, scales, total_rank, kernels._launch_grads)
    k = len(kernels._GRAD_NAMES)
    fn = variant(kind) if kind else kernels._kernel(kernels._grads_kernel)
    bn, bd, cols, warps, stages = config or (kernels._GRAD_BN, kernels._GRAD_BD, kernels._GRAD_COLS, None, None)

    def launch(grid, args):
        fn[grid](*args[:-k], **dict(zip(kernels._GRAD_NAMES, args[-k:])), num_warps=warps or kernels._GRAD_WARPS,
                 num_stages=stages or kernels._grad_stages(args[0].dtype, args[-4]))
    with tiles(bn, bd, cols):
        return kernels._lora_grads(gs, bs, xas, rows, scales, total_rank, launch)


@functools.cache
def _read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(g_ptr, out_ptr, N, D, sgn, BN: tl.constexpr, BD: tl.constexpr, ND: tl.constexpr):
        """Reads rows [pid0·BN, +BN) × columns [pid1·ND·BD, +ND·BD) of g by TMA and stores one sum per program:
        the bandwidth a kernel streaming g in the grads kernel's tiles can reach."""
        gdesc = tl.make_tensor_descriptor(g_ptr, shape=[N, D], strides=[sgn, 1], block_shape=[BN, BD])
        acc = tl.zeros((BN, BD), dtype=tl.float32)
        for i in range(ND):
            acc += gdesc.load([tl.program_id(0) * BN, (tl.program_id(1) * ND + i) * BD]).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(acc))

    return triton, read_kernel


def read_floor(gs: list[torch.Tensor], bn: int = 128, bd: int = 64, cols: int = 512) -> list[torch.Tensor]:
    """Each g read once by `_read_kernel` (one launch per member)."""
    triton, kernel = _read_kernel()
    outs = []
    for g in gs:
        n, d = g.shape
        nd = max(1, min(cols, d) // bd)
        grid = (triton.cdiv(n, bn), triton.cdiv(d, nd * bd))
        out = torch.empty(grid[0] * grid[1], device=g.device, dtype=torch.float32)
        kernel[grid](g, out, n, d, g.stride(0), BN=bn, BD=bd, ND=nd, num_warps=4, num_stages=4)
        outs.append(out)
    return outs


GROUPS = {"qkv": [2048, 2048, 2048], "gate_up": [5632, 5632], "o": [2048], "down": [2048]}
#: (BN, BD, columns per program, warps, stages) for the TMA variant
TMA_CONFIGS = [(128, 64, 512, 4, 3), (128, 64, 512, 4, 4), (128, 64, 512, 4, 5), (128, 64, 256, 4, 4),
               (128, 64, 1024, 4, 4), (64, 64, 512, 4, 4), (64, 128, 512, 4, 4), (128, 128, 512, 8, 3),
               (64, 64, 256, 4, 4)]


def _group(name: str, widths: list[int], sweep: bool, kinds: list[str], n: int = 8192, r: int = 16) -> dict:
    gs = [torch.randn(n, d, device="cuda", dtype=torch.bfloat16) for d in widths]
    bs = [torch.randn(d, r, device="cuda", dtype=torch.bfloat16) * 0.05 for d in widths]
    xas = [torch.randn(n, r, device="cuda", dtype=torch.bfloat16) for _ in widths]
    offs, scales, total = [i * r for i in range(len(widths))], [2.0] * len(widths), r * len(widths)

    def call(kind: str | None, config: tuple | None = None) -> torch.Tensor:
        return run(gs, bs, xas, offs, scales, total, kind, config)

    a = call(None).float()

    def rel(t: torch.Tensor) -> float:
        return float((t.float() - a).abs().max() / a.abs().max())
    row = dict(group=name, widths=widths, mb_of_g=round(sum(g.numel() for g in gs) * 2 / 2**20, 1),
               read_us=round(time_from_dram(lambda: [g.sum() for g in gs]), 2),
               tma_read_us=round(time_from_dram(lambda: read_floor(gs)), 2),
               tma_read_clean_us=round(time_from_dram(flush="read", fn=lambda: read_floor(gs)), 2),
               product_us=round(time_from_dram(lambda: call(None)), 2),
               product_clean_us=round(time_from_dram(flush="read", fn=lambda: call(None)), 2))
    for kind in kinds:
        row[f"{kind}_us"] = round(time_from_dram(lambda k=kind: call(k)), 2)
        row[f"{kind}_clean_us"] = round(time_from_dram(flush="read", fn=lambda k=kind: call(k)), 2)
        row[f"{kind}_max_rel_diff"] = rel(call(kind))
    if sweep:
        row["sweep"] = []
        for kind in (None, *kinds):
            for cfg in TMA_CONFIGS if kind == "tma" else CONFIGS:
                def once(v: str | None = kind, c: tuple = cfg) -> torch.Tensor:
                    return call(v, c)
                row["sweep"].append(dict(config=list(cfg), variant=kind, us=round(time_from_dram(once), 2),
                                         max_rel_diff=rel(once())))
                print(json.dumps(dict(group=name, **row["sweep"][-1])), flush=True)
    return row


def main() -> None:
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--kinds", default="notrans,tma", help="comma-separated variants of VARIANTS")
    args = ap.parse_args()
    # device-side TMA descriptors take their 128 bytes from this allocator
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    torch.manual_seed(0)
    kinds = [k for k in args.kinds.split(",") if k]
    rows = []
    for name, widths in GROUPS.items():
        rows.append(_group(name, widths, args.sweep, kinds))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "sweep"}), flush=True)
    cols = ["read_us", "tma_read_us", "tma_read_clean_us", "product_us", "product_clean_us",
            *(f"{k}{c}" for k in kinds for c in ("_us", "_clean_us"))]
    print("\n| group | MB of g | " + " | ".join(cols) + " | best swept µs (config, variant) |")
    print("|---" * (len(cols) + 3) + "|")
    for row in rows:
        best = min(row.get("sweep", []), key=lambda e: e["us"], default=None)
        swept = f"{best['us']} ({best['config']}, {best['variant']})" if best else "-"
        print(f"| {row['group']} | {row['mb_of_g']} | " + " | ".join(str(row[c]) for c in cols) + f" | {swept} |")
    save_rows(args.out, rows)


if __name__ == "__main__":
    main()
