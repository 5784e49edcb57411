"""The fused LoRA paths (fused.py) against the reference path (UNIPEFT_FUSED=0): outputs and gradients, single
adapter and per-row routed mixed batches, fp32 on CPU. Speed lives in bench/perf_vs_peft.py, not here."""

from __future__ import annotations

import pytest
import torch
from conftest import inputs, output_of, tiny_model
from test_engine import randomize

import unipeft
from unipeft import fused


def _run(am, monkeypatch, flag: str, **kwargs):
    monkeypatch.setenv("UNIPEFT_FUSED", flag)
    am.zero_grad(set_to_none=True)
    out = output_of(am(**inputs(batch=4), **kwargs))
    (out.float() ** 2).mean().backward()
    grads = {k: p.grad.clone() for n in am.recipes for k, p in am.adapter_parameters(n).items() if p.grad is not None}
    return out.detach(), grads


def _same(am, monkeypatch, **kwargs) -> None:
    ref_out, ref_grads = _run(am, monkeypatch, "0", **kwargs)
    out, grads = _run(am, monkeypatch, "1", **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("preset", ["lora", "rslora"])
def test_fused_lora_matches_reference(family: str, preset: str, monkeypatch) -> None:
    targets = ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else None  # whole Conv1D modules on GPT-2
    am = unipeft.attach(tiny_model(family), preset, **({"targets": targets} if targets else {}))
    randomize(am)
    am.train()
    wrappers = list(am._wrappers.values())
    _same(am, monkeypatch)
    assert all(w._plan()[2] for w in wrappers), "every LoRA projection took the fused path"


def test_fused_routed_mixed_batch_matches_reference(monkeypatch) -> None:
    am = unipeft.attach(tiny_model("llama"), "lora", r=4)
    am.add("b", "lora", r=2, alpha=8)  # another rank and scale: padded and folded into the stacks
    am.add("c", "lora", r=4, targets=["q", "v"])  # sites on fewer modules: other rows get the zero slot
    for n in am.recipes:
        randomize(am, n, seed=len(n))
    names = ["b", "__base__", "default", "c"]
    _same(am, monkeypatch, adapter_names=names)
    monkeypatch.setenv("UNIPEFT_FUSED", "1")
    with torch.no_grad():  # cached stacks follow in-place weight changes (optimizer steps)
        before = output_of(am(**inputs(batch=4), adapter_names=names))
        next(iter(am.adapter_parameters("b").values())).add_(1.0)
        after = output_of(am(**inputs(batch=4), adapter_names=names))
        monkeypatch.setenv("UNIPEFT_FUSED", "0")
        reference = output_of(am(**inputs(batch=4), adapter_names=names))
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-6)


def test_paths_the_fused_code_must_not_take() -> None:
    """DoRA, dropout while training, learned scales and fused-projection chunks stay on the reference path."""
    cases = [("dora", {}), ("lora", {"dropout": 0.1}), ("lora", {"learn_scale": True})]
    for preset, kw in cases:
        am = unipeft.attach(tiny_model("llama"), preset, **kw).train()
        assert not any(w._plan()[2] for w in am._wrappers.values()), (preset, kw)
    am = unipeft.attach(tiny_model("gpt2"), "lora").train()  # q/v chunks of c_attn
    assert not any(w._plan()[2] for w in am._wrappers.values())
    am = unipeft.attach(tiny_model("llama"), "lora", dropout=0.1).eval()  # dropout is the identity in eval
    assert all(w._plan()[2] for w in am._wrappers.values())
    assert fused.enabled()


def test_fused_under_autocast_matches_reference(monkeypatch) -> None:
    am = unipeft.attach(tiny_model("llama"), "lora")
    randomize(am)
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("UNIPEFT_FUSED", flag)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[flag] = output_of(am(**inputs())).float()
    torch.testing.assert_close(outs["1"], outs["0"], rtol=2e-2, atol=2e-2)
