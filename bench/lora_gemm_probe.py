"""Can a Triton GEMM that adds the LoRA term in its epilogue replace the W′ build + cuBLAS GEMM of the forward?

The merged forward builds W′ = W + s·B·A per projection (read W, write W′: ~206 MB a layer, 1.5 ms a step on the
953M benchmark model) and cuBLAS then reads W′. A GEMM that computes y = x·Wᵀ + s·xa·Bᵀ directly — the rank-r term
as one small dot per output tile, from the xa the backward needs anyway — would drop the builds, if it runs as fast
as cuBLAS on these shapes. A plain Triton GEMM did not (bench/dx_fusion_probe.py: 2–13% slower); this one loads
tiles with the Hopper tensor-memory accelerator (host-made TensorDescriptors), optionally persistent (one program
per SM walking the tiles in grouped order).

Per forward shape of the harness model (8192 rows; q/k/v/o 2048 → 2048, gate/up 2048 → 5632, down 5632 → 2048),
L2 flushed, host ahead (da_probe.time_from_dram), µs: cuBLAS x·Wᵀ; the current path (W′ kernel + cuBLAS); and every
configuration in CONFIGS without and with the LoRA epilogue, each checked against the formula.

Usage (GPU machine): PYTHONPATH=src python3 bench/lora_gemm_probe.py [--out lora_gemm.json]
tests/test_bench_lora_gemm.py runs the kernel in Triton's interpreter on CPU against the formula.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from da_probe import save_rows, time_from_dram  # (bench/ is on the path: scripts run from it)
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _tile_gemm(a_desc, w_desc, c_desc, xa_ptr, b_ptr, s, m0, n0, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, R: tl.constexpr, LORA: tl.constexpr):
    """One (BM × BN) output tile: the rank-R term first (it starts the accumulator, in the main loop's layout),
    then x tiles and W tiles by TMA with fp32 accumulation, then a TMA store. (Added after the loop instead, the
    term cost 4–7× the GEMM at 128 × 256 tiles, lora_gemm_1_epilogue.json: the accumulator changed layout.)"""
    if LORA:  # s·xa·Bᵀ: xa rows m0.., B rows n0.. (both row-major, R columns)
        rm = m0 + tl.arange(0, BM)
        rn = n0 + tl.arange(0, BN)
        rr = tl.arange(0, R)
        xa = tl.load(xa_ptr + rm[:, None] * R + rr[None, :])
        b = tl.load(b_ptr + rn[:, None] * R + rr[None, :])
        acc = tl.dot(xa, b.T) * s
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K // BK):
        a = a_desc.load([m0, k * BK])
        w = w_desc.load([n0, k * BK])
        acc = tl.dot(a, w.T, acc)
    c_desc.store([m0, n0], acc.to(c_desc.dtype))


@triton.jit
def _gemm(a_desc, w_desc, c_desc, xa_ptr, b_ptr, s, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          GROUP_M: tl.constexpr, R: tl.constexpr, LORA: tl.constexpr, PERSISTENT: tl.constexpr,
          NUM_SMS: tl.constexpr, ITERS: tl.constexpr):
    """y = x·Wᵀ (+ s·xa·Bᵀ). x: M × K, W: N × K, y: M × N (row-major); tiles in groups of GROUP_M row blocks (so
    the W tiles of a group are reused from L2). Persistent: NUM_SMS programs walk the tiles. (The sizes are
    constexprs, specialized per shape: Triton's interpreter cannot loop to a runtime bound.)"""
    num_m = M // BM
    num_n = N // BN
    tiles = num_m * num_n
    per_group = GROUP_M * num_n
    if PERSISTENT:
        for i in range(0, ITERS):  # ITERS = ⌈tiles / NUM_SMS⌉, from the host
            t = tl.program_id(0) + i * NUM_SMS
            if t < tiles:
                pm, pn = _tile_of(t, num_m, per_group, GROUP_M)
                _tile_gemm(a_desc, w_desc, c_desc, xa_ptr, b_ptr, s, pm * BM, pn * BN, K, BM, BN, BK, R, LORA)
    else:
        pm, pn = _tile_of(tl.program_id(0), num_m, per_group, GROUP_M)
        _tile_gemm(a_desc, w_desc, c_desc, xa_ptr, b_ptr, s, pm * BM, pn * BN, K, BM, BN, BK, R, LORA)


@triton.jit
def _tile_of(t, num_m, per_group, GROUP_M: tl.constexpr):
    """(row block, column block) of tile t in grouped order: GROUP_M row blocks per group, column by column."""
    first = (t // per_group) * GROUP_M
    size = tl.minimum(num_m - first, GROUP_M)
    return first + (t % per_group) % size, (t % per_group) // size


#: (BM, BN, BK, stages, warps, GROUP_M, persistent)
CONFIGS = [(128, 256, 64, 3, 8, 8, False), (128, 256, 64, 3, 8, 8, True), (128, 256, 64, 4, 8, 16, False),
           (128, 256, 64, 3, 8, 4, False), (128, 128, 64, 4, 8, 8, True), (256, 128, 64, 3, 8, 8, False)]


def lora_gemm(x: torch.Tensor, w: torch.Tensor, xa: torch.Tensor | None, b: torch.Tensor | None, s: float,
              config: tuple, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ (+ s·xa·Bᵀ when xa is given) with one configuration of CONFIGS. Shapes must divide the tiles (the
    probe's do); xa, B: contiguous with R columns."""
    bm, bn, bk, stages, warps, group, persistent = config
    m, k = x.shape
    n = w.shape[0]
    if m % bm or n % bn or k % bk:
        raise ValueError(f"shape {m}×{k}×{n} does not divide tiles {bm}×{bn}×{bk}")
    out = torch.empty(m, n, device=x.device, dtype=x.dtype) if out is None else out
    lora = xa is not None
    r = xa.shape[1] if lora else 16
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    tiles = (m // bm) * (n // bn)
    grid = (min(sms, tiles) if persistent else tiles,)
    _gemm[grid](TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
                TensorDescriptor.from_tensor(out, [bm, bn]), xa if lora else x, b if lora else w, float(s), m, n, k,
                BM=bm, BN=bn, BK=bk, GROUP_M=group, R=r, LORA=lora, PERSISTENT=persistent, NUM_SMS=grid[0],
                ITERS=-(-tiles // grid[0]),
                num_stages=stages, num_warps=warps)
    return out


SHAPES = {"q/k/v/o": (2048, 2048), "gate/up": (2048, 5632), "down": (5632, 2048)}  # (d_in, d_out)


def _shape(name: str, d_in: int, d_out: int, m: int = 8192, r: int = 16) -> dict:
    from unipeft import kernels

    x = torch.randn(m, d_in, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) / d_in ** 0.5
    a = torch.randn(r, d_in, device="cuda", dtype=torch.bfloat16) / d_in ** 0.5
    b = torch.randn(d_out, r, device="cuda", dtype=torch.bfloat16) * 0.05
    s = 2.0
    xa = x @ a.t()
    want = (x.float() @ w.float().t() + s * xa.float() @ b.float().t())

    def rel(got: torch.Tensor) -> float:
        return float((got.float() - want).abs().max() / want.abs().max())

    def current() -> torch.Tensor:
        return torch.nn.functional.linear(x, kernels.merged_weight(w, b, a, s))
    row = dict(shape=name, m=m, d_in=d_in, d_out=d_out,
               cublas_us=round(time_from_dram(lambda: torch.nn.functional.linear(x, w)), 2),
               current_us=round(time_from_dram(current), 2), current_rel=rel(current()), configs=[])
    for cfg in CONFIGS:
        entry = dict(config=list(cfg))
        for lora in (False, True):
            def once(lo: bool = lora, c: tuple = cfg) -> torch.Tensor:
                return lora_gemm(x, w, xa if lo else None, b if lo else None, s, c)
            try:
                got = once()
                key = "lora" if lora else "plain"
                entry[f"{key}_us"] = round(time_from_dram(once), 2)
                if lora:
                    entry["lora_rel"] = rel(got)
            except Exception as e:  # a configuration that does not build (shared memory): recorded, not fatal
                entry["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                break
        row["configs"].append(entry)
        print(json.dumps(dict(shape=name, **entry)), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [_shape(name, *dims) for name, dims in SHAPES.items()]
    print("\n| shape | cuBLAS x·Wᵀ µs | W′ kernel + cuBLAS µs | best Triton plain µs | best Triton + LoRA µs (config) |"
          "\n|---|---|---|---|---|")
    for row in rows:
        ok = [c for c in row["configs"] if "lora_us" in c]
        plain = min((c["plain_us"] for c in ok), default=None)
        best = min(ok, key=lambda c: c["lora_us"], default=None)
        lora = f"{best['lora_us']} ({best['config']}, rel {best['lora_rel']:.1e})" if best else "-"
        print(f"| {row['shape']} | {row['cublas_us']} | {row['current_us']} | {plain} | {lora} |")
    save_rows(args.out, rows, triton=triton.__version__)


if __name__ == "__main__":
    main()
