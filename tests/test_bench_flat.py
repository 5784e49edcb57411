"""bench/flat_probe.py (one flat trainable tensor per model, a measurement aid): the patched model computes the
plain model's loss, and the flat parameter's gradient holds the plain model's A and B gradients in order — eagerly
and compiled (AOTAutograd's traced forward and backward, where the split happens inside the graph)."""

from __future__ import annotations

import pytest
import torch
from conftest import bench_module, inputs, tiny_model

import unipeft
from unipeft import fused
from unipeft import layer as layer_mod
from unipeft import model as model_mod


@pytest.mark.parametrize("compiled", [False, True])
def test_flat_parameter_gives_the_plain_loss_and_gradients(compiled: bool, monkeypatch) -> None:
    probe = bench_module("flat_probe")
    monkeypatch.setattr(fused, "lora_weights", fused.lora_weights)  # (restored after: apply patches both)
    monkeypatch.setattr(model_mod.AdaptedModel, "_forward", model_mod.AdaptedModel._forward)
    monkeypatch.setattr(layer_mod.AdapterLayer, "_warm_lean", layer_mod.AdapterLayer._warm_lean)
    batch = inputs(batch=4, seq=48)  # enough rows for the merged form (and the sibling groups)

    def build():
        am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
        g = torch.Generator().manual_seed(3)
        for p in am.adapter_parameters("default").values():
            p.data = torch.randn(p.shape, generator=g) * 0.1
        return am

    plain = build()
    loss = plain(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    want = [p.grad for p in plain.adapter_parameters("default").values()]
    flat_model = build()
    flat = probe.apply(flat_model)
    assert [n for n, p in flat_model.named_parameters() if p.requires_grad] == ["_flat_lora"]
    run = torch.compile(flat_model, backend="aot_eager") if compiled else flat_model
    got_loss = run(**batch, labels=batch["input_ids"]).loss
    got_loss.backward()
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
    order = {id(p): i for i, p in enumerate(plain.adapter_parameters("default").values())}
    assert len(order) == len(want)
    torch.testing.assert_close(flat.grad, torch.cat([g.reshape(-1) for g in want]), rtol=1e-4, atol=1e-6)
