"""unipeft vs peft on the GPU, side by side in one process, with the shared anchor harness (peft_baseline.py).

Usage (on the GPU machine, harness copied into an ignored folder that travels with `carry`):
    PYTHONPATH=src python3 bench/perf_vs_peft.py --harness .gpu_carry/bench --out perf.json [--compile] [--only a,b]
        [--repeats K]   # then the floor and unipeft LoRA in turn, K rounds: the median ratio (drift hits both)
        [--guards]      # with --compile: each case again with guard evaluation skipped (what guards cost)
        [--rounds K]    # the decode case: K rounds of merged and unipeft decoding timed in turn (default 3)

Cases (Llama-shaped 953M model, bf16, batch 8 × 1024, LoRA r=16 on all 7 linears, dropout 0, AdamW; median of 10):
  train: frozen floor, peft LoRA, unipeft LoRA (fused path), unipeft LoRA reference path (UNIPEFT_FUSED=0)
  forward: merged (= base), peft unmerged, unipeft unmerged (fused, reference)
  mixed: 4 adapters at 8 × 1024 (peft, unipeft), 32 adapters at 32 × 256 (merged, peft, unipeft)
  decode: 32 × 256 prompt + 32 new tokens, merged vs unipeft with 32 adapters (peft's 21 s anchor is not re-run);
    the `decode` case adds the static-cache (compiled, CUDA-graphed) generate of both, a new mix, the bmm path
  bottleneck: houlsby / parallel / scaled_parallel train steps (reference path) against the frozen floor
  accelerate: unipeft.accelerate'd base (Liger-Kernel): its frozen floor, LoRA on it, and its loss vs the plain one;
    then both again with the layers replayed from CUDA graphs (accelerate(..., cuda_graphs=True))
  graphs: frozen floor and unipeft LoRA on the plain base with the layers replayed from CUDA graphs (graph_layers)
Every contender's references are deleted and `release()` is called before the next, so peak memory is its own.
Prints one JSON line per case and a table with the ratios the performance issue targets; writes all rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


def _unipeft(model, n_adapters: int = 1):
    import unipeft

    am = unipeft.attach(model, "lora", r=16, alpha=32, targets=SITES)
    for k in range(1, n_adapters):
        am.add(f"a{k}", "lora", r=16, alpha=32, targets=SITES)
    return am


def _peft(model, n_adapters: int = 1):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=_h.TARGETS, lora_dropout=0.0))
    for k in range(1, n_adapters):
        pm.add_adapter(f"a{k}", LoraConfig(r=16, lora_alpha=32, target_modules=_h.TARGETS))
    return pm


def _trainable(m) -> list[torch.nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


def _nonzero_b(m) -> None:
    """LoRA's B starts at zero; give it values so no path can skip work on zeros."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ("lora_B" in n or ".up.weight" in n) and p.requires_grad:
                p.normal_(0, 0.01)


def _generate(case: str, model, names=None, static: bool = False, runs: int = 4, keep: list | None = None) -> dict:
    """Median of runs 2..n of a greedy generate (32 × 256 prompt, 32 new tokens); `static`: a static KV cache, whose
    decoding steps transformers compiles (mode reduce-overhead: CUDA graphs) — the first run compiles."""
    x = torch.randint(0, _h.VOCAB, (_h.B, _h.T), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    if names is not None:
        kw["adapter_names"] = names
    if static:
        kw["cache_implementation"] = "static"
    from first_steps import GcClock  # (bench/ is on the path: scripts run from it)

    times, collections = [], []
    clock = GcClock()  # Python's garbage collections inside each run: a full one over a post-compile heap is slow
    with torch.no_grad():
        for _ in range(runs):
            torch.cuda.synchronize()
            clock.take()
            t0 = time.perf_counter()
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            collections.append(clock.take())
    clock.close()
    if keep is not None:
        keep.append(out[:, _h.T:].cpu())
    later = sorted(times[1:])
    return _h.report(case, later[len(later) // 2], first_run_s=round(times[0], 2),
                     runs_ms=[round(t * 1e3, 2) for t in times], gc=collections)


def _decode(rounds: int = 3) -> list[dict]:
    """Decoding with 32 adapters (one per row) against the merged model. Eager (dynamic KV cache): the merged model,
    unipeft's per-routing path and its shared stacks (prepare_routing) timed in turn for `rounds` rounds — eager
    decoding is host-bound and the host drifts by 10–15% within minutes — medians reported. The same in turn with a
    static cache (compiled, CUDA-graphed decoding steps; the first two rounds compile and warm up, not counted).
    Then a new mix of adapters on the compiled model (no recompile expected), the compiled steps with the routed
    kernels off, and greedy-token agreement between the paths (on a
    random-init model near-uniform logits make any rounding difference flip tokens: a reference, not a check)."""
    from torch._dynamo.utils import counters

    rows: list[dict] = []
    b0, t0 = _h.B, _h.T
    _h.B, _h.T = 32, 256
    names = [f"a{k}" if k else "default" for k in range(32)]
    tokens: dict[str, list] = {}
    merged = _h.make_model().eval()
    am = _unipeft(_h.make_model().eval(), 32).eval()
    _nonzero_b(am)
    timed: dict[str, list[float]] = {}
    runs: dict[str, list[dict]] = {}  # every run of every round, with its garbage collections

    def in_turn(cases) -> None:
        for case, model, shared, kw in cases:
            if shared is not None and (model.__dict__.get("_shared") is not None) != shared:
                model.prepare_routing(shared)  # (kept between static rounds: its stacks' addresses are compiled in)
            row = _generate(case, model, None if shared is None else names, keep=tokens.setdefault(case, []), **kw)
            timed.setdefault(case, []).append(row["step_ms"])
            runs.setdefault(case, []).append(dict(runs_ms=row["runs_ms"], gc=row["gc"]))

    eager = (("generate_merged_32x256_32new", merged, None, {}),
             ("unipeft_32_adapters_generate_32x256_32new", am, False, {}),
             ("unipeft_32_adapters_generate_32x256_32new_shared", am, True, {}))
    for _ in range(rounds):
        in_turn(eager)
    counters.clear()
    static = (("generate_merged_static_32x256_32new", merged, None, dict(static=True, runs=3)),
              ("unipeft_32_adapters_generate_static_32x256_32new", am, True, dict(static=True, runs=3)))
    for _ in range(rounds + 2):  # the first round compiles both (not counted)
        in_turn(static)
    for case, times in timed.items():
        times = times[2:] if "static" in case else times
        rows.append(_h.report(case, sorted(times)[len(times) // 2] / 1e3, rounds_ms=times, runs=runs[case]))
    by = {r["case"]: r["rounds_ms"] for r in rows}
    pairs = {"eager": ("unipeft_32_adapters_generate_32x256_32new", "generate_merged_32x256_32new"),
             "eager_shared": ("unipeft_32_adapters_generate_32x256_32new_shared", "generate_merged_32x256_32new"),
             "static": ("unipeft_32_adapters_generate_static_32x256_32new", "generate_merged_static_32x256_32new")}
    medians = {}
    for label, (case, ref) in pairs.items():
        per_round = [round(a / b, 4) for a, b in zip(by[case], by[ref])]
        medians[label] = dict(rounds=per_round, median=sorted(per_round)[len(per_round) // 2])
    rows.append({"case": "decode_in_turn_ratios", **medians})
    print(json.dumps(rows[-1]), flush=True)
    del merged
    _h.release()
    graphs = dict(counters["stats"]).get("unique_graphs", 0)
    breaks = sum(counters["graph_break"].values())
    mix = names[1:] + names[:1]
    rows.append(_generate("unipeft_32_adapters_generate_static_new_mix", am, mix, static=True, runs=3))
    rows[-1].update(unique_graphs_after_first=graphs, unique_graphs_after_new_mix=dict(counters["stats"]).get(
        "unique_graphs", 0), graph_breaks=breaks)
    torch._dynamo.reset()  # the compiled steps again, with the routed kernels off (gather + batched GEMMs)
    os.environ["UNIPEFT_TRITON"] = "0"
    rows.append(_generate("unipeft_32_adapters_generate_static_32x256_32new_bmm", am, names, static=True, runs=4))
    os.environ["UNIPEFT_TRITON"] = "1"
    merged_eager, ours_eager = tokens["generate_merged_32x256_32new"][0], tokens[
        "unipeft_32_adapters_generate_32x256_32new"][0]
    agree = {"merged_static_vs_eager": tokens["generate_merged_static_32x256_32new"][0],
             "static_vs_eager": tokens["unipeft_32_adapters_generate_static_32x256_32new"][0],
             "shared_vs_per_routing": tokens["unipeft_32_adapters_generate_32x256_32new_shared"][0]}
    refs = {"merged_static_vs_eager": merged_eager, "static_vs_eager": ours_eager,
            "shared_vs_per_routing": ours_eager}
    rows.append({"case": "decode_token_agreement",
                 **{k: round(float((v == refs[k]).float().mean()), 4) for k, v in agree.items()},
                 **{k + "_first_token": round(float((v[:, 0] == refs[k][:, 0]).float().mean()), 4)
                    for k, v in agree.items()}})
    print(json.dumps(rows[-1]), flush=True)
    del am
    _h.release()
    _h.B, _h.T = b0, t0
    return rows


def run(compile_: bool, only: set[str] | None, guards: bool = False, rounds: int = 3) -> list[dict]:
    rows: list[dict] = []
    wrap = torch.compile if compile_ else (lambda m: m)
    tag = "compiled_" if compile_ else ""

    def want(case: str) -> bool:
        return only is None or case in only

    def train(case, make, params_of):
        if not want(case):
            return
        m = make()
        if compile_:
            torch._dynamo.reset()  # each case compiles afresh; its graph and graph-break counts are its own
            torch._dynamo.utils.counters.clear()
        model, params = wrap(m), params_of(m)
        rows.append(_h.time_train(tag + case, model, params))
        if compile_:
            c = torch._dynamo.utils.counters
            rows[-1].update(graphs=c["stats"]["unique_graphs"], graph_breaks=sum(c["graph_break"].values()))
            if guards:  # the same compiled model without evaluating its guards: what they cost per step
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    rows.append(_h.time_train(tag + case + "_guards_skipped", model, params))
        del model, params, m
        _h.release()

    train("frozen_floor", lambda: _h.make_model(), lambda m: _h.frozen_floor(m))
    train("peft_lora_r16", lambda: _peft(_h.make_model()), _trainable)
    train("unipeft_lora_r16", lambda: _unipeft(_h.make_model()), _trainable)
    if not compile_:  # graph_layers: eager only (a compiled model has its own CUDA-graph mode)
        train("frozen_floor_graphed", lambda: _graphed(_h.make_model(), floor=True), lambda m: m._floor_params)
        train("unipeft_lora_r16_graphed", lambda: _graphed(_unipeft(_h.make_model())), _trainable)
    if not compile_ and want("unipeft_lora_r16_reference"):
        os.environ["UNIPEFT_FUSED"] = "0"
        train("unipeft_lora_r16_reference", lambda: _unipeft(_h.make_model()), _trainable)
        os.environ["UNIPEFT_FUSED"] = "1"
    if compile_:
        return rows
    for preset in ("houlsby", "parallel", "scaled_parallel"):  # bottleneck adapters: the reference path's cost
        train(f"unipeft_{preset}", lambda preset=preset: _bottleneck(_h.make_model(), preset), _trainable)

    if want("forward"):
        m = _h.make_model().eval()
        rows.append(_h.time_forward("forward_merged", m))
        pm = _peft(m)
        _nonzero_b(pm)
        pm.eval()
        rows.append(_h.time_forward("peft_unmerged_forward", pm))
        for k in range(1, 4):
            pm.add_adapter(f"a{k}", __import__("peft").LoraConfig(r=16, lora_alpha=32, target_modules=_h.TARGETS))
        names = ["default", "a1", "a2", "a3"] * (_h.B // 4)
        rows.append(_h.time_forward("peft_mixed_4_adapters_forward", pm, adapter_names=names))
        m = pm.unload()
        del pm
        _h.release()
        am = _unipeft(m, 4).eval()
        _nonzero_b(am)
        am.activate("default")
        rows.append(_h.time_forward("unipeft_unmerged_forward", am))
        os.environ["UNIPEFT_FUSED"] = "0"
        rows.append(_h.time_forward("unipeft_unmerged_forward_reference", am))
        rows.append(_h.time_forward("unipeft_mixed_4_adapters_forward_reference", am, adapter_names=names))
        os.environ["UNIPEFT_FUSED"] = "1"
        rows.append(_h.time_forward("unipeft_mixed_4_adapters_forward", am, adapter_names=names))
        am.merge("default")
        rows.append(_h.time_forward("unipeft_merged_forward", am))
        del am, m
        _h.release()

    if want("mixed32"):
        b0, t0 = _h.B, _h.T
        _h.B, _h.T = 32, 256
        names = [f"a{k}" if k else "default" for k in range(32)]
        m = _h.make_model().eval()
        rows.append(_h.time_forward("forward_merged_32x256", m))
        rows.append(_generate("generate_merged_32x256_32new", m))
        am = _unipeft(m, 32).eval()
        _nonzero_b(am)
        rows.append(_h.time_forward("unipeft_32_adapters_forward_32x256", am, adapter_names=names))
        rows.append(_generate("unipeft_32_adapters_generate_32x256_32new", am, names))
        m = am.detach()
        del am
        _h.release()
        pm = _peft(m, 32).eval()
        rows.append(_h.time_forward("peft_32_adapters_forward_32x256", pm, adapter_names=names))
        del pm, m
        _h.release()
        _h.B, _h.T = b0, t0
    if want("decode") and not compile_:
        rows += _decode(rounds)
    if want("accelerate"):  # last: accelerate swaps RoPE process-wide until restored
        rows += _accelerated()
    return rows


def interleaved(compile_: bool, k: int, guards: bool = False) -> list[dict]:
    """The frozen floor and unipeft LoRA timed in turn for k rounds, each model built (and compiled) once: a ratio
    per round and their median. Two cases timed minutes apart drift with the host and the clocks (the same
    compiled pair gave 1.104× and 1.126× in two back-to-back runs); taken in turn, the drift hits both. Both models
    are on the GPU together, so these rows' peak memory is not a case's own (the single runs give that)."""
    wrap = torch.compile if compile_ else (lambda m: m)
    tag = "compiled_" if compile_ else ""
    if compile_:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    floor = _h.make_model()
    floor_params = _h.frozen_floor(floor)
    lora = _unipeft(_h.make_model())
    lora_params = _trainable(lora)
    cases = ((f"{tag}interleaved_frozen_floor", wrap(floor), floor_params),
             (f"{tag}interleaved_unipeft_lora_r16", wrap(lora), lora_params))
    rows, ratios = [], []
    for i in range(k):
        pair = [_h.time_train(f"{case}_{i}", model, params) for case, model, params in cases]
        rows += pair
        ratios.append(pair[1]["step_ms"] / pair[0]["step_ms"])
        if compile_ and guards:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                rows += [_h.time_train(f"{case}_{i}_guards_skipped", model, params) for case, model, params in cases]
    rows.append(dict(case=f"{tag}interleaved_lora_over_floor", ratios=[round(r, 3) for r in ratios],
                     median=round(sorted(ratios)[k // 2], 3)))
    if compile_:  # (both models' graphs together: the floor's 1 and LoRA's; breaks: a break's reasons, counted)
        c = torch._dynamo.utils.counters
        rows[-1].update(graphs=c["stats"]["unique_graphs"], graph_breaks=sum(c["graph_break"].values()),
                        break_reasons=[r[:200] for r in c["graph_break"]])
    print(json.dumps(rows[-1]), flush=True)
    del cases, floor, lora, floor_params, lora_params
    _h.release()
    return rows


def _graphed(model, floor: bool = False):
    import unipeft

    if floor:
        model._floor_params = _h.frozen_floor(model)
    unipeft.graph_layers(model)
    return model


def _bottleneck(model, preset: str):
    import unipeft

    return unipeft.attach(model, preset)


def _accelerated() -> list[dict]:
    """unipeft.accelerate (Liger-Kernel's fused RMSNorm, SwiGLU, RoPE, linear + cross-entropy): the frozen floor and
    LoRA on the accelerated base, and the loss of the accelerated model against the plain one (same weights)."""
    import unipeft

    rows = []
    m = _h.make_model()
    x = torch.randint(0, _h.VOCAB, (2, 512), device="cuda")
    with torch.no_grad():
        plain = float(m(input_ids=x, labels=x).loss)
        unipeft.accelerate(m)
        fast = float(m(input_ids=x, labels=x).loss)
    rows.append({"case": "accelerate_loss_check", "plain": plain, "accelerated": fast, "abs_diff": abs(plain - fast)})
    print(json.dumps(rows[-1]), flush=True)
    rows.append(_h.time_train("accel_frozen_floor", m, _h.frozen_floor(m)))
    del m
    _h.release()
    am = _unipeft(_h.make_model())
    unipeft.accelerate(am)
    rows.append(_h.time_train("unipeft_accel_lora_r16", am, _trainable(am)))
    unipeft.accelerate(am, enable=False)
    del am
    _h.release()
    m = _h.make_model()
    params = _h.frozen_floor(m)
    unipeft.accelerate(m, cuda_graphs=True)
    rows.append(_h.time_train("accel_frozen_floor_graphed", m, params))
    unipeft.accelerate(m, enable=False)
    del m, params
    _h.release()
    am = _unipeft(_h.make_model())
    unipeft.accelerate(am, cuda_graphs=True)
    rows.append(_h.time_train("unipeft_accel_lora_r16_graphed", am, _trainable(am)))
    unipeft.accelerate(am, enable=False)
    del am
    _h.release()
    return rows


def table(rows: list[dict]) -> str:
    by = {r["case"].removeprefix("compiled_") + ("@c" if r["case"].startswith("compiled_") else ""): r for r in rows}

    def ratio(a: str, b: str) -> str:
        return f"{by[a]['step_ms'] / by[b]['step_ms']:.3f}" if a in by and b in by else "-"

    def mem(a: str, b: str) -> str:
        return f"{by[a]['peak_gib'] / by[b]['peak_gib']:.3f}" if a in by and b in by else "-"

    lines = ["| case | ms | peak GiB | ratio | vs |", "|---|---|---|---|---|"]
    refs = {"peft_lora_r16": "frozen_floor", "unipeft_lora_r16": "frozen_floor",
            "unipeft_lora_r16_reference": "frozen_floor", "peft_lora_r16@c": "frozen_floor@c",
            "unipeft_houlsby": "frozen_floor", "unipeft_parallel": "frozen_floor",
            "unipeft_scaled_parallel": "frozen_floor", "accel_frozen_floor": "frozen_floor",
            "unipeft_accel_lora_r16": "accel_frozen_floor", "unipeft_accel_lora_r16_graphed": "accel_frozen_floor",
            "accel_frozen_floor_graphed": "accel_frozen_floor", "frozen_floor_graphed": "frozen_floor",
            "unipeft_lora_r16_graphed": "frozen_floor", "peft_accel_lora_r16": "accel_frozen_floor",
            "unipeft_lora_r16@c": "frozen_floor@c", "peft_unmerged_forward": "forward_merged",
            "unipeft_unmerged_forward": "forward_merged", "unipeft_unmerged_forward_reference": "forward_merged",
            "peft_mixed_4_adapters_forward": "forward_merged", "unipeft_mixed_4_adapters_forward": "forward_merged",
            "unipeft_mixed_4_adapters_forward_reference": "forward_merged",
            "unipeft_merged_forward": "forward_merged",
            "unipeft_32_adapters_forward_32x256": "forward_merged_32x256",
            "peft_32_adapters_forward_32x256": "forward_merged_32x256",
            "unipeft_32_adapters_generate_32x256_32new": "generate_merged_32x256_32new",
            "unipeft_32_adapters_generate_32x256_32new_shared": "generate_merged_32x256_32new",
            "generate_merged_static_32x256_32new": "generate_merged_32x256_32new",
            "unipeft_32_adapters_generate_static_32x256_32new": "generate_merged_static_32x256_32new",
            "unipeft_32_adapters_generate_static_new_mix": "generate_merged_static_32x256_32new",
            "unipeft_32_adapters_generate_static_32x256_32new_bmm": "generate_merged_static_32x256_32new"}
    for key, r in by.items():
        if "step_ms" not in r:
            lines.append(f"| {key} | {json.dumps({k: v for k, v in r.items() if k != 'case'})} | | | |")
            continue
        ref = refs.get(key, "")
        extra = f" (mem {mem(key, ref)})" if "peak_gib" in r and ref in by and "peak_gib" in by[ref] else ""
        lines.append(f"| {key} | {r['step_ms']} | {r.get('peak_gib', '')} | {ratio(key, ref) if ref else ''}{extra} "
                     f"| {ref} |")
    return "\n".join(lines)


def _gpu_state() -> dict:
    """The GPU's clocks, power limit, temperature and performance state at the start, from nvidia-smi: hosts differ
    by more than the margins at stake (compiled training measured 1.070–1.124× on six hosts), so each file says
    what it ran on. Empty when nvidia-smi is not there."""
    import subprocess

    fields = "clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu,pstate,driver_version"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    return dict(zip(fields.split(","), (v.strip() for v in out.split(","))))


def _cpu_model() -> str:
    """The host CPU's model name (eager steps are host-bound on slower hosts)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def main() -> None:
    global _h
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench", help="folder holding peft_baseline.py")
    ap.add_argument("--out", default="perf.json")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--guards", action="store_true",
                    help="with --compile: time each case again without evaluating the compiled guards")
    ap.add_argument("--rounds", type=int, default=3, help="decode case: rounds timed in turn")
    ap.add_argument("--repeats", type=int, default=0,
                    help="then time the frozen floor and unipeft LoRA in turn this many rounds (median ratio)")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft
    import peft_baseline as harness
    import transformers

    _h = harness
    meta = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), H=_h.H, L=_h.L, I=_h.I, B=_h.B,
                T=_h.T, compiled=args.compile, gpu_state=_gpu_state(), host_cpu=_cpu_model())
    print(json.dumps(meta), flush=True)
    rows = run(args.compile, set(args.only.split(",")) if args.only else None, args.guards, args.rounds)
    if args.repeats:
        rows += interleaved(args.compile, args.repeats, args.guards)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(table(rows))


_h = None

if __name__ == "__main__":
    main()
