"""PEFT-format interop (LoRA, rsLoRA, DoRA, IA3, prefix and prompt tuning), checked against the peft package itself.

For every method on tiny BERT (with a classifier), GPT-2 and Llama: peft-made checkpoints import with peft's outputs,
unipeft exports load in `peft.PeftModel.from_pretrained` with unipeft's outputs, and unipeft → peft → unipeft is
bit-identical in weights. Then the same on the real SmolLM2 and MiniLM (with a classifier head).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import inputs, output_of, tiny_model
from safetensors.torch import load_file, save_file
from test_engine import randomize

import unipeft
from unipeft import UnipeftError

peft = pytest.importorskip("peft")

FAMILIES = {"bert": ("cls", "SEQ_CLS"), "gpt2": ("lm", "CAUSAL_LM"), "llama": ("lm", "CAUSAL_LM")}
LINEARS = {"bert": ["query", "value", "output.dense"], "gpt2": ["c_attn", "c_fc"],
           "llama": ["q_proj", "v_proj", "down_proj"]}
IA3 = {"bert": (["key", "value", "output.dense"], ["output.dense"]), "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
       "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"])}
METHODS = ("lora", "rslora", "dora", "ia3", "prefix", "prompt")
# peft 0.21 runs prefix tuning on a classifier only through a declared past_key_values argument, which transformers 5
# models do not declare: BERT + prefix has no peft counterpart (see test_prefix_on_classifier_is_refused_like_peft).
MATRIX = [(f, m) for f in FAMILIES for m in METHODS if not (f == "bert" and m == "prefix")]


def _fresh(family: str, seed: int = 0) -> torch.nn.Module:
    return tiny_model(family, head=FAMILIES[family][0], seed=seed).eval()


def _peft_config(family: str, method: str, **extra):
    task = FAMILIES[family][1]
    if method in ("lora", "rslora", "dora"):
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS[family], task_type=task,
                               use_rslora=method == "rslora", use_dora=method == "dora", init_lora_weights=False,
                               **extra)
    if method == "ia3":
        targets, ff = IA3[family]
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff, task_type=task, init_ia3_weights=False)
    cls = peft.PrefixTuningConfig if method == "prefix" else peft.PromptTuningConfig
    return cls(num_virtual_tokens=3, task_type=task)


def _peft_model(model: torch.nn.Module, config, seed: int = 0):
    """A peft model whose every trainable tensor is random (nothing left at an identity init)."""
    pm = peft.get_peft_model(model, config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 2 and 1 in p.shape else 0.0))
    return pm


def _batch() -> dict:
    x = inputs()
    x["attention_mask"][0, :2] = 0  # a padded row, so the prefix/prompt mask extension is exercised
    return x


def _peft_out(pm, x: dict, n_prompt: int = 0) -> torch.Tensor:
    with torch.no_grad():
        out = output_of(pm(**x))
    return out[:, n_prompt:] if out.dim() == 3 and out.shape[1] == x["input_ids"].shape[1] + n_prompt else out


def _ours(am, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return output_of(am(**x))


def _unipeft_adapter(family: str, method: str, model: torch.nn.Module | None = None):
    model = _fresh(family) if model is None else model
    heads = ["classifier"] if FAMILIES[family][1] == "SEQ_CLS" else None
    if method in ("lora", "rslora", "dora"):
        am = unipeft.attach(model, method, targets=LINEARS[family], train_modules=heads)
    elif method == "ia3":
        targets, ff = IA3[family]
        am = unipeft.attach(model, "ia3", targets=[t for t in targets if t not in ff] + [f"{t}:in" for t in ff],
                            train_modules=heads)
    elif method == "prefix":
        am = unipeft.attach(model, "prefix", length=5, reparam_hidden=None, positions="shift", train_modules=heads)
    else:
        am = unipeft.attach(model, "prompt", length=5, train_modules=heads)
    randomize(am, std=0.3)
    return am


def _assert_same_parameters(a, b) -> None:
    """Bit-identical adapter weights, matched by module and role (part names may differ: peft has none)."""
    def by_place(am):
        return {(k.split("::")[0], k.split(".")[-1], k.split("::")[1].split(".")[1]): p
                for k, p in am.adapter_parameters("default").items()}

    mine, theirs = by_place(a), by_place(b)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("family,method", MATRIX)
def test_peft_checkpoint_imports_with_peft_outputs(family: str, method: str, tmp_path) -> None:
    pm = _peft_model(_fresh(family), _peft_config(family, method))
    x = _batch()
    expected = _peft_out(pm, x, 3 if method == "prompt" else 0)
    pm.save_pretrained(tmp_path)
    am = unipeft.import_peft(_fresh(family), tmp_path)
    torch.testing.assert_close(_ours(am, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,method", MATRIX)
def test_export_loads_in_peft_with_our_outputs_and_round_trips_bit_identically(family: str, method: str,
                                                                                tmp_path) -> None:
    am = _unipeft_adapter(family, method)
    x = _batch()
    ours = _ours(am, x)
    am.export_peft(tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(_fresh(family), tmp_path / "p").eval()
    torch.testing.assert_close(_peft_out(pm, x, 5 if method == "prompt" else 0), ours, rtol=1e-5, atol=1e-5)
    back = unipeft.import_peft(_fresh(family), tmp_path / "p")
    _assert_same_parameters(am, back)
    back.export_peft(tmp_path / "q")
    a, b = _weights(tmp_path / "p"), _weights(tmp_path / "q")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset", ["lora", "ia3"])
def test_adapters_on_parts_of_gpt2_fused_projection_export_exactly(preset: str, tmp_path) -> None:
    """LoRA on the q and v chunks of c_attn is a rank-2r LoRA on c_attn with a block-structured B; IA3 on k and v
    chunks is one c_attn vector with ones on q's rows."""
    am = unipeft.attach(_fresh("gpt2"), preset)
    randomize(am, std=0.3)
    x = _batch()
    am.export_peft(tmp_path / "p")
    w = _weights(tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(_fresh("gpt2"), tmp_path / "p").eval()
    torch.testing.assert_close(_peft_out(pm, x), _ours(am, x), rtol=1e-5, atol=1e-5)
    if preset == "lora":
        r = am.recipes["default"].parts[0].r
        assert w["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2 * r, 32)
        assert torch.all(w["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"][32:64] == 0)
    else:
        assert torch.all(w["base_model.model.transformer.h.0.attn.c_attn.ia3_l"][:32] == 1)


def test_default_prefix_with_reparametrisation_exports_its_table(tmp_path) -> None:
    """Like peft's own save, the reparametrisation MLP is evaluated once and the key/value table is written."""
    am = unipeft.attach(_fresh("llama"), "prefix", length=4, positions="shift")
    randomize(am, std=0.3)
    x = _batch()
    am.export_peft(tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(_fresh("llama"), tmp_path / "p").eval()
    torch.testing.assert_close(_peft_out(pm, x), _ours(am, x), rtol=1e-5, atol=1e-5)


def test_imported_prefix_decodes_like_peft_forward(tmp_path) -> None:
    """peft semantics survive the KV cache: greedy decoding after import picks, at every step, the argmax of peft's
    own full forward. (We compare with peft's forward, not its `generate`: with peft 0.21.2 and transformers 5.24
    `PeftModel.generate` drops the prefix — its first-step logits equal the base model's.)"""
    pm = _peft_model(_fresh("llama"), _peft_config("llama", "prefix"))
    x = inputs(batch=1)
    pm.save_pretrained(tmp_path)
    am = unipeft.import_peft(_fresh("llama"), tmp_path)
    with torch.no_grad():
        got = am.generate(**x, max_new_tokens=6, do_sample=False)
        ids = x["input_ids"]
        for _ in range(6):
            nxt = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(got, ids)


def test_prefix_positions_shift_moves_real_tokens_by_the_prefix_length() -> None:
    """`positions: shift` is exactly the kept-positions prefix run with position_ids = l + 0..T-1 (GPT-2 has absolute
    position embeddings, so the shift is visible)."""
    model = _fresh("gpt2")
    keep = unipeft.attach(copy.deepcopy(model), "prefix", length=3, reparam_hidden=None)
    shift = unipeft.attach(copy.deepcopy(model), "prefix", length=3, reparam_hidden=None, positions="shift")
    randomize(keep)
    with torch.no_grad():
        for k, p in shift.adapter_parameters("default").items():
            p.copy_(keep.adapter_parameters("default")[k])
    x = inputs()
    with torch.no_grad():
        moved = output_of(keep(**x, position_ids=torch.arange(3, 3 + x["input_ids"].shape[1])[None].expand(2, -1)))
    torch.testing.assert_close(_ours(shift, x), moved, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_ours(keep, x), moved)


def test_export_refusals(tmp_path) -> None:
    with pytest.raises(UnipeftError, match="has no peft form"):
        unipeft.attach(_fresh("llama"), "houlsby").export_peft(tmp_path / "a")
    with pytest.raises(UnipeftError, match="has no peft form"):
        unipeft.attach(_fresh("llama"), "mam").export_peft(tmp_path / "a")
    with pytest.raises(UnipeftError, match="DoRA on part of the fused projection"):
        unipeft.attach(_fresh("gpt2"), "dora").export_peft(tmp_path / "b")
    with pytest.raises(UnipeftError, match="positions=shift"):
        unipeft.attach(_fresh("llama"), "prefix").export_peft(tmp_path / "c")
    with pytest.raises(UnipeftError, match="every layer"):
        unipeft.attach(_fresh("llama"), "prefix", positions="shift", layers=[1]).export_peft(tmp_path / "d")
    gated = {"name": "g", "parts": {"p": {"function": "prefix", "composition": "gated", "sites": ["kv"], "length": 2,
                                          "positions": "shift"}}}
    with pytest.raises(UnipeftError, match="gated prefix"):
        unipeft.attach(_fresh("llama"), gated).export_peft(tmp_path / "e")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UnipeftError, match="not empty"):
        unipeft.attach(_fresh("llama"), "lora").export_peft(tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_prefix_on_classifier_is_refused_like_peft(tmp_path) -> None:
    with pytest.raises(ValueError, match="past key values"):
        peft.get_peft_model(_fresh("bert"), _peft_config("bert", "prefix"))(**inputs())
    am = unipeft.attach(_fresh("bert"), "prefix", positions="shift", reparam_hidden=None)
    with pytest.raises(UnipeftError, match="past_key_values"):
        am.export_peft(tmp_path / "p")


# ---- configs from other peft versions ------------------------------------------------------------------------------
def _saved_lora(tmp_path, **extra):
    pm = _peft_model(_fresh("llama"), _peft_config("llama", "lora", **extra))
    pm.save_pretrained(tmp_path)
    return pm


def _edit_config(path, **changes) -> dict:
    cfg = json.loads((path / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return cfg


def test_unknown_fields_warn_once_naming_them(tmp_path) -> None:
    pm = _saved_lora(tmp_path)
    _edit_config(tmp_path, future_knob=3, another_new_field={"a": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        am = unipeft.import_peft(_fresh("llama"), tmp_path)
    ours = [w for w in caught if "ignoring config fields" in str(w.message)]
    assert len(ours) == 1 and "another_new_field, future_knob" in str(ours[0].message)
    torch.testing.assert_close(_ours(am, _batch()), _peft_out(pm, _batch()), rtol=1e-5, atol=1e-5)


def test_missing_fields_take_peft_defaults(tmp_path) -> None:
    """A minimal config (old peft wrote fewer fields): lora_alpha defaults to 8, rsLoRA/DoRA off — as in peft."""
    pm = peft.get_peft_model(_fresh("llama"), peft.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj"],
                                                              use_rslora=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    _edit_config(tmp_path, lora_alpha=None, use_rslora=None, use_dora=None, rank_pattern=None, alpha_pattern=None,
                 lora_dropout=None, task_type=None, peft_version=None)
    x = _batch()
    pm = peft.PeftModel.from_pretrained(_fresh("llama"), tmp_path).eval()
    am = unipeft.import_peft(_fresh("llama"), tmp_path)
    torch.testing.assert_close(_ours(am, x), _peft_out(pm, x), rtol=1e-5, atol=1e-5)
    assert am.recipes["default"].parts[0].alpha == 8.0


def test_regex_target_modules_and_old_bin_weights(tmp_path) -> None:
    pm = peft.get_peft_model(_fresh("llama"), peft.LoraConfig(r=2, target_modules=r".*\.(q_proj|up_proj)",
                                                              init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    am = unipeft.import_peft(_fresh("llama"), tmp_path)
    torch.testing.assert_close(_ours(am, _batch()), _peft_out(pm, _batch()), rtol=1e-5, atol=1e-5)
    assert {p.rpartition(".")[2] for p in am.recipes["default"].parts[0].targets} == {"q_proj", "up_proj"}


def test_bin_needing_full_pickle_is_refused(tmp_path) -> None:
    _saved_lora(tmp_path)
    weights = _weights(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({"weights": weights, "hook": copy.deepcopy}, tmp_path / "adapter_model.bin")
    with pytest.raises(UnipeftError, match="full pickle"):
        unipeft.import_peft(_fresh("llama"), tmp_path)


@pytest.mark.parametrize("change,match", [({"lora_bias": True}, "lora_bias=True"),
                                          ({"init_lora_weights": "pissa"}, "pissa"),
                                          ({"peft_type": "LOHA"}, "not supported"),
                                          ({"bias": "all"}, "bias='all'")])
def test_options_unipeft_does_not_reproduce_are_refused(change: dict, match: str, tmp_path) -> None:
    _saved_lora(tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(UnipeftError, match=match):
        unipeft.import_peft(_fresh("llama"), tmp_path)


# ---- checkpoints that do not fit -----------------------------------------------------------------------------------
def _unchanged(model: torch.nn.Module, before: dict) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before) and not any(
        getattr(m, "_unipeft_wrapper", False) for m in model.modules())


def test_mismatched_checkpoints_name_the_tensor_and_change_nothing(tmp_path) -> None:
    _saved_lora(tmp_path / "lora")
    bert = _fresh("bert")
    before = copy.deepcopy(bert.state_dict())
    with pytest.raises(UnipeftError, match="base_model.model.model.layers.0.*another base model"):
        unipeft.import_peft(bert, tmp_path / "lora")
    assert _unchanged(bert, before)

    wide = tiny_model("llama")  # same module names, another width: shape error with the expected shape
    wide.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 64, bias=False)
    before = copy.deepcopy(wide.state_dict())
    with pytest.raises(UnipeftError, match=r"q_proj.lora_B.weight' has shape \[32, 4\], this model expects \[64, 4\]"):
        unipeft.import_peft(wide, tmp_path / "lora")
    assert _unchanged(wide, before)

    w = _weights(tmp_path / "lora")
    missing = {k: v for k, v in w.items() if not k.endswith("layers.1.self_attn.v_proj.lora_B.weight")}
    save_file(missing, str(tmp_path / "lora" / "adapter_model.safetensors"))
    with pytest.raises(UnipeftError, match="layers.1.self_attn.v_proj' has no lora_B.weight"):
        unipeft.import_peft(_fresh("llama"), tmp_path / "lora")
    save_file({**w, "base_model.model.model.norm.extra": torch.zeros(3)},
              str(tmp_path / "lora" / "adapter_model.safetensors"))
    with pytest.raises(UnipeftError, match="'base_model.model.model.norm.extra' fits no adapted module"):
        unipeft.import_peft(_fresh("llama"), tmp_path / "lora")

    from transformers import LlamaConfig, LlamaForCausalLM

    _peft_model(_fresh("llama"), _peft_config("llama", "prefix")).save_pretrained(tmp_path / "prefix")
    deeper = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=48))
    with pytest.raises(UnipeftError, match=r"'prompt_embeddings' has shape \[3, 64\], this model expects \[3, 96\]"):
        unipeft.import_peft(deeper, tmp_path / "prefix")


# ---- the real shipped models ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, dict(tok(["To be, or not to be, that is", "Once upon a time"], padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def minilm(minilm_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path)
    return model, dict(tok(["a fine film", "a dull, overlong mess"], padding=True, return_tensors="pt"))


REAL_CONFIGS = {
    "lora": lambda targets: peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False),
    "rslora": lambda targets: peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=True,
                                              init_lora_weights=False),
    "dora": lambda targets: peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_dora=True,
                                            init_lora_weights=False),
    "ia3": lambda targets: peft.IA3Config(target_modules=targets, feedforward_modules=targets[-1:],
                                          init_ia3_weights=False),
    "prefix": lambda targets: peft.PrefixTuningConfig(num_virtual_tokens=4),
    "prompt": lambda targets: peft.PromptTuningConfig(num_virtual_tokens=4),
}
REAL = [("smollm2", m) for m in ("lora", "rslora", "dora", "ia3", "prefix", "prompt")] + [
    ("minilm", m) for m in ("lora", "rslora", "dora", "ia3", "prompt")]


@pytest.mark.parametrize("which,method", REAL)
def test_real_models_both_directions(which: str, method: str, request, tmp_path) -> None:
    base, batch = request.getfixturevalue(which)
    targets = ["q_proj", "v_proj", "down_proj"] if which == "smollm2" else ["query", "value", "output.dense"]
    config = REAL_CONFIGS[method](targets)
    config.task_type = "CAUSAL_LM" if which == "smollm2" else "SEQ_CLS"
    pm = _peft_model(copy.deepcopy(base), config, seed=1)
    if which == "minilm":
        with torch.no_grad():
            pm.base_model.classifier.modules_to_save["default"].weight.add_(0.5) if method == "prompt" else \
                pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    n_prompt = 4 if method == "prompt" else 0
    expected = _peft_out(pm, batch, n_prompt)
    pm.save_pretrained(tmp_path / "peft")
    am = unipeft.import_peft(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_ours(am, batch), expected, rtol=1e-4, atol=1e-5)
    am.export_peft(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_peft_out(again, batch, n_prompt), expected, rtol=1e-4, atol=1e-5)
    _assert_same_parameters(am, unipeft.import_peft(copy.deepcopy(base), tmp_path / "ours"))


def test_shifted_prefix_under_per_row_routing() -> None:
    """Only the rows routed to a shifting prefix move; a `__base__` row is exactly the base model."""
    model = _fresh("gpt2")
    base_out = output_of(copy.deepcopy(model)(**inputs()))
    am = unipeft.attach(model, "prefix", length=3, reparam_hidden=None, positions="shift")
    randomize(am)
    x = inputs()
    with torch.no_grad():
        alone = output_of(am(**x))
        mixed = output_of(am(**x, adapter_names=["default", "__base__"]))
    torch.testing.assert_close(mixed[0], alone[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[1], base_out[1].detach(), rtol=1e-6, atol=1e-6)
