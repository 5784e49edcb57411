"""unipeft.accelerate: the fused base ops' plumbing on CPU. Liger-Kernel's Triton kernels run only on a GPU (its
kernels fail under TRITON_INTERPRET), so here reference implementations stand in for them and the tests check what
unipeft itself does: which modules are swapped, the causal shift / ignore index / reduction of the fused loss,
gradients reaching adapters, and a bit-exact restore. The kernels' numerics are checked on the GPU by
bench/perf_vs_peft.py (loss of the accelerated model against the plain one)."""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import inputs, tiny_model
from test_engine import randomize
from test_train_cli import cli
from torch.nn import functional as F

import unipeft
from unipeft import UnipeftError
from unipeft import base_ops as acc


def _reference_kernels(calls: dict) -> SimpleNamespace:
    from transformers.models.llama import modeling_llama

    rope = modeling_llama.apply_rotary_pos_emb

    def count(name, fn):
        def run(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return run

    def rms_norm(x, weight, eps):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def fused_loss(weight, h, target, reduction):
        return F.cross_entropy((h @ weight.t()).float(), target, ignore_index=-100, reduction=reduction)

    return SimpleNamespace(rms_norm=count("rms_norm", rms_norm), silu_mul=count("silu_mul", lambda a, b: F.silu(a) * b),
                           rope=count("rope", rope), fused_loss=count("fused_loss", fused_loss))


@pytest.fixture
def stand_ins(monkeypatch) -> dict:
    from transformers.models.llama import modeling_llama

    calls: dict = {}
    # the RoPE swap is process-wide: undo it after each test whatever the test did
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(acc, "_ROPE_ORIGINALS", {})
    monkeypatch.setattr(acc, "_check_device", lambda hf: None)
    monkeypatch.setattr(acc, "_liger", lambda: _reference_kernels(calls))
    return calls


def _loss_and_grads(am, batch: dict, **kwargs):
    am.zero_grad(set_to_none=True)
    out = am(**batch, **kwargs)
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}


def test_accelerated_adapted_model_matches_the_plain_one(stand_ins) -> None:
    am = unipeft.attach(tiny_model("llama"), "lora", r=4)
    randomize(am)
    batch = inputs(batch=2, seq=9)
    labels = batch["input_ids"].clone()
    labels[0, :3] = -100  # ignored positions (e.g. a prompt) must not count
    plain, plain_grads = _loss_and_grads(am, batch, labels=labels)
    with torch.no_grad():
        plain_logits = am(**batch).logits
    done = unipeft.accelerate(am)
    assert done == {"rms_norm": 5, "swiglu": 2, "rope": 1, "fused_loss": 1}  # 2 layers × 2 norms + final norm
    fast, fast_grads = _loss_and_grads(am, batch, labels=labels)
    assert fast.logits is None  # the (tokens × vocab) logits are never built
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-6, atol=1e-6)
    assert fast_grads.keys() == plain_grads.keys()
    for k in plain_grads:
        torch.testing.assert_close(fast_grads[k], plain_grads[k], rtol=1e-5, atol=1e-7, msg=k)
    assert stand_ins["rms_norm"] >= 5 and stand_ins["silu_mul"] >= 2 and stand_ins["rope"] >= 2
    assert stand_ins["fused_loss"] == 1
    with torch.no_grad():  # without labels: the model's own forward, logits as before
        torch.testing.assert_close(am(**batch).logits, plain_logits, rtol=1e-6, atol=1e-6)
    n_items = int((labels[:, 1:] != -100).sum()) + 3  # Trainer-style: sum over tokens / items in the whole batch
    with torch.no_grad():
        summed = am(**batch, labels=labels, num_items_in_batch=n_items).loss
    torch.testing.assert_close(summed, plain.loss * (n_items - 3) / n_items, rtol=1e-6, atol=1e-6)


def test_accelerate_with_cuda_graphs_replays_the_layers(stand_ins, monkeypatch) -> None:
    """cuda_graphs=True: the accelerated layers replayed from graphs (emulated on CPU, see test_graphs.py) give the
    accelerated model's loss and gradients; enable=False drops the graphs with the fused ops."""
    from unipeft import graphs

    real = graphs.graph_layers
    monkeypatch.setattr(graphs, "graph_layers", lambda m, **kw: real(m, **kw, **({"emulate": True} if kw.get(
        "enable", True) else {})))
    am = unipeft.attach(tiny_model("llama"), "lora", r=4)
    randomize(am)
    batch = inputs(batch=2, seq=9)
    unipeft.accelerate(am)
    expected, expected_grads = _loss_and_grads(am, batch, labels=batch["input_ids"])
    assert unipeft.accelerate(am, enable=False) == {"restored": 8}
    assert unipeft.accelerate(am, cuda_graphs=True)["cuda_graphs"] == 2
    for _ in range(2):  # records, then replays
        got, grads = _loss_and_grads(am, batch, labels=batch["input_ids"])
        torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
        for k in expected_grads:
            torch.testing.assert_close(grads[k], expected_grads[k], rtol=0, atol=0, msg=k)
    stack = am.model.__dict__[graphs._STACK]
    assert stack.replayed == 2 and stack.captures == 1
    unipeft.accelerate(am, enable=False)
    assert graphs._STACK not in am.model.__dict__ and not any("forward" in m.__dict__ for m in am.modules())


def test_restore_puts_the_plain_ops_back_bit_exactly(stand_ins) -> None:
    from transformers.models.llama import modeling_llama

    original_rope = modeling_llama.apply_rotary_pos_emb
    model = tiny_model("llama").eval()
    batch = inputs()
    with torch.no_grad():
        before = model(**batch, labels=batch["input_ids"])
    unipeft.accelerate(model)
    assert modeling_llama.apply_rotary_pos_emb is not original_rope
    assert unipeft.accelerate(model, enable=False) == {"restored": 8}
    assert modeling_llama.apply_rotary_pos_emb is original_rope
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        after = model(**batch, labels=batch["input_ids"])
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)


def test_bad_requests_are_one_line_errors(monkeypatch, tiny_llama, tmp_path, capsys) -> None:
    with pytest.raises(UnipeftError, match="supports the llama, mistral, qwen2, qwen3 families, not 'bert'"):
        unipeft.accelerate(tiny_model("bert"))
    model = tiny_model("llama")
    with pytest.raises(UnipeftError, match="model is on cpu; move it to a CUDA GPU"):
        unipeft.accelerate(model)
    assert not any("forward" in m.__dict__ for m in model.modules()), "nothing changed"
    monkeypatch.setattr(acc, "_check_device", lambda hf: None)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(UnipeftError, match=r"pip install 'unipeft\[kernels\]'"):
        unipeft.accelerate(model)
    monkeypatch.undo()
    corpus = tmp_path / "c.txt"
    corpus.write_text("some words to train on. " * 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = cli("train", "--model", tiny_llama, "--data", str(corpus), "--accelerate", "--out",
                   str(tmp_path / "r"), "--quiet", expect=2, capsys=capsys)
    assert text.strip().count("\n") == 0 and "CUDA GPU" in text and "Traceback" not in text
    assert not (tmp_path / "r" / "results.json").exists()
