"""Every preset on the real shipped models: MiniLM-L6 (BERT, with a new classifier head) and SmolLM2-135M (Llama,
GQA 9/3 heads, dequantized from the shipped GGUF and cached)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import as_compiled
from test_engine import MERGEABLE, PRESETS, ZERO_INIT, randomize
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import unipeft
from unipeft import routed, routed_kernels
from unipeft.layer import BASE

SENTENCES = ["A gorgeous, witty, seductive movie.", "The plot is paper-thin and the acting is worse.",
             "An utterly charming film that never wears out its welcome.", "Tedious and overlong."]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    return model, tok(SENTENCES, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return model, tok, tok(SENTENCES[:2], padding=True, return_tensors="pt")


def _check_preset(model, batch, preset, **kw):
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(**batch).logits.clone()
    am = unipeft.attach(model, preset, **kw)
    try:
        out = am(**batch).logits
        if preset in ZERO_INIT:
            torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
        out.float().pow(2).mean().backward()
        adapter = {id(p) for p in am.adapter_parameters("default").values()}
        assert all((id(p) in adapter) == p.requires_grad for p in am.parameters())
        assert all(p.grad is None for p in am.parameters() if id(p) not in adapter)
        assert any(float(p.grad.abs().sum()) > 0 for p in am.adapter_parameters("default").values())
    finally:
        restored = am.detach().state_dict()
    assert list(restored) == list(snapshot) and all(torch.equal(restored[k], snapshot[k]) for k in snapshot)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_on_minilm(minilm, preset: str) -> None:
    model, batch = minilm
    _check_preset(model, batch, preset, train_modules=["classifier"])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_on_smollm2(smollm2, preset: str) -> None:
    model, _, batch = smollm2
    _check_preset(model, batch, preset)


@pytest.mark.parametrize("preset", sorted(MERGEABLE))
def test_merge_on_minilm(minilm, preset: str) -> None:
    model, batch = minilm
    am = unipeft.attach(model, preset, train_modules=["classifier"])
    randomize(am, std=0.05)
    try:
        with torch.no_grad():
            unmerged = am(**batch).logits.clone()
            am.merge()
            torch.testing.assert_close(am(**batch).logits, unmerged, rtol=1e-5, atol=1e-5)
    finally:
        am.unmerge()
        am.detach()


@pytest.mark.parametrize("preset", sorted(MERGEABLE))
def test_merge_on_smollm2(smollm2, preset: str) -> None:
    model, _, batch = smollm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    am = unipeft.attach(model, preset, targets=["q", "k", "v", "o", "up", "gate", "down"]) if preset != "ia3" else \
        unipeft.attach(model, preset)
    randomize(am, std=0.02)
    with torch.no_grad():
        unmerged = am(**batch).logits.clone()
        am.merge()
        merged = am(**batch).logits
        torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=2e-4)
    am.unmerge()
    after = am.detach().state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-5)


def test_detach_is_bit_identical_on_smollm2(smollm2) -> None:
    model, _, _ = smollm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    am = unipeft.attach(model, "unipelt")
    am.add("b", "mam")
    am.add("c", "prompt")
    after = am.detach().state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_prefix_generation_on_smollm2_gqa(smollm2) -> None:
    """SmolLM2 has 9 query heads and 3 KV heads: prefixes are per KV head; generate() with the KV cache must equal
    greedy decoding that recomputes the whole sequence each step."""
    model, tok, _ = smollm2
    am = unipeft.attach(model, "prefix", length=5)
    assert am.adapter_parameters("default")["model.layers.0.self_attn::prefix.kv.fn.mlp.2.weight"].shape[0] == \
        2 * 3 * 64
    randomize(am, std=0.05)
    try:
        enc = tok(["Once upon a time"], return_tensors="pt")
        with torch.no_grad():
            out = am.generate(**enc, max_new_tokens=8, do_sample=False)
            ids = enc["input_ids"]
            for _ in range(8):
                logits = am(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(out, ids)
    finally:
        am.detach()


def test_lora_training_lowers_loss_on_smollm2_with_checkpointing(smollm2) -> None:
    model, tok, _ = smollm2
    text = ["The movie was a delight from start to finish, warm and funny.",
            "I have rarely been so bored in a cinema; the script is lifeless."]
    batch = tok(text, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    am = unipeft.attach(model, "lora", r=8, targets=["q", "v", "down"])
    try:
        am.train()
        am.gradient_checkpointing_enable()
        opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=3e-3)
        losses = []
        for _ in range(4):
            loss = am(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0] - 0.1, losses
    finally:
        model.gradient_checkpointing_disable()
        am.detach()
        model.eval()


@pytest.mark.parametrize("which", ["minilm", "smollm2"])
def test_save_load_fresh_process_real(which: str, tmp_path: Path, request) -> None:
    path = request.getfixturevalue(f"{which}_path")
    if which == "minilm":
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
        am = unipeft.attach(model, "houlsby", train_modules=["classifier"])
        am.add("lora", "lora")
        batch = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
        loader = f"AutoModelForSequenceClassification.from_pretrained({path!r}, num_labels=2)"
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        am = unipeft.attach(model, "unipelt")
        batch = AutoTokenizer.from_pretrained(path)(SENTENCES[:2], padding=True, return_tensors="pt")
        loader = f"AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32)"
    randomize(am, std=0.02)
    with torch.no_grad():
        expected = am(**dict(batch)).logits
    am.save(tmp_path / "ad")
    torch.save({"batch": dict(batch), "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, unipeft
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        data = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        am = unipeft.load({loader}.eval(), {str(tmp_path / "ad")!r})
        with torch.no_grad():
            torch.testing.assert_close(am(**data["batch"]).logits, data["expected"], rtol=0, atol=1e-5)
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_routed_generate_with_shared_stacks_on_smollm2(smollm2, monkeypatch) -> None:
    """Three LoRA adapters (ranks 8, 4, 16; different projections) and the base, one per row of a greedy `generate`
    through the shared stacks: each row's tokens are those of that row generated alone with its adapter active, and
    those of the decoding steps run as a CUDA-graphed compiled call runs them (`routed_kernels.routed_linear`)."""
    model, tok, _ = smollm2
    torch.manual_seed(0)  # (A's initialization: with these weights every row generates other tokens)
    am = unipeft.attach(model, "lora", r=8)
    am.add("b", "lora", r=4, targets=["q", "k", "v", "o"])
    am.add("c", "lora", r=16, targets=["v", "down"])
    for i, n in enumerate(am.recipes):
        randomize(am, n, seed=i, std=0.06)
    am.eval()
    names = ["default", "b", BASE, "c"]
    enc = tok(["Once upon a time"] * len(names), return_tensors="pt")
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    try:
        with torch.no_grad():
            assert am.prepare_routing() == len(am._wrappers)
            took = []
            real = routed.shared_lora
            monkeypatch.setattr(routed, "shared_lora", lambda *a: took.append(real(*a)) or took[-1])
            mixed = am.generate(**enc, adapter_names=names, **kw)
            assert len(took) == 4 * len(am._wrappers) and all(t is not None for t in took), "the stacks served all"
            monkeypatch.undo()
            # The decoding steps as a CUDA-graphed compiled call runs them: each projection's GEMM and routed delta
            # from `routed_linear` (its CPU path, the gathered-rows reference), summed by the layer.
            side = []
            real_side = routed_kernels.routed_linear
            monkeypatch.setattr(routed_kernels, "routed_linear", lambda *a: side.append(1) or real_side(*a))
            monkeypatch.setattr(routed, "graphed_decoding", lambda model, kwargs: True)
            monkeypatch.setattr(routed_kernels, "routed_available", lambda x, a=None: x.dim() == 3 and x.shape[1] == 1)
            monkeypatch.setenv("TRITON_INTERPRET", "0")  # (the reference, not the kernels in the interpreter)
            compiled = as_compiled(real)
            monkeypatch.setattr(routed, "shared_lora", lambda layer, x, slots: (compiled if x.shape[1] == 1 else real)(
                layer, x, slots))
            graphed = am.generate(**enc, adapter_names=names, **kw)
            assert len(side) == 3 * len(am._wrappers), "every projection of every decoding step on the two-stream op"
            assert torch.equal(graphed, mixed)
            monkeypatch.undo()
            for row, name in enumerate(names):
                if name == BASE:
                    am.deactivate()
                else:
                    am.activate(name)
                alone = am.generate(**{k: v[row:row + 1] for k, v in enc.items()}, **kw)
                assert torch.equal(mixed[row:row + 1], alone), f"row {row} ({name})"
    finally:
        am.detach()
    assert len({tuple(r) for r in mixed[:, -4:].tolist()}) == len(names), "each row generates its own tokens"
