"""Which generated kernels does the compiled LoRA step run that the compiled floor does not — and what are they?

The compiled profiles (`profile_compiled_10_full.txt`) list kernels by Inductor's names only, truncated. This
script compiles one train step (forward + backward) of the harness model with a few layers, for the frozen floor
and for unipeft LoRA, writes each generated module to `<out>/<case>_<i>.py`, and prints, per case, every Triton
kernel the wrapper launches with the "Original ATen" / "Source Nodes" comment Inductor puts above its definition:
enough to map each name in a profile to the ops it computes.

Usage (GPU machine, harness carried as in perf_vs_peft.py):
    PYTHONPATH=src python3 bench/codegen_dump.py --harness .gpu_carry/bench --layers 3 --out $OUT/codegen
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


def kernel_origins(code: str) -> dict[str, str]:
    """Kernel name -> the comment lines Inductor wrote right above `<name> = async_compile.triton(...)`."""
    out: dict[str, str] = {}
    lines = code.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"(triton_\w+) = async_compile\.triton\(", line)
        if not m:
            continue
        notes, j = [], i - 1
        while j >= 0 and lines[j].startswith("#"):
            notes.insert(0, lines[j].lstrip("# ").strip())
            j -= 1
        out[m.group(1)] = " | ".join(n for n in notes if "kernel path" not in n)
    return out


def launched(code: str) -> list[str]:
    """Names of the Triton kernels the wrapper's `call` launches, in launch order (with repeats)."""
    return re.findall(r"\b(triton_\w+?)\.run\(", code)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h
    import torch
    from torch._inductor.utils import run_and_get_code

    import unipeft

    h.L = args.layers
    os.makedirs(args.out, exist_ok=True)
    x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
    summary = {}
    for case in ("floor", "lora"):
        torch._dynamo.reset()
        m = h.make_model()
        if case == "floor":
            h.frozen_floor(m)
        else:
            m = unipeft.attach(m, "lora", r=16, alpha=32, targets=SITES)

        def step(model):
            model(input_ids=x, labels=x).loss.backward()

        codes = run_and_get_code(step, torch.compile(m))[1]
        summary[case] = []
        for i, code in enumerate(codes):
            with open(os.path.join(args.out, f"{case}_{i}.py"), "w") as f:
                f.write(code)
            origins = kernel_origins(code)
            names = launched(code)
            summary[case].append(dict(module=i, launches=len(names),
                                      kernels={n: dict(calls=names.count(n), origin=origins.get(n, ""))
                                               for n in dict.fromkeys(names)}))
            print(f"\n## {case} module {i}: {len(names)} Triton launches", flush=True)
            for n in dict.fromkeys(names):
                print(f"- {n} ×{names.count(n)}: {origins.get(n, '')[:300]}")
        del m
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
