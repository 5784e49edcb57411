"""Where a synced training step's GPU idle time comes from: the host, late with its launches, or the GPU itself.

The harness times each step between two synchronizations, so its time is the GPU's busy time plus every stretch in
which the GPU waits: for the host to issue the step's first kernel (guards, Python before the first launch), for a
launch the host has not made yet (host-bound stretches), or between kernels it already has (the ~µs a launch takes
on the device). The profiler's busy time (profile_step.py) sees none of those; two versions with equal busy time
can differ by milliseconds in the harness. This probe takes the steps apart:

- `synced_ms`: median step, synchronized before and after each (the harness's measure);
- `pipelined_ms`: steps issued back to back, one synchronization at the end (host latency hidden where it can be);
- from a profiled synced step (CUDA + host activity, chrome trace): `busy_ms` (union of kernel and memset time),
  `lead_ms` (step start → first kernel), `host_late_ms` (gaps in which the next kernel's launch call had not yet
  begun when the previous kernel ended: the host was behind), `device_gap_ms` (the other gaps), `tail_ms` (last
  kernel's end → step end), each also per phase (forward, backward, optimizer: where the late launch was made),
  and the largest host-late gaps with the host operator that launched the next kernel; the host operators before the
  first launch (`lead_ops`) and every kernel's time and count (`kernels`). `--traces DIR` keeps each case's trace.

Usage (GPU machine, harness carried as in perf_vs_peft.py):
    PYTHONPATH=src python3 bench/idle_probe.py --harness .gpu_carry/bench --case floor,lora [--compile] --out idle.json
A case may carry environment settings: `lora_recompute:UNIPEFT_RECOMPUTE=1`; a case named `qlora…` puts LoRA on an
NF4 base (double quant, bf16 compute; carry the bitsandbytes wheel). The trace analysis (`analyse`) is
plain Python over chrome-trace events, tested on CPU with a synthetic trace.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

SITES = ["q", "k", "v", "o", "gate", "up", "down"]
PHASES = ("fwd", "bwd", "opt")
_DEVICE_CATS = ("kernel", "gpu_memset", "gpu_memcpy")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def analyse(events: list[dict], top: int = 12) -> dict:
    """Idle accounting of one profiled step from chrome-trace events (`ts`/`dur` in µs).

    The step is the `step` user annotation; its phases the `fwd`/`bwd`/`opt` annotations. Device events (kernels,
    memsets, copies) and the host calls that launched them are joined by `args.correlation`. A gap before a device
    event counts as host-late for the part that ends when its launch call began (the device cannot run what it has
    not been given), the rest as a device gap."""
    step = next(e for e in events if e.get("cat") == "user_annotation" and e.get("name") == "step")
    t0, t1 = step["ts"], step["ts"] + step["dur"]
    phases = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") in PHASES]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in _LAUNCH_CATS and "correlation" in e.get("args", {})}
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    dev = sorted((e for e in events if e.get("cat") in _DEVICE_CATS and t0 <= e["ts"] <= t1), key=lambda e: e["ts"])
    if not dev:
        raise ValueError("no kernels inside the step annotation")

    def phase_of(ts: float) -> str:
        for p in phases:
            if p["ts"] <= ts <= p["ts"] + p["dur"]:
                return p["name"]
        return "other"

    def op_at(ts: float) -> str:
        inside = [o for o in ops if o["ts"] <= ts <= o["ts"] + o["dur"]]
        return min(inside, key=lambda o: o["dur"])["name"][:80] if inside else "?"

    busy, end = 0.0, dev[0]["ts"]
    late = dict.fromkeys((*PHASES, "other"), 0.0)
    gap_dev = dict.fromkeys((*PHASES, "other"), 0.0)
    worst = []
    for e in dev:
        s, f = e["ts"], e["ts"] + e["dur"]
        gap = s - end
        if gap > 0:
            launch = launches.get(e.get("args", {}).get("correlation"))
            when = launch["ts"] if launch else end
            host = min(max(when - end, 0.0), gap)
            ph = phase_of(when)
            late[ph] += host
            gap_dev[ph] += gap - host
            if host > 0:
                worst.append((host, e["name"][:60], op_at(when), ph))
        busy += max(0.0, f - max(s, end))
        end = max(end, f)
    worst.sort(reverse=True)
    ms = 1e-3
    kernels: dict[str, list[float]] = {}
    for e in dev:
        k = kernels.setdefault(e["name"][:90], [0.0, 0])
        k[0] += e["dur"]
        k[1] += 1
    first_launch = launches.get(dev[0].get("args", {}).get("correlation"), dev[0])["ts"]
    lead_ops = sorted((o for o in ops if t0 <= o["ts"] < first_launch), key=lambda o: -o["dur"])
    return dict(
        step_ms=round(step["dur"] * ms, 3), busy_ms=round(busy * ms, 3),
        lead_ms=round((dev[0]["ts"] - t0) * ms, 3), tail_ms=round((t1 - end) * ms, 3),
        host_late_ms=round(sum(late.values()) * ms, 3), device_gap_ms=round(sum(gap_dev.values()) * ms, 3),
        host_late_by_phase={k: round(v * ms, 3) for k, v in late.items()},
        device_gap_by_phase={k: round(v * ms, 3) for k, v in gap_dev.items()},
        device_events=len(dev),
        worst_late=[dict(us=round(h, 1), next=n, host_op=o, phase=p) for h, n, o, p in worst[:top]],
        lead_ops=[dict(us=round(o["dur"], 1), op=o["name"][:80]) for o in lead_ops[:top]],
        kernels=[dict(name=n, ms=round(v[0] * ms, 4), calls=v[1])
                 for n, v in sorted(kernels.items(), key=lambda kv: -kv[1][0])])


def _train_step(h, model, params):
    import torch

    x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
    opt = torch.optim.AdamW(params, lr=1e-4)
    rf = torch.profiler.record_function

    def step():
        with rf("fwd"):
            loss = model(input_ids=x, labels=x).loss
        with rf("bwd"):
            loss.backward()
        with rf("opt"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def _measure(step, n: int = 8, trace: str | None = None) -> dict:
    import torch

    for _ in range(3):
        step()
    synced = []
    sampler = ClockSampler()
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        synced.append((time.perf_counter() - t) * 1e3)
    gpu = sampler.stop()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    pipelined = (time.perf_counter() - t) * 1e3 / n
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    rows = []
    for _ in range(2):
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=acts) as prof:
            with torch.profiler.record_function("step"):
                step()
                torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.json")
            prof.export_chrome_trace(path)
            with open(path, "rb") as f:
                raw = f.read()
            rows.append(analyse(json.loads(raw)["traceEvents"]))
            if trace and rows[-1] is min(rows, key=lambda r: r["step_ms"]):
                with gzip.open(trace, "wb") as f:
                    f.write(raw)
    best = min(rows, key=lambda r: r["step_ms"])
    with SyncWarnings() as count:
        step()
        torch.cuda.synchronize()
    return dict(synced_ms=round(statistics.median(synced), 3), pipelined_ms=round(pipelined, 3),
                sync_warnings=count[0], gpu_during=gpu, profiled=best)


class ClockSampler:
    """nvidia-smi sampling the GPU every 20 ms while the synced steps run: SM clock, power, temperature, throttle
    reasons: whether a case ran at other clocks than another (they did not explain why, on one host, kernels both
    steps share ran 3–9% slower in the LoRA step: docs/performance.md, ninth session)."""

    FIELDS = "clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"

    def __init__(self):
        import subprocess
        try:
            self._p = subprocess.Popen(["nvidia-smi", f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits",
                                        "-lms", "20"], stdout=subprocess.PIPE, text=True)
        except OSError:
            self._p = None

    def stop(self) -> dict:
        if self._p is None:
            return {}
        self._p.terminate()
        out, _ = self._p.communicate()
        rows = [[v.strip() for v in line.split(",")] for line in out.splitlines() if line.count(",") == 4]

        def num(i):
            vals = []
            for r in rows:
                try:
                    vals.append(float(r[i]))
                except ValueError:
                    pass
            return vals
        sm, power, temp = num(0), num(2), num(3)
        return dict(samples=len(rows), sm_mhz_mean=round(statistics.mean(sm), 1) if sm else None,
                    sm_mhz_min=min(sm, default=None), mem_mhz=rows[0][1] if rows else None,
                    power_w_mean=round(statistics.mean(power), 1) if power else None,
                    temp_max=max(temp, default=None), throttle=sorted({r[4] for r in rows}))


class SyncWarnings:
    """torch.cuda's sync debug mode over one step: how many synchronizing calls the step makes (0 expected)."""

    def __enter__(self):
        import warnings

        import torch
        self._cm = warnings.catch_warnings(record=True)
        self._seen = self._cm.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        self.count = [0]
        return self.count

    def __exit__(self, *exc):
        import torch
        torch.cuda.set_sync_debug_mode(0)
        self.count[0] = sum("synchroniz" in str(w.message) for w in self._seen)
        self._cm.__exit__(*exc)


def case(h, spec: str, compile_: bool, traces: str | None = None) -> dict:
    import torch

    import unipeft

    label, _, env = spec.partition(":")
    settings = dict(e.split("=", 1) for e in env.split(";") if e)
    os.environ.update(settings)
    torch._dynamo.reset()
    wrap = torch.compile if compile_ else (lambda m: m)
    try:
        m = h.make_model()
        if label.split("_")[0] == "floor":
            params = h.frozen_floor(m)
            model = wrap(m)
        else:
            if label.split("_")[0] == "qlora":  # an NF4 base (double quant, bf16 compute): QLoRA
                from unipeft import quant

                m = quant.quantize(m, "nf4", double_quant=True, compute_dtype=torch.bfloat16)
            am = unipeft.attach(m, "lora", r=16, alpha=32, targets=SITES)
            params = [p for p in am.parameters() if p.requires_grad]
            model = wrap(am)
        trace = None
        if traces:
            os.makedirs(traces, exist_ok=True)
            trace = os.path.join(traces, f"trace_{label}.json.gz")
        row = dict(case=label, env=settings, **_measure(_train_step(h, model, params), trace=trace))
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return row
    finally:
        for k in settings:
            os.environ.pop(k, None)
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--case", default="floor,lora")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--traces", default=None, help="folder for each case's profiled step as gzipped chrome trace")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h

    rows = []
    for spec in args.case.split(","):
        rows.append(case(h, spec, args.compile, args.traces))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "profiled"}), flush=True)
        h.release()
    print("\n| case | synced | pipelined | busy | lead | host late (fwd/bwd/opt) | device gaps | tail | SM MHz | W |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["profiled"]
        by = p["host_late_by_phase"]
        print(f"| {r['case']} | {r['synced_ms']} | {r['pipelined_ms']} | {p['busy_ms']} | {p['lead_ms']} | "
              f"{p['host_late_ms']} ({by['fwd']}/{by['bwd']}/{by['opt']}) | {p['device_gap_ms']} | {p['tail_ms']} | "
              f"{r['gpu_during'].get('sm_mhz_mean')} | {r['gpu_during'].get('power_w_mean')} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(compiled=args.compile, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
