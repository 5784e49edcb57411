"""Sequential multi-task training with the CLI: task A, then task B with a new adapter next to A's on the same
frozen base (A's predictions bit-identical afterwards, on real Rotten Tomatoes reviews), then AdapterFusion over
both; and the refusals of the flow."""

from __future__ import annotations

import json

import torch
from conftest import NEG, POS
from test_train_cli import cli

import unipeft


def _logits(am, tok, texts):
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return am(**batch).logits


def test_task_b_leaves_task_a_bit_identical_and_fusion_trains_on_top(tiny_bert, sentiment, tmp_path, capsys) -> None:
    from datasets import load_dataset  # noqa: F401  (the shipped data path is exercised by --data below)
    from transformers import AutoTokenizer

    a, b, f = tmp_path / "sent_a", tmp_path / "sent_b", tmp_path / "fused"
    common = ["--model", tiny_bert, "--batch-size", "8", "--quiet", "--max-eval-examples", "32"]
    cli("train", "--data", "rotten_tomatoes", "--method", "pfeiffer", "--max-steps", "4", "--out", str(a), *common,
        capsys=capsys)
    tok = AutoTokenizer.from_pretrained(a / "tokenizer")
    from unipeft.data import load_splits

    real = [r["text"] for r in load_splits("rotten_tomatoes", None, None, None, unipeft.run.RunConfig().columns(), 0,
                                           None).test[:16]]
    before = _logits(unipeft.from_pretrained(a), tok, real)

    cli("train", "--data", str(sentiment), "--text-column", "review", "--label-column", "sentiment",
        "--base-adapters", str(a), "--method", "houlsby", "--max-steps", "4", "--out", str(b), *common,
        expect=2, capsys=capsys)  # other labels (neg/pos strings vs 0/1): refused, nothing written
    assert not (b / "results.json").exists()
    cli("train", "--data", "rotten_tomatoes", "--seed", "1", "--base-adapters", str(a), "--method", "houlsby",
        "--max-steps", "4", "--out", str(b), *common, capsys=capsys)
    both = unipeft.from_pretrained(b)
    assert set(both.recipes) == {"sent_a", "default"} and both.active == ["default"]
    both.activate("sent_a")
    assert torch.equal(_logits(both, tok, real), before), "task A's adapter and head answer exactly as before B"

    cli("train", "--data", "rotten_tomatoes", "--seed", "2", "--base-adapters", f"{a},{b}", "--fuse", "--max-steps",
        "4", "--out", str(f), *common, capsys=capsys)
    fused = unipeft.from_pretrained(f)
    assert isinstance(fused.active[0], unipeft.Fuse) and fused.active[0].units == ("sent_a", "sent_b")
    results = json.loads((f / "results.json").read_text())
    n_fusion = sum(p.numel() for p in fused.fusion_parameters(fused.active[0]).values())
    assert results["summary"]["trainable_parameters"] == n_fusion
    fused.activate("sent_a")
    assert torch.equal(_logits(fused, tok, real), before)
    text = cli("train", "--data", "rotten_tomatoes", "--fuse", "--base-adapters", str(a), "--out",
               str(tmp_path / "x"), *common, expect=2, capsys=capsys)
    assert "at least two" in text
    assert POS and NEG
