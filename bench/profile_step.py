"""Where a step's GPU time goes: torch.profiler over a few steps of one case on the harness model, printed as the
top kernels (ms per step, calls per step) and the GPU-busy fraction of the wall time (low = launch/Python bound).

Usage (GPU machine, harness carried as in perf_vs_peft.py):
    PYTHONPATH=src python3 bench/profile_step.py --harness .gpu_carry/bench --case lora[,floor,qlora,mixed4,decode32]
Cases: floor (frozen floor train step), lora (unipeft LoRA r=16 train step), qlora (same on an NF4 base),
mixed4 (no-grad forward, 4 adapters routed per row), decode32 (generate 8 tokens, 32 adapters, 32 × 256).
`--liger` patches the base with Liger-Kernel first (class-level, as the anchor does); `--accelerate` applies
unipeft.accelerate to each model instead; `--graphs` replays the layers from CUDA graphs (graph_layers);
`--compile` wraps each model in torch.compile; `--layers N` builds the harness model with N decoder layers (a
quicker look at per-layer kernels). A case may carry environment settings for its run: `lora_notriton:UNIPEFT_TRITON=0`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


def _kernel_table(prof, steps: int, wall_ms: float, top: int) -> dict:
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    busy = sum(e.self_device_time_total for e in rows) / 1e3 / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    kernels = sum(e.count for e in rows) / steps
    print(f"GPU busy {busy:.2f} ms per step of {wall_ms:.2f} ms wall ({busy / wall_ms:.0%}), peak {peak:.2f} GiB, "
          f"{kernels:.0f} kernels and memsets per step")
    print("| kernel | ms/step | calls/step |")
    print("|---|---|---|")
    for e in rows[:top]:
        print(f"| {e.key[:90]} | {e.self_device_time_total / 1e3 / steps:.3f} | {e.count / steps:.0f} |")
    return dict(busy_ms=round(busy, 3), wall_ms=round(wall_ms, 3), peak_gib=round(peak, 2), kernels=round(kernels))


_TOP = 25
_CPU = False
_ACCEL = False
_GRAPHS = False
_STACKS: list = []  # the current case's graph stack (to report its recordings)


def _profile(fn, steps: int = 3, warm: int = 3) -> dict:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if _CPU else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    if _CPU:  # where the host time goes: operators by self CPU time
        ops = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
        ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        print(f"host: {sum(e.self_cpu_time_total for e in ops) / 1e3 / steps:.2f} ms self CPU per step (profiled)")
        print("| host op | self ms/step | calls/step |")
        print("|---|---|---|")
        for e in ops[:_TOP]:
            print(f"| {e.key[:90]} | {e.self_cpu_time_total / 1e3 / steps:.3f} | {e.count / steps:.0f} |")
    return _kernel_table(prof, steps, wall, _TOP)


def _train_fn(h, model, params):
    x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def case(h, spec: str, wrap) -> dict:
    """One case; `spec` is a case name, optionally `label:ENV=V;ENV=V` (label's prefix up to `_` is the case)."""
    label, _, env = spec.partition(":")
    name = label.split("_")[0]
    settings = dict(e.split("=", 1) for e in env.split(";") if e)
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()  # a compiled case compiles afresh (dynamo would reuse the last case's code)
    try:
        return _case(h, name, label, wrap)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _prepare(model):
    """--accelerate / --graphs on one case's model."""
    import unipeft

    if _ACCEL:
        unipeft.accelerate(model, cuda_graphs=_GRAPHS)
    elif _GRAPHS:
        unipeft.graph_layers(model)
    hf = getattr(model, "model", model) if hasattr(model, "_wrappers") else model
    _STACKS[:] = [hf.__dict__.get("_unipeft_graphs")]
    return model


def _case(h, name: str, label: str, wrap) -> dict:
    import unipeft

    print(f"\n## {label}", flush=True)
    if name == "floor":
        m = h.make_model()
        params = h.frozen_floor(m)
        return _profile(_train_fn(h, wrap(_prepare(m)), params))
    if name in ("lora", "qlora"):
        m = h.make_model()
        if name == "qlora":
            m = unipeft.quantize(m, "nf4", double_quant=True, compute_dtype=torch.bfloat16)
            h.release()
        am = unipeft.attach(m, "lora", r=16, alpha=32, targets=SITES)
        return _profile(_train_fn(h, wrap(_prepare(am)), [p for p in am.parameters() if p.requires_grad]))
    if name == "mixed4":
        am = unipeft.attach(h.make_model().eval(), "lora", r=16, alpha=32, targets=SITES)
        for k in range(1, 4):
            am.add(f"a{k}", "lora", r=16, alpha=32, targets=SITES)
        x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
        names = ["default", "a1", "a2", "a3"] * (h.B // 4)
        with torch.no_grad():
            return _profile(lambda: am(input_ids=x, adapter_names=names))
    if name == "decode32":
        h.B, h.T = 32, 256
        am = unipeft.attach(h.make_model().eval(), "lora", r=16, alpha=32, targets=SITES)
        for k in range(1, 32):
            am.add(f"a{k}", "lora", r=16, alpha=32, targets=SITES)
        x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
        names = [f"a{k}" if k else "default" for k in range(32)]
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(x), adapter_names=names)
        with torch.no_grad():
            out = _profile(lambda: am.generate(input_ids=x, **kw), steps=2, warm=1)
        h.B, h.T = 8, 1024
        return out
    raise SystemExit(f"unknown case {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--case", default="floor,lora")
    ap.add_argument("--liger", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--accelerate", action="store_true")
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cpu", action="store_true", help="also profile host operators (self CPU time)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers of the harness model (default: the harness's 16); fewer compile faster")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h

    if args.layers is not None:
        h.L = args.layers

    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    out = {}
    wrap = torch.compile if args.compile else (lambda m: m)
    global _TOP, _CPU, _ACCEL, _GRAPHS
    _TOP, _CPU, _ACCEL, _GRAPHS = args.top, args.cpu, args.accelerate, args.graphs
    for spec in args.case.split(","):
        out[spec] = case(h, spec, wrap)
        if _STACKS and _STACKS[0] is not None:
            out[spec]["graph_recordings"] = _STACKS[0].captures
            print(f"graph recordings: {_STACKS[0].captures}, refused signatures: {len(_STACKS[0].refused)}, "
                  f"layers replayed in the last step: {_STACKS[0].replayed}")
        _STACKS.clear()
        h.release()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
