"""Why a static-cache generate with 32 adapters is slower in its first timed rounds than later (`perf_vs_peft.py
--only decode`: the first counted round 1.46–1.83× the merged model, the next ones 1.32–1.38×, on four hosts).

transformers compiles a static-cache generate's decoding steps in mode "reduce-overhead": Inductor's CUDA-graph
trees warm each step up eagerly, record it, then replay it; a step whose inputs break the recorded graph's invariants
(a static input's address, a live output) is recorded again. This probe times generates of the merged model and of
unipeft (32 adapters, one per row, shared stacks) in the order perf_vs_peft uses — in turn, three per case and round
— and counts, per generate, the tree's eager warm-ups, recordings and replays, with the reasons it logs for each
re-recording. Then unipeft alone, then a new mix of adapters. A generate that records or warms up again pays for it
in time; the counts say which.

Usage (GPU machine):
    PYTHONPATH=src python3 bench/graph_churn_probe.py --harness .gpu_carry/bench [--reasons] --out churn.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import time

import torch


class Counts:
    """Per generate: the CUDA-graph tree's warm-ups (eager runs), recordings and replays, and re-record reasons."""

    def __init__(self) -> None:
        self.now: collections.Counter = collections.Counter()
        self.reasons: collections.Counter = collections.Counter()

    def take(self) -> dict:
        out = dict(self.now, reasons=dict(self.reasons.most_common(4)))
        self.now, self.reasons = collections.Counter(), collections.Counter()
        return out


def _patch(counts: Counts, reasons: bool) -> None:
    from torch._inductor import cudagraph_trees as ct

    manager = ct.CUDAGraphTreeManager
    for name, key in (("record_function", "recorded"), ("run_eager", "warmup"), ("execute_node", "replayed")):
        inner = getattr(manager, name)

        def wrapped(self, *args, _inner=inner, _key=key, **kwargs):
            counts.now[_key] += 1
            return _inner(self, *args, **kwargs)

        setattr(manager, name, wrapped)
    if not reasons:
        return

    class Reasons(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "Re-recording" in message:
                counts.now["rerecord_logged"] += 1
                counts.reasons[message.split("reason=", 1)[-1][:160]] += 1

    logger = logging.getLogger("torch._inductor.cudagraph_trees")
    logger.addHandler(Reasons())
    logger.setLevel(logging.DEBUG)


def timed_generate(model, x: torch.Tensor, counts: Counts, kw: dict):
    """One synced greedy generate of `x`: (ms, the tree's counts during it, the output)."""
    counts.take()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) * 1e3, 2), counts.take(), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--rounds", type=int, default=5, help="rounds in turn (perf_vs_peft drops the first two)")
    ap.add_argument("--reasons", action="store_true", help="log why each step is recorded again (the tree then "
                    "builds a reason string for every mismatch it checks: slower steps)")
    ap.add_argument("--out", default="graph_churn.json")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h
    from perf_vs_peft import _nonzero_b, _unipeft  # (the benchmark's own 32-adapter model, as its decode case)

    counts = Counts()
    _patch(counts, args.reasons)
    h.B, h.T = 32, 256
    names = [f"a{k}" if k else "default" for k in range(32)]
    merged = h.make_model().eval()
    am = _unipeft(h.make_model().eval(), 32).eval()
    _nonzero_b(am)
    am.prepare_routing()
    x = torch.randint(0, h.VOCAB, (32, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    rows: list[dict] = []

    def generate(label: str, model, mix, phase: str) -> None:
        kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, cache_implementation="static")
        if mix is not None:
            kw["adapter_names"] = mix
        ms, counted, _ = timed_generate(model, x, counts, kw)
        row = dict(phase=phase, case=label, ms=ms, **counted)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for i in range(args.rounds):
        for label, model, mix in (("merged", merged, None), ("unipeft", am, names)):
            for _ in range(3):
                generate(label, model, mix, f"in_turn_{i}")
    for _ in range(5):
        generate("unipeft", am, names, "alone")
    mix = names[1:] + names[:1]
    for _ in range(3):
        generate("unipeft", am, mix, "new_mix")
    for _ in range(2):
        generate("merged", merged, None, "after")
        generate("unipeft", am, mix, "after")
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"{'phase':12} {'case':8} {'ms':>8} {'warmup':>7} {'rec':>5} {'replay':>7}  reasons")
    for r in rows:
        print(f"{r['phase']:12} {r['case']:8} {r['ms']:8.1f} {r.get('warmup', 0):7} {r.get('recorded', 0):5} "
              f"{r.get('replayed', 0):7}  {list(r['reasons'])[:1]}")


if __name__ == "__main__":
    main()
