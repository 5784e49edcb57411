"""PEFT-format interop for LoRA, rsLoRA and DoRA, checked against the peft package itself."""

from __future__ import annotations

import pytest
import torch
from conftest import inputs, output_of, tiny_model
from safetensors.torch import load_file
from test_engine import randomize

import unipeft
from unipeft import UnipeftError

peft = pytest.importorskip("peft")

CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], use_dora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 2},
                     alpha_pattern={"q_proj": 16}, layers_to_transform=[1]),
}


def _peft_model(kind: str, family: str = "llama"):
    model = tiny_model(family).eval()
    pm = peft.get_peft_model(model, peft.LoraConfig(**CASES[kind], init_lora_weights=False))
    return pm.eval()


@pytest.mark.parametrize("kind", list(CASES))
def test_peft_checkpoint_imports_with_equal_outputs(kind: str, tmp_path) -> None:
    pm = _peft_model(kind)
    pm.save_pretrained(tmp_path)
    x = inputs()
    with torch.no_grad():
        expected = output_of(pm(**x))
    am = unipeft.import_peft(tiny_model("llama").eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(output_of(am(**x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["lora", "rslora", "dora"])
def test_export_loads_in_peft_and_round_trips_bit_identically(preset: str, tmp_path) -> None:
    am = unipeft.attach(tiny_model("llama").eval(), preset, targets=["q", "v", "down"])
    randomize(am)
    x = inputs()
    with torch.no_grad():
        ours = output_of(am(**x))
    am.export_peft(tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(tiny_model("llama").eval(), tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(pm(**x)), ours, rtol=1e-5, atol=1e-5)
    back = unipeft.import_peft(tiny_model("llama").eval(), tmp_path / "p")
    a = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    back.export_peft(tmp_path / "q")
    b = load_file(str(tmp_path / "q" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_classifier_head_round_trip_on_real_minilm(minilm_path, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def fresh():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["a fine film", "a dull mess"], padding=True, return_tensors="pt")
    pm = peft.get_peft_model(fresh(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"], init_lora_weights=False)).eval()
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
        expected = pm(**batch).logits
    pm.save_pretrained(tmp_path / "p")
    am = unipeft.import_peft(fresh(), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(am(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    am.export_peft(tmp_path / "q")
    again = peft.PeftModel.from_pretrained(fresh(), tmp_path / "q").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_refusals(tmp_path) -> None:
    with pytest.raises(UnipeftError, match="has no peft LoRA form"):
        unipeft.attach(tiny_model("llama"), "houlsby").export_peft(tmp_path / "a")
    with pytest.raises(UnipeftError, match="fused projection"):
        unipeft.attach(tiny_model("gpt2"), "lora").export_peft(tmp_path / "b")


def test_import_refusals(tmp_path) -> None:
    pm = _peft_model("lora")
    pm.save_pretrained(tmp_path / "p")
    with pytest.raises(UnipeftError, match="not a linear module of BertModel"):
        unipeft.import_peft(tiny_model("bert"), tmp_path / "p")
    cfg = peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    peft.get_peft_model(tiny_model("llama"), cfg).save_pretrained(tmp_path / "pre")
    with pytest.raises(UnipeftError, match="not supported yet"):
        unipeft.import_peft(tiny_model("llama"), tmp_path / "pre")
