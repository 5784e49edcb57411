"""Host time of a routed `generate` before its first kernel, merged model against unipeft with 32 adapters (any
machine; the CPU is what it measures).

A generate's work before the prefill's first kernel is exposed: the GPU has nothing queued yet. A routed call spends
part of it checking that the shared stacks still hold every adapter's weights (routed.slots → routed._fresh: the
version counter and identity of each stacked tensor, 7,168 for 32 adapters on 112 projections). This probe builds
a tiny-width Llama with the benchmark model's 16 layers (so the counts match and the arithmetic is negligible),
times 1-token static-cache generates and splits each into the lead (call → embedding's forward), the forward
(embedding → lm_head) and the tail; then times `_fresh` alone, with its tensors warm in the CPU's caches.

Usage:
    PYTHONPATH=src python3 bench/routed_lead_probe.py [--adapters 32] [--rows 32] [--named 32] --out lead.json
    (--adapters: adapters the model holds; --named: distinct adapters a call names, cycled over its --rows rows)
"""

from __future__ import annotations

import argparse
import json
import time
import timeit

import torch


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _median_ms(values: list[float]) -> float:
    return round(sorted(values)[len(values) // 2] * 1e3, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--named", type=int, default=0, help="distinct adapters per call (default: min(rows, adapters))")
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--out", default="routed_lead.json")
    args = ap.parse_args()
    from perf_vs_peft import _unipeft  # (the benchmark's adapted model: LoRA r=16 on every projection, n adapters)

    from unipeft import routed

    torch.set_num_threads(1)
    merged = _model()
    am = _unipeft(_model(), args.adapters).eval()
    named = args.named or min(args.rows, args.adapters)
    names = [f"a{k % named}" if k % named else "default" for k in range(args.rows)]
    x = torch.randint(0, 256, (args.rows, 4))
    marks: dict[str, float] = {}
    result: dict[str, object] = {"adapters": args.adapters, "rows": args.rows, "named": named,
                                 "torch": torch.__version__}
    for label, model, inner, kw in (("merged", merged, merged, {}),
                                    ("unipeft", am, am.model, {"adapter_names": names})):
        def first(*_) -> None:  # (a pre-hook that returns a value replaces the module's input)
            marks.setdefault("first", time.perf_counter())

        def last(*_) -> None:
            marks["last"] = time.perf_counter()

        hooks = (inner.model.embed_tokens.register_forward_pre_hook(first),
                 inner.lm_head.register_forward_hook(last))
        leads, forwards, tails = [], [], []
        for i in range(args.runs):
            marks.clear()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                               pad_token_id=0, cache_implementation="static", **kw)
            t1 = time.perf_counter()
            if i >= 2:
                leads.append(marks["first"] - t0)
                forwards.append(marks["last"] - marks["first"])
                tails.append(t1 - marks["last"])
        for h in hooks:
            h.remove()
        result[label] = dict(lead_ms=_median_ms(leads), forward_ms=_median_ms(forwards), tail_ms=_median_ms(tails))
        print(label, result[label], flush=True)
    slots = (x,)
    result["slots_warm_ms"] = round(timeit.timeit(lambda: routed.slots(am, names, slots, {}), number=50) / 50 * 1e3, 3)
    print("routed.slots (the freshness check and the slot tensor), warm caches:", result["slots_warm_ms"], "ms")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
