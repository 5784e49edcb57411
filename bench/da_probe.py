"""dA = gaᵀ·x as one Triton launch instead of cuBLAS split-K and its reduction: worth building into the step?

In the compiled LoRA step each group's dA (Σr × d_in, from gaᵀ: Σr × N and x: N × d_in, N = 8192) is a cuBLAS GEMM
that splits K = N and reduces the parts in a second kernel: 128 launches and 1.24 ms per step on the 953M model,
where reading x once at ~3.5 TB/s would take ~0.8 ms. The candidate: programs over (column block of x, chunk of N
rows), each adding its (Σr × BD) partial product into a zeroed fp32 buffer with atomics; the last program to add
into a column block (fp32 arrival counters after the sums, as in kernels._grads_kernel) rounds it into the bf16
result. In the step the buffer would be a slice of the grads call's buffer, zeroed by the memset that call already
makes, so the probe times the kernel without its zeroing as well as with it.

Result on the H200 (bench/results/da_1.json): at best equal to cuBLAS (17.1–33.7 against 17.3–34.0 µs over the
four group shapes): not adopted; only the reduction's launch would go.

Usage (GPU machine): PYTHONPATH=src python3 bench/da_probe.py [--out da.json]
Prints µs per shape for cuBLAS (`torch.mm(ga_t, x)`) and for each tile configuration, with the largest relative
error against an fp32 product. `da` is also run on CPU under TRITON_INTERPRET=1 by tests/test_bench_da.py.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch


@functools.cache  # (one jitted function: a new one per call would compile per call)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def da_kernel(ga_ptr, x_ptr, acc_ptr, cnt_ptr, dst_ptr, R, N, D, sgr, sgn, sxn, sxd, KSPLIT,
                  BR: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, NK: tl.constexpr, IEEE: tl.constexpr):
        """Columns [c·BD, +BD) of dA over rows [k·NK·BK, +NK·BK) of x: acc += gaᵀ[:, rows]·x[rows, cols] (fp32
        atomics); the last of the KSPLIT programs of a column block rounds that block into dst and zeroes it again."""
        c, k = tl.program_id(0), tl.program_id(1)
        rr = tl.arange(0, BR)
        rd = c * BD + tl.arange(0, BD)
        mr, md = rr < R, rd < D
        part = tl.zeros((BR, BD), dtype=tl.float32)
        for i in range(NK):
            rn = (k * NK + i) * BK + tl.arange(0, BK)
            mn = rn < N
            ga = tl.load(ga_ptr + rr[:, None] * sgr + rn[None, :] * sgn, mask=mr[:, None] & mn[None, :], other=0.0)
            x = tl.load(x_ptr + rn[:, None] * sxn + rd[None, :] * sxd, mask=mn[:, None] & md[None, :], other=0.0)
            if IEEE:
                part += tl.dot(ga, x, input_precision="ieee")
            else:
                part += tl.dot(ga, x)
        at = rr[:, None] * D + rd[None, :]
        msk = mr[:, None] & md[None, :]
        tl.atomic_add(acc_ptr + at, part, mask=msk, sem="relaxed")
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + c, 1.0, sem="acq_rel") == KSPLIT - 1:
            v = tl.load(acc_ptr + at, mask=msk, other=0.0, cache_modifier=".cg")
            tl.store(dst_ptr + at, v.to(dst_ptr.dtype.element_ty), mask=msk)
            tl.store(acc_ptr + at, tl.zeros((BR, BD), dtype=tl.float32), mask=msk)  # the buffer is left zeroed:
            tl.store(cnt_ptr + c, 0.0)  # the next call needs no memset (the launches are stream-ordered)

    return triton, da_kernel


def da(ga_t: torch.Tensor, x: torch.Tensor, buf: torch.Tensor | None = None, *, bk: int = 64, bd: int = 128,
       rows_per_program: int = 1024, warps: int = 4, stages: int = 3) -> torch.Tensor:
    """gaᵀ·x (ga_t: R × N, x: N × D) by the candidate kernel, in x's dtype. `buf`: a zeroed fp32 tensor of at least
    R·D + ceil(D / bd) elements (made here when None); the kernel leaves it zeroed, so one buffer serves every call
    on its stream without a memset."""
    triton, kernel = _kernel()
    r, n = ga_t.shape
    d = x.shape[1]
    blocks = triton.cdiv(d, bd)
    if buf is None:
        buf = torch.zeros(r * d + blocks, device=x.device, dtype=torch.float32)
    out = torch.empty(r, d, device=x.device, dtype=x.dtype)
    nk = max(1, rows_per_program // bk)
    ksplit = triton.cdiv(n, nk * bk)
    br = max(16, triton.next_power_of_2(r))
    kernel[(blocks, ksplit)](ga_t, x, buf, buf[r * d:], out, r, n, d, *ga_t.stride(), *x.stride(), ksplit,
                             BR=br, BK=bk, BD=bd, NK=nk, IEEE=x.dtype == torch.float32, num_warps=warps,
                             num_stages=stages)
    return out


CONFIGS = [dict(bk=64, bd=128, rows_per_program=1024), dict(bk=64, bd=128, rows_per_program=512),
           dict(bk=64, bd=256, rows_per_program=1024, warps=8), dict(bk=128, bd=128, rows_per_program=2048),
           dict(bk=64, bd=64, rows_per_program=1024), dict(bk=32, bd=128, rows_per_program=1024, stages=4)]
SHAPES = [(48, 2048), (32, 2048), (16, 2048), (16, 5632)]  # (Σr, d_in): q/k/v, gate/up, o, down


def time_from_dram(fn, reps: int = 50, flush: str = "write") -> float:
    """Median GPU µs of fn, each call after an L2 flush (operands from DRAM, as in the step) and with the host ahead
    of the GPU (a GPU sleep queued first), so launch latency is not in the events. `flush`: "write" fills L2 with
    dirty lines (which fn then also writes back, as after a kernel that wrote its output), "read" with clean ones."""
    buf = torch.ones(256 * 2**20, dtype=torch.uint8, device="cuda")
    times = []
    for i in range(reps + 5):
        if flush == "write":
            buf.zero_()
        else:
            buf.sum(dtype=torch.int32)
        torch.cuda._sleep(2_000_000)  # the host runs ahead: the events time the GPU
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(e0.elapsed_time(e1) * 1e3)
    return sorted(times)[len(times) // 2]


def _shape(r: int, d: int, n: int = 8192) -> list[dict]:
    """cuBLAS and every configuration at one (Σr, d_in)."""
    ga_t = torch.randn(r, n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    ref = ga_t.float() @ x.float()

    def rel(got: torch.Tensor) -> float:
        return float((got.float() - ref).abs().max() / ref.abs().max())

    rows = [dict(shape=[r, n, d], variant="cublas", us=round(time_from_dram(lambda: torch.mm(ga_t, x)), 2),
                 rel_err=rel(torch.mm(ga_t, x)))]
    print(json.dumps(rows[-1]), flush=True)
    for cfg in CONFIGS:
        buf = torch.zeros(r * d + -(-d // cfg["bd"]), device="cuda", dtype=torch.float32)
        err = rel(da(ga_t, x, buf, **cfg))
        kernel_us = time_from_dram(lambda cfg=cfg, buf=buf: da(ga_t, x, buf, **cfg))
        zeroed_us = time_from_dram(lambda cfg=cfg, buf=buf: (buf.zero_(), da(ga_t, x, buf, **cfg)))
        rows.append(dict(shape=[r, n, d], variant=" ".join(f"{k}{v}" for k, v in cfg.items()),
                         us=round(kernel_us, 2), us_with_zeroing=round(zeroed_us, 2), rel_err=err))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def save_rows(path: str | None, rows: list, **extra) -> None:
    """The probes' result file (when `--out` is given): the GPU, torch's version, `extra`, the rows."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, **extra, rows=rows), f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [row for r, d in SHAPES for row in _shape(r, d)]
    print("\n| Σr × N × d_in | variant | µs | µs with zeroing | rel. error |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['variant']} | {row['us']} | {row.get('us_with_zeroing', '')} | "
              f"{row['rel_err']:.1e} |")
    save_rows(args.out, rows)


if __name__ == "__main__":
    main()
