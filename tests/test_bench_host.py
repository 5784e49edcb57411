"""bench/host_probe.py on CPU: each phase's profile holds that phase's Python — backward's functions are profiled
in the thread that runs backward and not counted in forward's, the optimizer's in its own."""

from __future__ import annotations

import time

import torch
from conftest import bench_module
from transformers import LlamaConfig, LlamaForCausalLM

import unipeft


def _tiny_lora():
    """bench/host_probe.py, a tiny random Llama with LoRA on every projection, its trainable tensors and a batch."""
    probe = bench_module("host_probe")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=50)
    am = unipeft.attach(LlamaForCausalLM(cfg), "lora", r=4, alpha=8, targets=probe.SITES)
    return probe, am, [p for p in am.parameters() if p.requires_grad], torch.randint(0, 50, (2, 8))


def test_phases_profile_their_own_functions():
    probe, am, params, x = _tiny_lora()
    r = probe.probe(am, params, x, steps=2, top=400, sync=lambda: None)
    for phase in ("fwd", "bwd", "opt"):
        assert r[f"host_{phase}_ms"] > 0
    names = {phase: {f["fn"] for f in r[f"{phase}_cum"]} for phase in ("fwd", "bwd", "opt")}
    lora_backward = {n for n in names["bwd"] if n.startswith("fused.py:") and n.endswith(":backward")}
    assert lora_backward, "the LoRA autograd backward runs in the backward phase"
    assert not lora_backward & names["fwd"] and not lora_backward & names["opt"]
    assert any(n.startswith("fused.py:") and n.endswith(":forward") for n in names["fwd"])
    assert not any(n.startswith("fused.py:") and n.endswith(":forward") for n in names["bwd"])
    assert any("adam" in n for n in names["opt"]) and not any("adam" in n for n in names["fwd"] | names["bwd"])
    # after the probe no hook is left on the parameters: a plain backward still fills every gradient
    am(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in params)


def test_compiled_phases_profile_the_compiled_backward_and_wait_between_phases():
    """--compile --sync-phases: the compiled backward's Python is profiled in backward's thread (not in forward's),
    and each host-timed phase starts after a wait for the device (three per host-timed step)."""
    probe, am, params, x = _tiny_lora()
    waits = []

    def wait() -> None:  # a device that takes 0.5 s to catch up: no phase's host time may include it
        waits.append(1)
        time.sleep(0.5)

    r = probe.probe(torch.compile(am), params, x, steps=2, top=400, sync=wait, sync_phases=True)
    assert r["sync_phases"] and all(0 < r[f"host_{phase}_ms"] < 500 for phase in ("fwd", "bwd", "opt"))
    # 2 host-timed steps × 3 waits, the syncs around them (2), the synced steps (2 × 2), after profiling (1)
    assert len(waits) == 2 * 3 + 2 + 2 * 2 + 1
    compiled_bwd = lambda phase: {n for n in (f["fn"] for f in r[f"{phase}_cum"])  # noqa: E731
                                  if "compiled_function_backward" in n}
    assert compiled_bwd("bwd") and not compiled_bwd("fwd") and not compiled_bwd("opt")


def test_host_micro_times_every_piece_that_runs_here():
    """bench/host_micro.py on CPU: the LoRA pieces and their aten ops are timed (the Triton pieces need CUDA and are
    left out), and the single-thread switch is undone afterwards."""
    micro = bench_module("host_micro")
    rows = micro.main(["--rows", "8", "--d", "16", "--d-kv", "8", "--rank", "4", "--iters", "2", "--single-thread"])
    got = {r["piece"]: r["host_us"] for r in rows}
    assert {"floor_qkv", "group_qkv", "single_o", "floor_o", "plain_fn_o", "op_qkv", "op_qkv_one", "op_o", "mm",
            "zeros"} <= set(got)
    assert not {"merged_weights", "merged_weight", "lora_grads"} & set(got)
    assert all(v > 0 for v in got.values())
    assert torch.autograd.is_multithreading_enabled()
