"""QLoRA on the GPU: a bitsandbytes NF4/FP4 base (double-quantized, bf16 compute) vs the bf16 base, LoRA r=16 on all 7
linears, same harness model as the performance issue (peft_baseline.py), contenders timed one after another in one
process (each one's references deleted first so its peak memory is its own).

Usage (on the GPU machine; carry the harness and the bitsandbytes wheel):
    PYTHONPATH=src python3 bench/qlora_bench.py --harness .gpu_carry/bench --out qlora.json
Reports step time and peak memory (vs bf16 LoRA with our fused path; target: QLoRA ≤ 1.10× its time), bytes per
quantized weight and for the whole model, peft's QLoRA on the same quantized base, and the max abs logit difference
between the unmerged quantized + adapter model and `merge_dequantized()`'s plain bf16 model.

    [--repeats K]   then bf16 LoRA and NF4 QLoRA (double quant) timed in turn for K rounds, the NF4 model once with
                    sibling groups (q/k/v and gate/up as one node each, the default) and once with UNIPEFT_GROUPS=0:
                    per-round ratios to bf16 LoRA and their medians (drift between rounds hits all three); and
                    once without the 4-bit weight kernel (UNIPEFT_Q4_KERNEL=0)
    [--squeeze C:H] then K rounds more with the process pinned to C cores beside H busy loops (a slow host's CPU)
    [--q4-tile bm,bn,warps,rows]  the 4-bit kernel's variant (kernels_q4.TILE; bench/q4_probe.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

SITES = ["q", "k", "v", "o", "gate", "up", "down"]
FP32_STATES = "QLORA_BENCH_FP32_STATES"  # (case markers, not unipeft switches)
DECODED_FIRST = "QLORA_BENCH_DECODED_FIRST"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default=".gpu_carry/bench")
    ap.add_argument("--out", default="qlora.json")
    ap.add_argument("--kinds", default="nf4,fp4,nf4-nodq", help="which 4-bit bases to time (nf4-nodq: no double quant)")
    ap.add_argument("--no-peft", action="store_true", help="skip peft's QLoRA")
    ap.add_argument("--repeats", type=int, default=0, help="then bf16 / NF4 groups / NF4 no groups in turn, K rounds")
    ap.add_argument("--squeeze", default="", help="CORES:HOGS: as many rounds again on a squeezed CPU")
    ap.add_argument("--q4-tile", default="", help="the 4-bit kernel's bm,bn,warps,rows (kernels_q4.TILE)")
    args = ap.parse_args()
    if args.q4_tile:
        from unipeft import kernels_q4

        bm, bn, warps, rows = args.q4_tile.split(",")
        kernels_q4.TILE.update(bm=int(bm), bn=int(bn), warps=int(warps), rows=rows == "1")
    sys.path.insert(0, args.harness)
    import bitsandbytes
    import peft
    import peft_baseline as h
    import transformers

    import unipeft
    from unipeft import quant

    meta = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                bitsandbytes=bitsandbytes.__version__, gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                H=h.H, L=h.L, I=h.I, B=h.B, T=h.T, q4_tile=args.q4_tile)
    print(json.dumps(meta), flush=True)
    rows = []

    def trainable(m):
        return [p for p in m.parameters() if p.requires_grad]

    m = h.make_model()
    am = unipeft.attach(m, "lora", r=16, alpha=32, targets=SITES)
    rows.append(h.time_train("unipeft_lora_r16_bf16", am, trainable(am)))
    del m, am
    h.release()
    for kind, dq in [(k.split("-")[0], not k.endswith("-nodq")) for k in args.kinds.split(",")]:
        m = quant.quantize(h.make_model(), kind, double_quant=dq, compute_dtype=torch.bfloat16)
        h.release()
        fp = quant.footprint(m)
        am = unipeft.attach(m, "lora", r=16, alpha=32, targets=SITES)
        row = h.time_train(f"unipeft_qlora_{kind}{'' if dq else '_no_double_quant'}_r16", am, trainable(am))
        row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in fp.items()})
        rows.append(row)
        if kind == "nf4" and dq:
            torch.manual_seed(1)
            with torch.no_grad():
                for p in trainable(am):
                    p.add_(torch.randn_like(p) * 0.01)
                x = torch.randint(0, h.VOCAB, (2, 128), device="cuda")
                unmerged = am(input_ids=x).logits.float()
                plain = am.merge_dequantized()
                merged = plain(input_ids=x).logits.float()
            rows.append({"case": "merge_dequantized_nf4", "max_abs_logit_diff": float((merged - unmerged).abs().max()),
                         "logit_scale": float(unmerged.abs().max())})
            print(json.dumps(rows[-1]), flush=True)
            del plain
        del m, am
        h.release()
    if not args.no_peft:
        m = quant.quantize(h.make_model(), "nf4", double_quant=True, compute_dtype=torch.bfloat16)
        h.release()
        pm = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, target_modules=h.TARGETS, lora_dropout=0.0))
        rows.append(h.time_train("peft_qlora_nf4_r16", pm, trainable(pm)))
        del m, pm
        h.release()
    if args.repeats:
        rows += in_turn(h, args.repeats, args.squeeze)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    ref = rows[0]
    print("| case | ms | vs bf16 LoRA | peak GiB | vs bf16 | bytes / quantized weight | bytes / param (model) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "step_ms" not in r:
            continue
        print(f"| {r['case']} | {r['step_ms']} | {r['step_ms'] / ref['step_ms']:.3f} | {r['peak_gib']} | "
              f"{r['peak_gib'] / ref['peak_gib']:.3f} | {r.get('bytes_per_quantized_weight', '')} | "
              f"{r.get('bytes_per_parameter', '')} |")


def _groups_agree(h, model, params) -> dict:
    """One step's loss and adapter gradients on the NF4 model with sibling groups and without (bf16, same batch):
    the largest relative difference (norm) over the adapter tensors — the groups' check on the GPU."""
    import os

    torch.manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.01)  # B starts at zero: give every term a value
    x = torch.randint(0, h.VOCAB, (h.B, h.T), device="cuda")
    got = {}
    for groups in ("1", "0"):
        os.environ["UNIPEFT_GROUPS"] = groups
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        got[groups] = (float(loss), [p.grad.float().clone() for p in params])
        for p in params:
            p.grad = None
    os.environ["UNIPEFT_GROUPS"] = "1"
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(got["1"][1], got["0"][1])]
    row = {"case": "nf4_groups_vs_alone", "loss_groups": got["1"][0], "loss_alone": got["0"][0],
           "max_rel_grad_diff": max(rel), "median_rel_grad_diff": sorted(rel)[len(rel) // 2]}
    print(json.dumps(row), flush=True)
    return row


def in_turn(h, k: int, squeeze_spec: str = "") -> list[dict]:
    """bf16 LoRA and NF4 QLoRA — as is, without sibling groups, without the 4-bit weight kernel, and with its weights
    dequantized into fp32 and cast (their quant states set to fp32: the path before quantize() recorded the compute
    dtype; the kernel then stays off, as it needs the two dtypes equal), and with the double-quantized absmax
    decoded by bitsandbytes before the kernel instead of in it — timed in turn
    for k rounds, the NF4 cases in alternating order (both models on the GPU together, so these rows' peak memory is
    not a case's own). The switches are read at every eager call. With `squeeze_spec` ("CORES:HOGS"), k more rounds
    with the process pinned to CORES cores beside HOGS busy loops (bench/spin_probe.py's `squeezed`): a slow or
    shared host's CPU, where host time per step shows."""
    import os

    import unipeft
    from unipeft import quant

    bf16 = unipeft.attach(h.make_model(), "lora", r=16, alpha=32, targets=SITES)
    nf4 = unipeft.attach(quant.quantize(h.make_model(), "nf4", double_quant=True, compute_dtype=torch.bfloat16),
                         "lora", r=16, alpha=32, targets=SITES)
    h.release()
    params = {id(m): [p for p in m.parameters() if p.requires_grad] for m in (bf16, nf4)}
    rows = [_groups_agree(h, nf4, params[id(nf4)])]
    cases = (("bf16", bf16, {}), ("nf4_groups", nf4, {}), ("nf4_no_groups", nf4, {"UNIPEFT_GROUPS": "0"}),
             ("nf4_no_q4_kernel", nf4, {"UNIPEFT_Q4_KERNEL": "0"}), ("nf4_fp32_states", nf4, {FP32_STATES: "1"}),
             ("nf4_absmax_decoded_first", nf4, {DECODED_FIRST: "1"}))
    in_kernel = quant._kernel_absmax
    states = [m.weight.quant_state for m in nf4.modules() if quant.is_quantized(m)]
    from spin_probe import squeezed

    for squeeze in (None, squeeze_spec) if squeeze_spec else (None,):
        ratios = {name: [] for name, _, _ in cases[1:]}
        for i in range(k):
            times = {}
            order = cases if i % 2 == 0 else (cases[0], *cases[:0:-1])  # the NF4 cases in alternating order
            for name, model, env in order:
                os.environ.update(env)
                for st in states:  # FP32_STATES: dequantize into fp32 and cast, as before quantize recorded bf16
                    st.dtype = torch.float32 if FP32_STATES in env else torch.bfloat16
                # DECODED_FIRST: the double-quantized absmax decoded by bitsandbytes before the kernel (as before)
                quant._kernel_absmax = (lambda st: quant._decoded_absmax(st).float()) if DECODED_FIRST in env \
                    else in_kernel
                with squeezed(squeeze):
                    row = h.time_train(f"in_turn_{name}_{i}{'_squeezed' if squeeze else ''}", model,
                                       params[id(model)])
                for key in env:
                    os.environ.pop(key)
                rows.append(row)
                times[name] = row["step_ms"]
            for name in ratios:
                ratios[name].append(round(times[name] / times["bf16"], 4))
        summary = {"case": "in_turn_qlora_over_bf16_lora", "squeeze": squeeze or ""}
        for name, rs in ratios.items():
            summary[name] = {"ratios": rs, "median": sorted(rs)[len(rs) // 2]}
        rows.append(summary)
        print(json.dumps(summary), flush=True)
    quant._kernel_absmax = in_kernel
    del bf16, nf4
    h.release()
    return rows


if __name__ == "__main__":
    main()
