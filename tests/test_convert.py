"""`unipeft convert`: peft folders ⇄ unipeft adapter folders and run folders, through the real CLI entry point."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from conftest import POS
from safetensors.torch import load_file
from test_train_cli import cli

import unipeft

peft = pytest.importorskip("peft")


def _ids(n: int = 2, seq: int = 9) -> dict:
    ids = torch.randint(5, 1000, (n, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _random(pm) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_peft_to_unipeft_and_back_is_bit_identical(tiny_llama, tmp_path, capsys) -> None:
    base = T.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                   task_type="CAUSAL_LM")).eval()
    _random(pm)
    x = _ids()
    with torch.no_grad():
        expected = pm(**x).logits
    pm.save_pretrained(tmp_path / "peft")
    text = cli("convert", str(tmp_path / "peft"), str(tmp_path / "ours"), capsys=capsys)
    assert "wrote a unipeft adapter folder" in text
    index = json.loads((tmp_path / "ours" / "unipeft_adapters.json").read_text())
    assert index["base"]["name_or_path"] == tiny_llama
    am = unipeft.load(T.AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(am(**x).logits, expected, rtol=1e-5, atol=1e-5)
    cli("convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "peft", capsys=capsys)
    a = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["task_type"]) == (4, 16.0, "CAUSAL_LM")


def test_run_folder_to_peft(tiny_bert, sentiment, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    cli("train", "--model", tiny_bert, "--data", str(sentiment), "--text-column", "review", "--label-column",
        "sentiment", "--max-steps", "3", "--batch-size", "8", "--out", str(run), "--quiet", capsys=capsys)
    cli("convert", str(run), str(tmp_path / "peft"), capsys=capsys)
    am = unipeft.from_pretrained(run)
    tok = T.AutoTokenizer.from_pretrained(run / "tokenizer")
    batch = tok([POS[0], "dull and slow"], padding=True, return_tensors="pt")
    base = T.AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**batch).logits, am(**batch).logits, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]


def test_real_minilm_ia3_with_classifier_converts(minilm_path, tmp_path, capsys) -> None:
    def fresh():
        torch.manual_seed(0)
        return T.AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3).eval()

    pm = peft.get_peft_model(fresh(), peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                     feedforward_modules=["output.dense"], task_type="SEQ_CLS")).eval()
    _random(pm)
    tok = T.AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["a fine film", "a dull, overlong mess"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = pm(**batch).logits
    pm.save_pretrained(tmp_path / "peft")
    cli("convert", str(tmp_path / "peft"), str(tmp_path / "ours"), "--to", "unipeft", capsys=capsys)
    am = unipeft.load(fresh(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(am(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_convert_errors_are_one_line_and_write_nothing(tiny_llama, tmp_path, capsys) -> None:
    base = T.AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "p")
    capsys.readouterr()  # (the setup's own loading output is not the CLI's)
    cases = [
        (["convert", str(tmp_path / "p"), str(tmp_path / "x"), "--to", "peft"], "already a peft"),
        (["convert", str(tmp_path / "nope"), str(tmp_path / "x")], "does not exist"),
        (["convert", str(tmp_path / "p"), str(tmp_path / "x"), "--to", "onnx"], "--to is peft or unipeft"),
        (["convert", str(tmp_path / "p"), str(tmp_path / "p")], "not empty"),
        (["convert", str(tmp_path / "p"), str(tmp_path / "x"), "--model", str(tmp_path / "nobase")], "--model PATH"),
    ]
    for args, message in cases:
        text = cli(*args, expect=2, capsys=capsys)
        assert message in text and "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "x").exists()
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/gone/model"
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg))
    text = cli("convert", str(tmp_path / "p"), str(tmp_path / "x"), expect=2, capsys=capsys)
    assert "'/gone/model'" in text and "--model" in text
    cli("convert", str(tmp_path / "p"), str(tmp_path / "x"), "--model", tiny_llama, capsys=capsys)
    assert (tmp_path / "x" / "unipeft_adapters.json").is_file()
