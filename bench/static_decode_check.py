"""GPU check of two fixes of the twenty-first session, on a tiny bf16 Llama: DoRA's unmerge after the model moved to
the GPU, and routed static-cache decoding after an adapter's weights changed in place and then were replaced by new
Parameter objects (`load_state_dict(assign=True)`: the shared stacks must see the new objects).

Status: the DoRA part passes (max abs 1.9e-8 after merge → cuda → unmerge; the code before the twenty-first
session: a device error). The static-cache decode failed at its first generate until the twenty-second session
(bench/results/gpu_fix_check_1_*.json: "accessing tensor output of CUDAGraphs that has been overwritten by a
subsequent run"). Two causes, both fixed there (gpu_fix_check_2_*.json): torch 2.11's dynamo did not find the
slots under the int each layer holds in routed.CURRENT, whose keys were an int subclass, so the compiled decoding
traced the per-routing path instead of the shared stacks; and that path cached row indices made inside the trace
(layer.Routing), which the next CUDA-graph replay overwrote. Replacing adapter B's Parameters (A and B scaled by
2, so ΔW by 4) must change exactly the rows routed to "b".

Since the twenty-third session it also checks the two-stream projections of a CUDA-graphed decode
(`graphed_two_streams`): the op ran, and an fp32 static-cache generate gives the eager generate's tokens.

Usage (GPU machine): PYTHONPATH=src NAMES=a,b,__base__,b python3 bench/static_decode_check.py
"""

from __future__ import annotations

import json
import os

import torch
import transformers as T

import unipeft


def _nudge(am, name: str) -> None:
    with torch.no_grad():
        for p in am.adapter_parameters(name).values():
            p.add_(0.05 * torch.randn_like(p))


def dora_unmerge_after_move(cfg) -> dict:
    model = T.LlamaForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    am = unipeft.attach(model, "dora")
    _nudge(am, "default")
    try:
        am.merge()
        am.to("cuda")
        am.unmerge()
        plain = am.detach().cpu()
        return {"dora_unmerge_after_move_max_abs": max((plain.state_dict()[k] - before[k]).abs().max().item()
                                                       for k in before)}
    except Exception as e:  # (a measurement: report, do not stop)
        return {"dora_error": f"{type(e).__name__}: {str(e)[:150]}"}


def routed_static_decode(cfg, names: list[str]) -> dict:
    am = unipeft.attach(T.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval(), "lora", name="a")
    am.add("b", "lora")
    _nudge(am, "a")
    _nudge(am, "b")
    ids = torch.randint(0, cfg.vocab_size, (len(names), 16), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=0, cache_implementation="static")
    out, stage = {}, "first"
    try:
        with torch.no_grad():
            first = am.generate(input_ids=ids, adapter_names=names, **kw)
            stage = "in-place change"
            for p in am.adapter_parameters("b").values():
                p.mul_(-3.0)
            second = am.generate(input_ids=ids, adapter_names=names, **kw)
            out["inplace_rows_changed"] = [bool((a != b).any()) for a, b in zip(first, second)]
            stage = "assign"
            new = {k: torch.nn.Parameter(2.0 * v) for k, v in am.state_dict().items() if ".adapters.b." in k}
            am.load_state_dict(new, strict=False, assign=True)
            third = am.generate(input_ids=ids, adapter_names=names, **kw)
            out["assign_rows_changed"] = [bool((a != b).any()) for a, b in zip(second, third)]
    except Exception as e:  # (a measurement: report, do not stop)
        out["failed_at"], out["error"] = stage, f"{type(e).__name__}: {str(e)[:300]}"
    return out


def graphed_two_streams(cfg, names: list[str]) -> dict:
    """The CUDA-graphed decode's two-stream projections (routed_kernels.routed_linear): how many times the op ran
    its GEMM and how many of those runs forked to the side stream (both only while the graphs are warmed up and
    recorded: replays run no Python), and whether a static-cache generate in fp32 gives the tokens of the eager
    dynamic-cache generate (the per-row bmm reference) in every row. (gpu_fix_check_4/5.json, from the first
    version, count the GEMM runs only, as "two_stream_op_calls".)"""
    from unipeft import overlap, routed_kernels

    am = unipeft.attach(T.LlamaForCausalLM(cfg).to("cuda").eval(), "lora", name="a")
    am.add("b", "lora")
    _nudge(am, "a")
    _nudge(am, "b")
    ids = torch.randint(0, cfg.vocab_size, (len(names), 16), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
              pad_token_id=0, adapter_names=names)
    calls, real = [], routed_kernels._linear
    routed_kernels._linear = lambda *a: calls.append(1) or real(*a)
    forks, real_lane = [], overlap._lane

    def counted_lane(t, capture=False):
        lane = real_lane(t, capture)
        if lane is not None and capture:
            forks.append(1)
        return lane
    overlap._lane = counted_lane
    out = {}
    try:
        with torch.no_grad():
            eager = am.generate(input_ids=ids, **kw)
            static = [am.generate(input_ids=ids, cache_implementation="static", **kw) for _ in range(3)]
        out["routed_linear_calls"], out["side_stream_forks"] = len(calls), len(forks)
        out["static_equals_eager_rows"] = [bool(torch.equal(static[-1][i], eager[i])) for i in range(len(names))]
        out["static_runs_agree"] = all(torch.equal(s, static[0]) for s in static)
    except Exception as e:  # (a measurement: report, do not stop)
        out["two_stream_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        routed_kernels._linear, overlap._lane = real, real_lane
    return out


def main() -> None:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128)
    out = dora_unmerge_after_move(cfg)
    out.update(routed_static_decode(cfg, os.environ.get("NAMES", "a,b,__base__,b").split(",")))
    out.update(graphed_two_streams(cfg, os.environ.get("NAMES", "a,b,__base__,b").split(",")))
    print(json.dumps(out, indent=1))
    with open(os.path.join(os.environ.get("OUT", "."), "gpu_fix_check.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
