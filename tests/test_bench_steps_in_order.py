"""bench/steps_in_order.py on CPU: every step is timed, the median skips the warm-up, full collections are found."""

from __future__ import annotations

import gc

import torch
from conftest import VOCAB, bench_module, tiny_model

import unipeft


def test_time_steps_times_each_step_and_finds_the_full_collection():
    probe = bench_module("steps_in_order")
    am = unipeft.attach(tiny_model("llama"), "lora", r=4, alpha=8, targets=probe.SITES)
    params = [p for p in am.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    calls = []

    def collect_in_third_step(*_) -> None:  # (a pre-hook's non-None return value would replace the inputs)
        if len(calls) == 2:
            gc.collect()

    am.model.register_forward_pre_hook(collect_in_third_step)
    am.model.register_forward_hook(lambda *_: calls.append(1))
    r = probe.time_steps(am, params, torch.randint(0, VOCAB, (2, 8)), steps=5, sync=lambda: None, warm=3)
    assert len(r["steps_ms"]) == 5 and all(t > 0 for t in r["steps_ms"])
    assert r["median_ms"] == (r["steps_ms"][3] + r["steps_ms"][4]) / 2, "the median of the steps after warm-up"
    assert 2 in r["gen2_steps"], "the step whose forward ran gc.collect() is marked"
    assert any(not torch.equal(a, p) for a, p in zip(before, params)), "the optimizer stepped the adapters"
