"""graph_layers on the GPU: are the replayed layers' loss and gradients the eager ones? (CPU tests cover the
bookkeeping with emulated replay; this checks real CUDA graph replay.)

Usage (GPU machine, harness carried as in perf_vs_peft.py; `--liger` needs the Liger-Kernel wheel):
    PYTHONPATH=src python3 bench/graph_check.py --harness .gpu_carry/bench [--liger] [--out graph_check.json]
On the harness model (bf16, LoRA r=16 on all 7 linears, B given non-zero values) each variant runs three optimizer
steps of two accumulated micro-batches (SGD) from the same weights: eager, eager again (the run-to-run noise of
non-deterministic kernels), and with the layers replayed from CUDA graphs. Reported per variant: each step's losses
and the relative L2 difference of all adapter gradients to the first eager run; graphs should differ from eager by
no more than eager differs from itself. Then the same for the accelerated base, for fp32 weights under bf16 autocast
(houlsby, whose trainable nn.Linear weights autocast casts), and a check that changing the adapters (merge, a second
adapter) records again instead of replaying a stale graph.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


def _run(h, make, graphed: bool, accel: bool, steps: int = 3, autocast: bool = False) -> dict:
    import contextlib

    import unipeft

    am = make()
    if accel:
        unipeft.accelerate(am, cuda_graphs=graphed)
    elif graphed:
        unipeft.graph_layers(am)
    params = [p for p in am.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    losses, grads = [], []
    for _ in range(steps):
        step_losses = []
        for _ in range(2):  # two micro-batches accumulate into .grad
            x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda", generator=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                loss = am(input_ids=x, labels=x).loss
            loss.backward()
            step_losses.append(float(loss.detach()))
        losses.append(step_losses)
        grads.append(torch.cat([p.grad.float().flatten() for p in params]))
        opt.step()
        opt.zero_grad(set_to_none=True)
    stack = am.model.__dict__.get("_unipeft_graphs")
    out = dict(losses=losses, grads=grads, captures=stack.captures if stack is not None else 0,
               layers_replayed=stack.replayed if stack is not None else 0)
    if accel:
        unipeft.accelerate(am, enable=False)
    del am, opt, params
    h.release()
    return out


def _compare(ref: dict, other: dict) -> dict:
    rel = [float((a - b).norm() / a.norm()) for a, b in zip(ref["grads"], other["grads"])]
    dl = max(abs(x - y) for a, b in zip(ref["losses"], other["losses"]) for x, y in zip(a, b))
    return dict(grad_rel_l2_per_step=[round(r, 6) for r in rel], max_loss_diff=round(dl, 6),
                losses=other["losses"], captures=other["captures"], layers_replayed=other["layers_replayed"])


def _state_changes(h) -> dict:
    """Replay must follow adapter changes: merge, then a second adapter, each checked against eager."""
    import unipeft

    torch.manual_seed(0)
    am = _adapted(h)
    unipeft.graph_layers(am)
    x = torch.randint(0, h.VOCAB, (2, 256), device="cuda")

    def both() -> tuple[float, float]:
        graphed = float(am(input_ids=x, labels=x).loss)
        unipeft.graph_layers(am, enable=False)
        eager = float(am(input_ids=x, labels=x).loss)
        unipeft.graph_layers(am)
        return graphed, eager

    out = {"lora": both()}
    am.merge("default")
    out["merged"] = both()
    am.unmerge()
    am.add("second", "lora", r=8, targets=SITES)
    with torch.no_grad():
        for n, p in am.named_parameters():
            if ".second." in n and n.endswith(".fn.up.weight"):
                p.normal_(0, 0.02)
    am.activate("second")
    out["second_adapter"] = both()
    am = None
    h.release()
    return {k: dict(graphed=round(g, 6), eager=round(e, 6), diff=round(abs(g - e), 6)) for k, (g, e) in out.items()}


def _adapted(h):
    import unipeft

    am = unipeft.attach(h.make_model(), "lora", r=16, alpha=32, targets=SITES)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in am.named_parameters():
            if p.requires_grad and n.endswith(".fn.up.weight"):  # LoRA's B starts at zero
                p.normal_(0, 0.01)
    return am


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--liger", action="store_true")
    ap.add_argument("--out", default="graph_check.json")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h

    import unipeft

    rows = {}
    for accel in ([False, True] if args.liger else [False]):
        tag = "accelerated" if accel else "plain"
        eager = _run(h, lambda: _adapted(h), False, accel)
        rows[f"{tag}_eager_again"] = _compare(eager, _run(h, lambda: _adapted(h), False, accel))
        rows[f"{tag}_graphed"] = _compare(eager, _run(h, lambda: _adapted(h), True, accel))
        rows[f"{tag}_eager_losses"] = eager["losses"]
        print(json.dumps({k: v for k, v in rows.items() if k.startswith(tag)}), flush=True)
    # fp32 weights under bf16 autocast, houlsby (trainable nn.Linear weights that autocast casts and caches)
    make = lambda: unipeft.attach(h.make_model(dtype=torch.float32), "houlsby")  # noqa: E731
    eager = _run(h, make, False, False, autocast=True)
    rows["autocast_houlsby_eager_again"] = _compare(eager, _run(h, make, False, False, autocast=True))
    rows["autocast_houlsby_graphed"] = _compare(eager, _run(h, make, True, False, autocast=True))
    print(json.dumps({k: v for k, v in rows.items() if k.startswith("autocast")}), flush=True)
    rows["state_changes"] = _state_changes(h)
    print(json.dumps(rows["state_changes"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print("| variant | max loss diff | grad rel L2 (per step) | layers replayed |\n|---|---|---|---|")
    for k, v in rows.items():
        if isinstance(v, dict) and "grad_rel_l2_per_step" in v:
            print(f"| {k} | {v['max_loss_diff']} | {v['grad_rel_l2_per_step']} | {v['layers_replayed']} |")


if __name__ == "__main__":
    main()
