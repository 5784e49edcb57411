"""Save / load: a fresh process reproduces outputs; bad checkpoints are refused whole, naming what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, inputs, output_of, tiny_model
from safetensors.torch import load_file, save_file
from test_engine import randomize

import unipeft
from unipeft import UnipeftError
from unipeft.io import INDEX

TESTS = Path(__file__).parent

#: One adapter per family mix so that, across families, every preset is saved and reloaded once.
SAVED = {"bert": ["lora", "houlsby", "prefix"], "roberta": ["dora", "pfeiffer", "prompt"],
         "gpt2": ["ia3", "parallel", "mam"], "llama": ["rslora", "scaled_parallel", "unipelt"],
         "mistral": ["lora", "prefix"], "qwen2": ["dora", "ia3"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_in_a_fresh_process(family: str, tmp_path: Path) -> None:
    model = tiny_model(family).eval()
    am = None
    for i, preset in enumerate(SAVED[family]):
        name = f"{preset}_{i}"
        am = unipeft.attach(model, preset, name=name) if am is None else am.add(name, preset)
        randomize(am, name, seed=i)
    am.activate(*[f"{p}_{i}" for i, p in enumerate(SAVED[family])][:2])
    x = inputs()
    with torch.no_grad():
        expected = output_of(am(**x))
    am.save(tmp_path / "adapters")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        from conftest import tiny_model, output_of
        import unipeft
        data = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        model = tiny_model({family!r}, seed=0).eval()
        am = unipeft.load(model, {str(tmp_path / "adapters")!r})
        with torch.no_grad():
            got = output_of(am(**data["x"]))
        torch.testing.assert_close(got, data["expected"], rtol=0, atol=1e-6)
        print("ACTIVE", ",".join(am.active))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"ACTIVE {SAVED[family][0]}_0,{SAVED[family][1]}_1" in proc.stdout


def _saved(tmp_path: Path, preset: str = "lora", family: str = "llama") -> tuple[unipeft.AdaptedModel, Path]:
    am = unipeft.attach(tiny_model(family), preset)
    randomize(am)
    return am, am.save(tmp_path / "ad")


def test_only_adapter_tensors_are_written(tmp_path: Path) -> None:
    am, d = _saved(tmp_path)
    tensors = load_file(str(d / "default.safetensors"))
    assert set(tensors) == set(am.adapter_parameters("default"))
    assert all("::" in k for k in tensors)
    index = json.loads((d / INDEX).read_text())
    assert index["format_version"] == 1 and index["base"]["class"] == "LlamaForCausalLM"
    assert index["adapters"]["default"]["recipe"]["name"] == "lora"


def test_load_into_existing_model_and_by_name(tmp_path: Path) -> None:
    am, d = _saved(tmp_path)
    am2 = unipeft.attach(tiny_model("llama"), "ia3", name="other")
    am2.load(d, name="default")
    assert set(am2.recipes) == {"other", "default"} and am2.active == ["other"]
    for k, p in am2.adapter_parameters("default").items():
        assert torch.equal(p, am.adapter_parameters("default")[k])
    with pytest.raises(UnipeftError, match="already exists"):
        am2.load(d)
    with pytest.raises(UnipeftError, match="has no adapter 'nope'"):
        am2.load(d, name="nope")


def test_load_refuses_another_architecture(tmp_path: Path) -> None:
    _, d = _saved(tmp_path)
    with pytest.raises(UnipeftError, match="saved for LlamaForCausalLM .* this model is BertModel"):
        unipeft.load(tiny_model("bert"), d)


def test_load_refuses_another_shape_naming_the_tensor(tmp_path: Path) -> None:
    import transformers as T

    _, d = _saved(tmp_path)
    other = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=40))
    with pytest.raises(UnipeftError, match=r"base tensor 'model.layers.0.mlp.gate_proj.weight' has shape \[40, 32\]"):
        unipeft.load(other, d)


def test_tensor_shape_mismatch_names_tensor_and_expected_shape(tmp_path: Path) -> None:
    _, d = _saved(tmp_path)
    index = json.loads((d / INDEX).read_text())
    index["adapters"]["default"]["recipe"]["parts"]["lora"]["r"] = 4  # the recipe now wants rank 4, weights have 8
    (d / INDEX).write_text(json.dumps(index))
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnipeftError, match=r"tensor 'model.layers.0.self_attn.q_proj::lora.q.fn.down.weight' .* "
                                           r"has shape \[8, 32\], expected \[4, 32\]"):
        unipeft.load(model, d)
    assert list(model.state_dict()) == list(before), "a failed load must leave the model as it was"


def test_missing_and_extra_tensors_are_named(tmp_path: Path) -> None:
    _, d = _saved(tmp_path)
    tensors = load_file(str(d / "default.safetensors"))
    key = "model.layers.1.self_attn.v_proj::lora.v.fn.up.weight"
    index = json.loads((d / INDEX).read_text())
    index["adapters"]["default"].pop("sha256")
    (d / INDEX).write_text(json.dumps(index))
    save_file({k: v for k, v in tensors.items() if k != key}, str(d / "default.safetensors"))
    with pytest.raises(UnipeftError, match=f"lacks tensor '{key}'"):
        unipeft.load(tiny_model("llama"), d)
    save_file({**tensors, "model.layers.0.mlp.up_proj::lora.up.fn.down.weight": torch.zeros(2, 2)},
              str(d / "default.safetensors"))
    with pytest.raises(UnipeftError, match="has tensor 'model.layers.0.mlp.up_proj::lora.up.fn.down.weight' that"):
        unipeft.load(tiny_model("llama"), d)


def test_truncated_or_corrupt_file_is_an_error(tmp_path: Path) -> None:
    _, d = _saved(tmp_path)
    f = d / "default.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    model = tiny_model("llama")
    with pytest.raises(UnipeftError, match="truncated or corrupt"):
        unipeft.load(model, d)
    assert not any("base_layer" in n for n, _ in model.named_modules())
    index = json.loads((d / INDEX).read_text())  # without a checksum, safetensors itself must still refuse it
    index["adapters"]["default"].pop("sha256")
    (d / INDEX).write_text(json.dumps(index))
    with pytest.raises(UnipeftError, match="unreadable"):
        unipeft.load(model, d)
    (d / INDEX).write_text("{not json")
    with pytest.raises(UnipeftError, match="corrupt"):
        unipeft.load(model, d)


def test_not_an_adapter_folder(tmp_path: Path) -> None:
    with pytest.raises(UnipeftError, match="not a unipeft adapter folder"):
        unipeft.load(tiny_model("llama"), tmp_path)


def test_save_is_atomic_and_never_clobbers_foreign_folders(tmp_path: Path) -> None:
    am, d = _saved(tmp_path)
    am.add("second", "ia3")
    am.save(d)  # replacing an existing adapter folder is allowed, atomically
    assert set(json.loads((d / INDEX).read_text())["adapters"]) == {"default", "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"], "no temporary folders left behind"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UnipeftError, match="not a unipeft adapter folder"):
        am.save(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_save_one_adapter(tmp_path: Path) -> None:
    am, _ = _saved(tmp_path)
    am.add("second", "ia3")
    d = am.save(tmp_path / "one", name="second")
    assert list(json.loads((d / INDEX).read_text())["adapters"]) == ["second"]
    assert not (d / "default.safetensors").exists()


def test_no_unrestricted_pickle_anywhere() -> None:
    """Adapters load through safetensors and json; the only torch.load (training checkpoints) is weights_only."""
    import re

    src = Path(unipeft.__file__).parent
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text, f
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call, (f, call)
