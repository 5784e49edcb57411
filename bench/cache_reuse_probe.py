"""What a static-cache generate pays for its fresh KV cache: transformers against one cache kept between generates.

transformers 5 builds a new StaticCache at every static-cache `generate` (`_prepare_static_cache`). Its tensors are
static inputs of the compiled decoding steps, so Inductor's CUDA-graph trees record a decoding step again whenever
the caching allocator hands the new cache other addresses (bench/graph_churn_probe.py: one recording per generate
for both models, `churn_4_slot_buffer_reasons.json`). Recording a step runs its Python — for unipeft the routed
op of 112 projections — under capture. This probe times generates of the merged model and of unipeft (32 adapters,
one per row) in turn, each (a) as transformers does it (`cache_implementation="static"`) and (b) with one
StaticCache of the same size passed as `cache=` and reset before each generate, so its addresses stay put; per
generate, the CUDA-graph tree's recordings and replays.

Usage (GPU machine):
    PYTHONPATH=src python3 bench/cache_reuse_probe.py --harness .gpu_carry/bench --out reuse.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--rounds", type=int, default=4, help="rounds in turn (the first compiles, not counted)")
    ap.add_argument("--out", default="cache_reuse.json")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import peft_baseline as h
    from graph_churn_probe import Counts, _patch, timed_generate
    from perf_vs_peft import _nonzero_b, _unipeft
    from transformers import StaticCache

    counts = Counts()
    _patch(counts, False)
    h.B, h.T = 32, 256
    names = [f"a{k}" if k else "default" for k in range(32)]
    merged = h.make_model().eval()
    am = _unipeft(h.make_model().eval(), 32).eval()
    _nonzero_b(am)
    x = torch.randint(0, h.VOCAB, (32, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    caches = {label: StaticCache(config=model.config, max_cache_len=256 + 32)
              for label, model in (("merged", merged), ("unipeft", am.model))}
    # (the cache's keyword: `cache` in recent transformers 5 releases, `past_key_values` before)
    word = "cache" if "cache" in inspect.signature(merged.forward).parameters else "past_key_values"
    rows: list[dict] = []
    outputs: dict[str, torch.Tensor] = {}

    def generate(label: str, model, mix, kept: bool, i: int) -> None:
        kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        if kept:
            caches[label].reset()
            kw[word] = caches[label]
        else:
            kw["cache_implementation"] = "static"
        if mix is not None:
            kw["adapter_names"] = mix
        ms, counted, out = timed_generate(model, x, counts, kw)
        case = f"{label}_{'kept' if kept else 'fresh'}"
        rows.append(dict(round=i, case=case, ms=ms, **counted))
        outputs.setdefault(case, out[:, 256:].cpu())
        print(json.dumps(rows[-1]), flush=True)

    for i in range(args.rounds):
        for kept in (False, True):
            for label, model, mix in (("merged", merged, None), ("unipeft", am, names)):
                for _ in range(3):
                    generate(label, model, mix, kept, i)
    summary = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        ms = sorted(r["ms"] for r in rows if r["case"] == case and r["round"] > 0)
        rec = [r.get("recorded", 0) for r in rows if r["case"] == case and r["round"] > 0]
        summary[case] = dict(median_ms=ms[len(ms) // 2], recorded_per_generate=round(sum(rec) / len(rec), 2))
    for kind in ("fresh", "kept"):
        ours, theirs = summary[f"unipeft_{kind}"]["median_ms"], summary[f"merged_{kind}"]["median_ms"]
        summary[f"ratio_{kind}"] = round(ours / theirs, 4)
    summary["same_tokens"] = {label: bool(torch.equal(outputs[f"{label}_fresh"], outputs[f"{label}_kept"]))
                              for label in ("merged", "unipeft")}
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, summary=summary), f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
