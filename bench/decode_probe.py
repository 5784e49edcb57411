"""Where a static-cache `generate`'s time goes, merged model against unipeft with 32 adapters (one per row).

transformers compiles a static-cache generate's decoding steps (torch.compile, mode reduce-overhead: CUDA graphs).
This probe times, in turn for each model: a generate of 1 new token (the prefill, eager, and one sampling step) and
one of 32 new tokens; their difference over 31 is the cost of a decoding step. It also wraps the compiled call that
transformers keeps (`model._compiled_call`) to record, for each decoding step, the host time of the call (guards,
the CUDA-graph tree's input handling and replay launch — no sync inside) and the GPU time between CUDA events
recorded around it. transformers' loop waits for each step's tokens before it prepares the next step, so a step
costs about the loop's own host time plus the call's host time plus the step's GPU time: each of the three counts.

Usage (GPU machine):
    PYTHONPATH=src python3 bench/decode_probe.py --harness .gpu_carry/bench [--rounds 3] [--cprofile 30] [--split] \
        --out d.json

`--split` takes the compiled call's host time apart: the CUDA-graph tree's part (`CUDAGraphTreeManager.run`: its
input checks, the replay, the outputs), the replay launch alone (`CUDAGraph.replay`, one cudaGraphLaunch), and
the rest — dynamo's frame and guards and AOT's runtime wrappers — by difference; with the replayed node's input
counts (all inputs, and those it treats as static).
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


class Split:
    """Host µs per call inside the compiled call (see `--split`), by wrapping two torch methods in place."""

    def __init__(self) -> None:
        from torch._inductor import cudagraph_trees as ct

        self.times: dict[str, list[float]] = {"tree_run": [], "replay": []}
        self.inputs: list[tuple[int, int]] = []
        split = self

        def timed(key, inner):
            def wrapped(*args, **kwargs):
                t0 = time.perf_counter()
                out = inner(*args, **kwargs)
                split.times[key].append((time.perf_counter() - t0) * 1e6)
                return out
            return wrapped

        run = ct.CUDAGraphTreeManager.run
        ct.CUDAGraphTreeManager.run = timed("tree_run", run)
        torch.cuda.CUDAGraph.replay = timed("replay", torch.cuda.CUDAGraph.replay)
        node_run = ct.CUDAGraphNode.run

        def counted(node, new_inputs):
            split.inputs.append((len(new_inputs), len(getattr(node, "static_input_idxs", ()) or ())))
            return node_run(node, new_inputs)

        ct.CUDAGraphNode.run = counted

    def take(self) -> dict:
        out = {f"{k}_us_median": _median(v) for k, v in self.times.items()}
        out["inputs_static"] = self.inputs[-1] if self.inputs else None
        self.times = {k: [] for k in self.times}
        self.inputs = []
        return out


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


def _kernels(model, x, names, top: int) -> dict:
    """The GPU kernels of a decoding step and of the prefill, from torch.profiler (CUPTI records the kernels a CUDA
    graph replays): a 1-token generate (prefill) and a 32-token one, per kernel name; their difference over 31 is a
    decoding step's. Returns per step: kernel count, busy µs (sum of kernel durations), and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    def run(new: int) -> dict:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _generate(model, x, new, names)
        out: dict[str, list[float]] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")):
                c = out.setdefault(e.name, [0, 0.0])
                c[0] += 1
                c[1] += e.time_range.elapsed_us()
            elif e.device_type == torch.autograd.DeviceType.CUDA:
                c = out.setdefault("[" + e.name.split(" ")[0] + "]", [0, 0.0])
                c[0] += 1
                c[1] += e.time_range.elapsed_us()
        return out

    one, full = run(1), run(32)
    step = {k: ((full[k][0] - one.get(k, [0, 0])[0]) / 31, (full[k][1] - one.get(k, [0, 0.0])[1]) / 31)
            for k in full}
    rows = sorted(step.items(), key=lambda kv: -kv[1][1])
    pre = sorted(one.items(), key=lambda kv: -kv[1][1])
    result = dict(step_kernels=round(sum(c for c, _ in step.values()), 1),
                  step_busy_us=round(sum(t for _, t in step.values()), 1),
                  prefill_kernels=sum(c for c, _ in one.values()),
                  prefill_busy_us=round(sum(t for _, t in one.values()), 1),
                  step_top=[dict(name=k[:90], count=round(c, 2), us=round(t, 2)) for k, (c, t) in rows[:top]],
                  prefill_top=[dict(name=k[:90], count=c, us=round(t, 1)) for k, (c, t) in pre[:top]])
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("top")}), flush=True)
    for r in result["step_top"]:
        print(f"  step  {r['count']:7.2f} {r['us']:9.2f}  {r['name']}")
    for r in result["prefill_top"]:
        print(f"  prefill {r['count']:5d} {r['us']:9.1f}  {r['name']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cprofile", type=int, default=0, help="then profile one generate per case: top N functions")
    ap.add_argument("--kernels", type=int, default=0,
                    help="then profile the GPU kernels of a 1- and a 32-token generate per case: top N per step")
    ap.add_argument("--one-stream", action="store_true",
                    help="add a third case: the same adapters compiled with UNIPEFT_STREAMS=0 (routed delta after "
                         "the base GEMM on one stream), timed in turn with the others in this process")
    ap.add_argument("--split", action="store_true", help="time the compiled call's parts on the host (see above)")
    ap.add_argument("--out", default="decode_probe.json")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h

    import unipeft

    h.B, h.T = 32, 256
    names = [f"a{k}" if k else "default" for k in range(32)]
    merged = h.make_model().eval()

    def adapted():
        am = unipeft.attach(h.make_model().eval(), "lora", r=16, alpha=32, targets=SITES)
        for k in range(1, 32):
            am.add(f"a{k}", "lora", r=16, alpha=32, targets=SITES)
        with torch.no_grad():
            for n, p in am.named_parameters():
                if ".up.weight" in n:
                    p.normal_(0, 0.01)
        return am.eval()

    am = adapted()
    x = torch.randint(0, h.VOCAB, (32, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cases = [("merged", merged, merged, None), ("unipeft", am, am.model, names)]
    if args.one_stream:
        one = adapted()
        cases.append(("unipeft_one_stream", one, one.model, names))
    for case, model, inner, n in cases:  # compile and record the graphs (two generates), then wrap the compiled call
        os.environ["UNIPEFT_STREAMS"] = "0" if case == "unipeft_one_stream" else "1"  # (read while tracing)
        for _ in range(2):
            _generate(model, x, 32, n)
        inner._compiled_call = StepTimer(inner._compiled_call)
    os.environ["UNIPEFT_STREAMS"] = "1"
    split = Split() if args.split else None
    rows = []
    for i in range(args.rounds):
        for case, model, inner, n in cases:
            one = _generate(model, x, 1, n)
            inner._compiled_call.take()
            if split is not None:
                split.take()
            full = _generate(model, x, 32, n)
            steps = inner._compiled_call.take()
            if split is not None:
                steps.update(split.take())
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
    kernels = {case: _kernels(model, x, n, args.kernels) for case, model, _, n in cases} if args.kernels else {}
    summary = {}
    for case in [c[0] for c in cases]:
        rs = [r for r in rows if r["case"] == case]
        keys = ["prefill_ms", "generate_32_ms", "per_step_ms", "host_ms_median", "gpu_ms_median"]
        keys += ["tree_run_us_median", "replay_us_median"] if split is not None else []
        summary[case] = {k: _median([r[k] for r in rs if r[k] is not None]) for k in keys}
        if split is not None:
            summary[case]["inputs_static"] = rs[-1]["inputs_static"]
    for case in summary:  # each adapted case against the merged model of the same round
        if case != "merged":
            pairs = [(r, m) for r in rows if r["case"] == case for m in rows
                     if m["case"] == "merged" and m["round"] == r["round"]]
            for k in ("generate_32_ms", "per_step_ms", "gpu_ms_median"):
                ratios = sorted(r[k] / m[k] for r, m in pairs)
                summary[case][k.replace("_ms", "").replace("_median", "") + "_ratio_median"] = \
                    round(ratios[len(ratios) // 2], 3)
    result = dict(meta=dict(date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                            unipeft=os.path.dirname(unipeft.__file__)), rows=rows, summary=summary,
                  profiles=profiles, kernels=kernels)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'':8} {'prefill':>8} {'gen 32':>8} {'per step':>9} {'call host':>10} {'call GPU':>9}")
    for case, s in summary.items():
        print(f"{case[:8]:8} {s['prefill_ms']:>8} {s['generate_32_ms']:>8} {s['per_step_ms']:>9} "
              f"{s['host_ms_median']:>10.3f} {s['gpu_ms_median']:>9.3f}  "
              + " ".join(f"{k}={v}" for k, v in s.items() if k.endswith("ratio_median") or k.startswith(
                  ("tree_run", "replay", "inputs"))))


if __name__ == "__main__":
    main()
