"""Every preset on a GPU in bf16: forward + backward, merge error, prefix/prompt generation with the KV cache.

Usage (on the GPU machine): PYTHONPATH=src python3 bench/engine_smoke.py [--out results.json]
Prints a table and writes JSON. It checks that the engine runs on the GPU stack (CUDA, bf16, the image's torch and
transformers); speed targets belong to the performance benchmarks.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers as T

import unipeft


def model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, intermediate_size=512, attn_implementation="sdpa")
    return T.LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="engine_smoke.json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(0, 1000, (4, 64), device=device)
    rows = []
    for preset in unipeft.list_presets():
        m = model(device)
        am = unipeft.attach(m, preset)
        with torch.no_grad():
            for p in am.adapter_parameters("default").values():
                p.add_(torch.randn_like(p) * 0.01)
        t0 = time.perf_counter()
        am.train()
        loss = am(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = all(p.grad is not None for p in am.adapter_parameters("default").values())
        am.eval()
        merge_err = None
        with torch.no_grad():
            if am.recipes["default"].mergeable:
                a = am(input_ids=ids).logits.float()
                am.merge()
                b = am(input_ids=ids).logits.float()
                merge_err = float((a - b).abs().max())
                am.unmerge()
            gen = am.generate(input_ids=ids[:2, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append({"preset": preset, "loss": round(float(loss), 4), "grads": grads,
                     "merge_max_abs_diff_bf16": merge_err, "generated": list(gen.shape),
                     "seconds": round(time.perf_counter() - t0, 3)})
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "torch": torch.__version__, "transformers": T.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)
    print(f"{info['device']} torch {info['torch']} transformers {info['transformers']}")
    print(f"{'preset':<16}{'loss':>8}{'grads':>7}{'merge diff (bf16)':>19}{'generate':>12}")
    for r in rows:
        md = "-" if r["merge_max_abs_diff_bf16"] is None else f"{r['merge_max_abs_diff_bf16']:.3g}"
        print(f"{r['preset']:<16}{r['loss']:>8}{str(r['grads']):>7}{md:>19}{str(r['generated']):>12}")


if __name__ == "__main__":
    main()
