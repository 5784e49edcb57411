"""Why does the compiled LoRA backward copy k_proj's gradient in a kernel of its own, where the floor does not?

In the compiled step, each projection's output gradient reaches the fused LoRA backward as a (B, T, H·D) view of a
tensor laid out (B, H, T, D) (attention's and RoPE's backward), so `gy.reshape(-1, d)` is a copy. In the frozen
floor that copy is fused into the kernel that computes the gradient (RoPE's backward for q and k). In the LoRA step
it is fused for q but not for k: a kernel of its own, ~15.5 µs per layer, 0.25 ms per step of the 953M benchmark
model (`triton_poi_fused__unsafe_view_clone_transpose_view_*` in profile_compiled_10_full.txt). This probe compiles
a LoRA train step of the harness model (2 layers, 8 × 1024 tokens) under several Inductor settings and lists the
kernels that do nothing but such a copy in each backward, to find the heuristic that decides it — and, in its last
variant, whether giving the grads kernel views of its own (`distinct_kernel_views`) lets the copy fuse.

What it found (`fusion_1.json`, `fusion_2.json`, `fusion_3_dx_first.json`): only `realize_opcount_threshold=1000`
removes the copy; distinct views do not, nor does taking the dx GEMMs before the grads kernel alone. The
scheduler's log (`fusion_log_k_copy.txt`, from `bench/codegen_dump.py` under TORCH_LOGS=+fusion) shows why: k's
RoPE backward is a buffer of its own in both steps (its expression passes the opcount threshold), and the scheduler
fuses the transposing copy into it by reordering loops — which works in the floor, where the copy is a 4-D
(B, T, H, D) loop, and not in LoRA's step, where it was an N × d loop ("no shared data"). The N × d loop came from
Inductor's rule for a tensor read by aten.mm and something else: it fixes the view's strides, copying it as the
view's shape. The fix (siblings._flexible_mm): the traced group backward takes its dx GEMMs first, as custom ops
tagged flexible_layout, so the copy is realized in its own shape and fused; `fusion_4_flexible_mm.json`: no
copy-only kernel left.

Usage (GPU machine, harness carried as in perf_vs_peft.py):
    PYTHONPATH=src python3 bench/fusion_probe.py --harness .gpu_carry/bench [--out fusion.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys

SITES = ["q", "k", "v", "o", "gate", "up", "down"]

#: Inductor settings tried, each against the default (only those the installed torch has are applied); the last
#: variant changes the traced graph instead (`patched_grads`)
VARIANTS = (("default", {}), ("opcount_1000", {"realize_opcount_threshold": 1000}),
            ("reads_100", {"realize_reads_threshold": 100}), ("acc_reads_100", {"realize_acc_reads_threshold": 100}),
            ("aggressive_fusion", {"aggressive_fusion": True}),
            ("no_loop_ordering", {"loop_ordering_after_fusion": False}),
            ("distinct_kernel_views", {}))


def distinct_views(tensors: list) -> list:
    """Each tensor as a new view of itself (`as_strided` with its own shape and strides: a separate node in a traced
    graph, same memory). The `distinct_kernel_views` variant passes the grads kernel these instead of the
    gradients the dx GEMMs read, so that no view node of a gradient has two consumers — as in the floor, whose
    only consumer of k's gradient is its dx GEMM (a lead on why the floor's copy is fused and LoRA's is not)."""
    return [None if t is None else t.as_strided(t.shape, t.stride()) for t in tensors]


@contextlib.contextmanager
def patched_grads(kernels):
    """Within it, `kernels.lora_grads` receives `distinct_views` of its gradients (the product's code unchanged)."""
    real = kernels.lora_grads
    kernels.lora_grads = lambda gs, *rest: real(distinct_views(gs), *rest)
    try:
        yield
    finally:
        kernels.lora_grads = real


def standalone_copies(code: str) -> list[str]:
    """Names of the generated kernels launched in `code` that only transpose-copy a tensor: Inductor names a
    pointwise kernel after the ops it fuses, so one whose name holds clone and transpose but no arithmetic (RoPE's
    cos/sin, an add) did nothing else."""
    names = set(re.findall(r"\b(triton_poi_fused_\w+?)\.run\(", code))
    arithmetic = ("cos", "sin", "add", "mul", "silu", "sub", "div")
    return sorted(n for n in names if "clone" in n and "transpose" in n
                  and not any(op in n.split("fused_", 1)[1] for op in arithmetic))


def _step(model, x) -> None:
    model(input_ids=x, labels=x).loss.backward()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h
    import torch
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    import unipeft
    from unipeft import kernels

    h.L = 2
    x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
    rows = []
    for name, settings in VARIANTS:
        if args.only and name not in args.only.split(","):
            continue
        settings = {k: v for k, v in settings.items() if hasattr(inductor_config, k)}
        torch._dynamo.reset()
        am = unipeft.attach(h.make_model(), "lora", r=16, alpha=32, targets=SITES)
        graph_change = patched_grads(kernels) if name == "distinct_kernel_views" else contextlib.nullcontext()
        with inductor_config.patch(settings), graph_change:
            codes = run_and_get_code(_step, torch.compile(am), x)[1]
        rows.append(dict(variant=name, settings=settings, standalone_copies=standalone_copies(codes[-1])))
        print(json.dumps(rows[-1]), flush=True)
        del am
        torch.cuda.empty_cache()
    print("| variant | copy-only kernels in backward |\n|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {', '.join(r['standalone_copies']) or 'none'} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=dict(torch=torch.__version__, gpu=torch.cuda.get_device_name()), rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
