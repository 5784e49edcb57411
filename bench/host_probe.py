"""Where an eager training step's host time goes: Python functions of forward, backward and the optimizer step.

The eager LoRA step is host-bound on slower GPU hosts (docs/performance.md): the CPU issues its kernels barely
faster than the GPU runs them, or slower. The profiler's host ops say which launch came late, not which Python
function made it late. Here each phase is profiled with cProfile in the thread that runs it: forward and the
optimizer step in the main thread, backward in autograd's device thread (a profiler is switched on there by the
backward of an identity node on the loss, the first node to run, and off by a hook that fires once every trainable
tensor has its gradient, the last thing backward does).

Usage (GPU machine, harness carried as in perf_vs_peft.py):
    PYTHONPATH=src python3 bench/host_probe.py --harness .gpu_carry/bench --case floor,lora [--compile] \
        [--sync-phases] --out host.json
--compile: the model under torch.compile (the compiled backward runs in the same device thread). --sync-phases:
the host-timed steps wait for the GPU before each phase, so a phase starts with an empty launch queue and its host
time is the CPU's own cost wherever its kernels fit in the queue (no batch change needed; the synced step time is
taken as before).
Per case: host ms per phase (median of --steps steps issued back to back), the synced step time, and the top
functions of each phase by own time and by cumulative time (per step; cProfile slows Python roughly twofold, so
compare functions with each other, not with the unprofiled host times). Issued back to back, a phase's host time
also holds any wait for the GPU (an implicit synchronization, a full launch queue): it is the CPU's own cost only
where the GPU's work is shorter — a small batch that keeps the code path (e.g. B=1 T=3072 for the benchmark model:
every projection takes the merged LoRA path from 3,004 rows on). Runs on the CPU as well (tests/test_bench_host.py,
tiny shapes).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time

import torch

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


class _Switch(torch.autograd.Function):
    """Identity whose backward turns a profiler on or off in the thread that runs backward."""

    @staticmethod
    def forward(ctx, x, prof, on):  # noqa: D102
        ctx.prof, ctx.on = prof, on
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        if ctx.prof is not None:
            (ctx.prof.enable if ctx.on else ctx.prof.disable)()
        return g, None, None


def _top(prof: cProfile.Profile, key: str, n: int) -> list[dict]:
    st = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_, calls, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append(dict(fn=f"{file.rsplit('/', 2)[-1] if '/' in file else file}:{line}:{name}", calls=calls,
                         own_ms=tt * 1e3, cum_ms=ct * 1e3))
    rows.sort(key=lambda r: -r[key])
    return [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows[:n]]


def probe(model, params, x, steps: int, top: int, sync, sync_phases: bool = False) -> dict:
    """Issue `steps` steps back to back timing each phase's host time (each phase after a wait for the GPU with
    sync_phases), then profile `steps` more per phase."""
    gap = sync if sync_phases else (lambda: None)
    opt = torch.optim.AdamW(params, lr=1e-4)
    cur = {"prof": None}

    def off(_grads) -> None:
        if cur["prof"] is not None:
            cur["prof"].disable()

    def step(prof_f=None, prof_b=None, prof_o=None, wait=lambda: None) -> tuple[float, float, float]:
        wait()
        t0 = time.perf_counter()
        if prof_f:
            prof_f.enable()
        cur["prof"] = prof_b
        loss = model(input_ids=x, labels=x).loss
        if prof_f:
            prof_f.disable()
        t1 = time.perf_counter()
        wait()
        t1b = time.perf_counter()
        _Switch.apply(loss, prof_b, True).backward()
        t2 = time.perf_counter()
        wait()
        t2b = time.perf_counter()
        if prof_o:
            prof_o.enable()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if prof_o:
            prof_o.disable()
        t3 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1b) * 1e3, (t3 - t2b) * 1e3

    for _ in range(3):
        step()
    sync()
    host = [step(wait=gap) for _ in range(steps)]
    sync()
    synced = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        synced.append((time.perf_counter() - t) * 1e3)
    profs = [cProfile.Profile() for _ in range(3)]
    handle = torch.autograd.graph.register_multi_grad_hook(params, off, mode="all")  # (profiled steps only)
    for _ in range(steps):
        step(*profs)
    sync()
    handle.remove()
    med = [round(statistics.median(h[i] for h in host), 3) for i in range(3)]
    out = dict(host_fwd_ms=med[0], host_bwd_ms=med[1], host_opt_ms=med[2], host_ms=round(sum(med), 3),
               synced_ms=round(statistics.median(synced), 3), sync_phases=sync_phases)
    for name, prof in zip(("fwd", "bwd", "opt"), profs):
        out[f"{name}_own"] = _top(prof, "own_ms", top)
        out[f"{name}_cum"] = _top(prof, "cum_ms", top)
        for r in out[f"{name}_own"] + out[f"{name}_cum"]:
            r["own_ms"], r["cum_ms"] = round(r["own_ms"] / steps, 3), round(r["cum_ms"] / steps, 3)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--case", default="floor,lora")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--compile", action="store_true", help="the model under torch.compile")
    ap.add_argument("--sync-phases", action="store_true", help="wait for the GPU before each host-timed phase")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, args.harness)
    import peft_baseline as h

    import unipeft
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for case in args.case.split(","):
        model = h.make_model() if cuda else h.make_model(dtype=torch.float32, device="cpu")
        if case == "floor":
            params = h.frozen_floor(model)
        elif case == "lora":
            model = unipeft.attach(model, "lora", r=16, alpha=32, targets=SITES)
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            raise SystemExit(f"host_probe: unknown case {case!r} (floor, lora)")
        x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda" if cuda else "cpu")
        run = torch.compile(model) if args.compile else model
        row = dict(case=case, compiled=args.compile,
                   **probe(run, params, x, args.steps, args.top, sync, args.sync_phases))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k.endswith("_ms")} | {"case": case}), flush=True)
        del model, params, run
        if cuda:
            h.release()
    for row in rows:
        for phase in ("fwd", "bwd", "opt"):
            print(f"\n## {row['case']} {phase}: host {row[f'host_{phase}_ms']} ms/step, top by own time")
            for r in row[f"{phase}_own"][:15]:
                print(f"  {r['own_ms']:8.3f} own {r['cum_ms']:8.3f} cum {r['calls']:6d}  {r['fn']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, device=torch.cuda.get_device_name() if cuda else "cpu",
                           torch=torch.__version__), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
