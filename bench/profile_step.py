"""Where a step's GPU time goes: torch.profiler over a few steps of one case on the harness model, printed as the
top kernels (ms per step, calls per step) and the GPU-busy fraction of the wall time (low = launch/Python bound).

Usage (GPU machine, harness carried as in perf_vs_peft.py):
    PYTHONPATH=src python3 bench/profile_step.py --harness .gpu_carry/bench --case lora[,floor,qlora,mixed4,decode32]
Cases: floor (frozen floor train step), lora (unipeft LoRA r=16 train step), qlora (same on an NF4 base),
mixed4 (no-grad forward, 4 adapters routed per row), decode32 (generate 8 tokens, 32 adapters, 32 × 256).
`--liger` patches the base with Liger-Kernel first (class-level, as the anchor does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


def _kernel_table(prof, steps: int, wall_ms: float, top: int) -> dict:
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    busy = sum(e.self_device_time_total for e in rows) / 1e3 / steps
    print(f"GPU busy {busy:.2f} ms per step of {wall_ms:.2f} ms wall ({busy / wall_ms:.0%})")
    print("| kernel | ms/step | calls/step |")
    print("|---|---|---|")
    for e in rows[:top]:
        print(f"| {e.key[:90]} | {e.self_device_time_total / 1e3 / steps:.3f} | {e.count / steps:.0f} |")
    return dict(busy_ms=round(busy, 3), wall_ms=round(wall_ms, 3))


def _profile(fn, steps: int = 3, warm: int = 3, top: int = 25) -> dict:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return _kernel_table(prof, steps, wall, top)


def _train_fn(h, model, params):
    x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def case(h, name: str) -> dict:
    import unipeft

    print(f"\n## {name}", flush=True)
    if name == "floor":
        m = h.make_model()
        return _profile(_train_fn(h, m, h.frozen_floor(m)))
    if name in ("lora", "qlora"):
        m = h.make_model()
        if name == "qlora":
            m = unipeft.quantize(m, "nf4", double_quant=True, compute_dtype=torch.bfloat16)
            h.release()
        am = unipeft.attach(m, "lora", r=16, alpha=32, targets=SITES)
        return _profile(_train_fn(h, am, [p for p in am.parameters() if p.requires_grad]))
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
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h

    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    out = {}
    for name in args.case.split(","):
        out[name] = case(h, name)
        h.release()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
