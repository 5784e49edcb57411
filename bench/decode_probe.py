"""Where a static-cache `generate`'s time goes, merged model against unipeft with 32 adapters (one per row).

transformers compiles a static-cache generate's decoding steps (torch.compile, mode reduce-overhead: CUDA graphs).
This probe times, in turn for each model: a generate of 1 new token (the prefill, eager, and one sampling step) and
one of 32 new tokens; their difference over 31 is the cost of a decoding step. It also wraps the compiled call that
transformers keeps (`model._compiled_call`) to record, for each decoding step, the host time of the call (guards,
the CUDA-graph tree's input handling and replay launch — no sync inside) and the GPU time between CUDA events
recorded around it. transformers' loop waits for each step's tokens before it prepares the next step, so a step
costs about the loop's own host time plus the call's host time plus the step's GPU time: each of the three counts.

Usage (GPU machine):
    PYTHONPATH=src python3 bench/decode_probe.py --harness .gpu_carry/bench [--rounds 3] [--cprofile 30] --out d.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


class StepTimer:
    """Wraps a compiled call: per call, host ms of the call itself and (read after a sync) GPU ms between events."""

    def __init__(self, inner) -> None:
        self.inner, self.host, self.events = inner, [], []

    def __call__(self, *args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        self.events.append((start, end))
        return out

    def take(self) -> dict:
        torch.cuda.synchronize()
        gpu = [s.elapsed_time(e) for s, e in self.events]
        host, self.host, self.events = self.host, [], []
        return dict(calls=len(host), host_ms_median=_median(host), gpu_ms_median=_median(gpu),
                    host_ms_sum=round(sum(host), 2), gpu_ms_sum=round(sum(gpu), 2))


def _median(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def _generate(model, x, new: int, names) -> float:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, cache_implementation="static")
    if names is not None:
        kw["adapter_names"] = names
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cprofile", type=int, default=0, help="then profile one generate per case: top N functions")
    ap.add_argument("--out", default="decode_probe.json")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h

    import unipeft

    h.B, h.T = 32, 256
    names = [f"a{k}" if k else "default" for k in range(32)]
    merged = h.make_model().eval()
    am = unipeft.attach(h.make_model().eval(), "lora", r=16, alpha=32, targets=SITES)
    for k in range(1, 32):
        am.add(f"a{k}", "lora", r=16, alpha=32, targets=SITES)
    with torch.no_grad():
        for n, p in am.named_parameters():
            if ".up.weight" in n:
                p.normal_(0, 0.01)
    am.eval()
    x = torch.randint(0, h.VOCAB, (32, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cases = (("merged", merged, merged, None), ("unipeft", am, am.model, names))
    for _, model, inner, n in cases:  # compile and record the graphs (two generates), then wrap the compiled call
        for _ in range(2):
            _generate(model, x, 32, n)
        inner._compiled_call = StepTimer(inner._compiled_call)
    rows = []
    for i in range(args.rounds):
        for case, model, inner, n in cases:
            one = _generate(model, x, 1, n)
            inner._compiled_call.take()
            full = _generate(model, x, 32, n)
            steps = inner._compiled_call.take()
            rows.append(dict(round=i, case=case, prefill_ms=round(one, 2), generate_32_ms=round(full, 2),
                             per_step_ms=round((full - one) / 31, 3), **steps))
            print(json.dumps(rows[-1]), flush=True)
    profiles = {}
    if args.cprofile:  # one more 32-token generate per case under cProfile: the host functions by own time
        import cProfile
        import pstats
        for case, model, inner, n in cases:
            prof = cProfile.Profile()
            prof.enable()
            _generate(model, x, 32, n)
            prof.disable()
            inner._compiled_call.take()
            stats = pstats.Stats(prof)
            top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:args.cprofile]
            profiles[case] = [dict(fn=f"{os.path.basename(k[0])}:{k[1]}:{k[2]}", calls=v[1],
                                   tottime_ms=round(v[2] * 1e3, 2), cumtime_ms=round(v[3] * 1e3, 2))
                              for k, v in top]
            print(case, json.dumps(profiles[case][:12], indent=0), flush=True)
    summary = {}
    for case in ("merged", "unipeft"):
        rs = [r for r in rows if r["case"] == case]
        summary[case] = {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in
                         ("prefill_ms", "generate_32_ms", "per_step_ms", "host_ms_median", "gpu_ms_median")}
    result = dict(meta=dict(date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                            unipeft=os.path.dirname(unipeft.__file__)), rows=rows, summary=summary,
                  profiles=profiles)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'':8} {'prefill':>8} {'gen 32':>8} {'per step':>9} {'call host':>10} {'call GPU':>9}")
    for case, s in summary.items():
        print(f"{case:8} {s['prefill_ms']:>8} {s['generate_32_ms']:>8} {s['per_step_ms']:>9} "
              f"{s['host_ms_median']:>10.3f} {s['gpu_ms_median']:>9.3f}")


if __name__ == "__main__":
    main()
