"""Edge cases a careful user hits: dtype moves, merge order, heads under merge-and-unload, prompt plumbing, routing
under interleaved checkpointed forwards, and bad input that must stay a one-line UnipeftError."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import inputs, output_of, tiny_model
from test_engine import randomize

import unipeft
from unipeft import UnipeftError
from unipeft.io import INDEX


@pytest.mark.parametrize("preset", ["lora", "houlsby", "dora", "unipelt", "prefix", "prompt"])
def test_moving_to_bf16_after_attach(preset: str) -> None:
    am = unipeft.attach(tiny_model("llama"), preset)
    am.to(torch.bfloat16)
    out = output_of(am(**inputs()))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_prefix_routing_with_eager_bert_masks_base_rows() -> None:
    model = tiny_model("bert", attn="eager").eval()
    x = inputs()
    with torch.no_grad():
        base = output_of(model(**x)).clone()
    am = unipeft.attach(model, "prefix", length=4, reparam_hidden=None)
    randomize(am, std=0.5)
    with torch.no_grad():
        routed = output_of(am(input_ids=x["input_ids"], adapter_names=["default", "__base__"]))
    torch.testing.assert_close(routed[1:], base[1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(routed[:1], base[:1], atol=1e-3)


def test_merge_and_detach_keeps_the_trained_head() -> None:
    am = unipeft.attach(tiny_model("bert", head="cls").eval(), "lora", train_modules=["classifier"])
    randomize(am)
    x = inputs()
    with torch.no_grad():
        expected = am(**x).logits.clone()
        am.merge()
        plain = am.detach()
        torch.testing.assert_close(plain(**x).logits, expected, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in plain.parameters()), "requires_grad flags are back as before attach"


def test_merge_refuses_to_reorder_compositions() -> None:
    am = unipeft.attach(tiny_model("llama"), "lora", name="lora", targets=["k"])
    am.add("ia3", "ia3")
    randomize(am, "lora")
    randomize(am, "ia3", seed=1)
    am.activate("lora", "ia3")
    with pytest.raises(UnipeftError, match="composes after unmerged 'lora'"):
        am.merge("ia3")
    x = inputs()
    with torch.no_grad():
        before = output_of(am(**x)).clone()
        am.merge()  # both, in order: the same function
        torch.testing.assert_close(output_of(am(**x)), before, rtol=1e-5, atol=1e-5)


_READERS = {  # two adapters on shared layers, activated in this order; the second or first reads the weight
    "lora, dora": (("a", "lora", {}), ("b", "dora", {})),
    "dora, lora": (("b", "dora", {}), ("a", "lora", {})),
    "ia3 on v, dora": (("a", "ia3", {"sites": ["v"]}), ("b", "dora", {})),
    "lora on down, ia3": (("a", "lora", {"targets": ["down_proj"]}), ("b", "ia3", {})),
    "ia3, lora on down": (("b", "ia3", {}), ("a", "lora", {"targets": ["down_proj"]})),
}
_EXACT = {("dora, lora", None), ("dora, lora", "b"), ("ia3, lora on down", None), ("ia3, lora on down", "b")}


@pytest.mark.parametrize("which", [None, "a", "b"])
@pytest.mark.parametrize("case", list(_READERS))
def test_merge_is_exact_or_refused_beside_weight_readers(case: str, which: str | None) -> None:
    """DoRA's norm and IA3's input scaling read the layer's weight as it is, so merging another adapter under one
    that stays unmerged, or folding one in after another, would change the output: every merge either keeps the
    output (fp32 rounding) or is refused with nothing changed."""
    (n1, p1, k1), (n2, p2, k2) = _READERS[case]
    am = unipeft.attach(tiny_model("llama").eval(), p1, name=n1, **k1)
    am.add(n2, p2, **k2)
    am.activate(n1, n2)
    randomize(am, n1)
    randomize(am, n2, seed=1)
    x = inputs()
    with torch.no_grad():
        before = output_of(am(**x)).clone()
        if (case, which) in _EXACT:
            am.merge(which)
            torch.testing.assert_close(output_of(am(**x)), before, rtol=1e-5, atol=1e-5)
            return
        with pytest.raises(UnipeftError, match="reads the weight|composes after unmerged"):
            am.merge(which)
        assert am.merged == []
        torch.testing.assert_close(output_of(am(**x)), before, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["lora", "dora"])
def test_merge_of_a_float64_model_is_float64_exact(preset: str) -> None:
    """The merged update is computed in the weight's dtype when that is wider than fp32: merged outputs, and the
    weights after merge + unmerge, agree to fp64 rounding (fp32 arithmetic left ~1e-8)."""
    model = tiny_model("llama").eval().to(torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    am = unipeft.attach(model, preset)
    randomize(am)
    x = inputs()
    with torch.no_grad():
        unmerged = output_of(am(**x)).clone()
        merged = output_of(am.merge()(**x))
        assert (merged - unmerged).abs().max().item() < 1e-12
        am.unmerge()
    after = am.detach().state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-12


@pytest.mark.parametrize("preset", ["prefix", "mam", "unipelt"])
def test_a_deep_copy_keeps_its_prefixes_and_detaches_cleanly(preset: str) -> None:
    """The wiring from an attention module to its prefix wrapper travels with the module: a deep copy computes what
    the original does (its own copied prefix, not the original's and not none), and detaching the copy gives its
    attention modules their own attention implementation back."""
    import copy

    model = tiny_model("llama").eval()
    x = inputs()
    with torch.no_grad():
        base = output_of(model(**x)).clone()
    am = unipeft.attach(model, preset)
    randomize(am)
    twin = copy.deepcopy(am)
    with torch.no_grad():
        out = output_of(am(**x)).clone()
        assert not torch.allclose(out, base, atol=1e-3)
        torch.testing.assert_close(output_of(twin(**x)), out, rtol=0, atol=0)
        for p in twin.adapter_parameters("default").values():
            p.zero_()  # the copy's own parameters: the original does not change
        torch.testing.assert_close(output_of(am(**x)), out, rtol=0, atol=0)
    plain = twin.detach()
    assert {m.config._attn_implementation for m in plain.modules() if hasattr(m, "q_proj")} == {"sdpa"}


def test_activating_several_adapters_with_heads_equals_their_stack() -> None:
    """Two adapters that each trained their own classifier head: activate("a", "b") composes as Stack("a", "b"),
    head included (the last adapter's), and differs from the other order."""
    am = unipeft.attach(tiny_model("bert", head="cls").eval(), "lora", name="a", train_modules=["classifier"])
    am.add("b", "lora", train_modules=["classifier"])
    randomize(am, "a", seed=1)
    randomize(am, "b", seed=2)
    x = inputs()
    with torch.no_grad():
        plain = am.activate("a", "b")(**x).logits.clone()
        stacked = am.activate(unipeft.Stack("a", "b"))(**x).logits
        other = am.activate("b", "a")(**x).logits
    torch.testing.assert_close(plain, stacked, rtol=0, atol=0)
    assert not torch.allclose(plain, other, atol=1e-3)


def test_an_adapted_model_pickles_and_keeps_its_signature() -> None:
    """The handle's class is made per wrapped model class (its forward advertises the model's signature), so pickle
    cannot find it by name; it reduces to a rebuild of that class. (Round trip of bytes made here, in memory.)"""
    import inspect
    import pickle

    am = unipeft.attach(tiny_model("llama").eval(), "lora")
    randomize(am)
    x = inputs()
    back = pickle.loads(pickle.dumps(am))
    assert type(back) is type(am) and "adapter_names" in inspect.signature(back.forward).parameters
    with torch.no_grad():
        torch.testing.assert_close(output_of(back(**x)), output_of(am(**x)), rtol=0, atol=0)


def test_adapter_on_another_adapters_train_module_is_refused() -> None:
    am = unipeft.attach(tiny_model("llama"), "lora", name="a", train_modules=["lm_head"])
    with pytest.raises(UnipeftError, match="train module 'lm_head'"):
        am.add("b", "lora", targets=["lm_head"])


def test_dora_on_merged_weights_is_refused() -> None:
    am = unipeft.attach(tiny_model("llama"), "lora", name="a")
    am.merge()
    with pytest.raises(UnipeftError, match="unmerge"):
        am.add("d", "dora")


def test_prompt_with_logits_to_keep_return_dict_false_and_cache() -> None:
    am = unipeft.attach(tiny_model("llama").eval(), "prompt", length=3)
    x = inputs()
    with torch.no_grad():
        full = am(**x).logits
        assert am(**x, logits_to_keep=1).logits.shape == (2, 1, 64)
        torch.testing.assert_close(am(**x, logits_to_keep=1).logits, full[:, -1:])
        tup = am(**x, return_dict=False)
        assert isinstance(tup, tuple) and tup[0].shape == full.shape
        first = am(**x, use_cache=True)
        nxt = full[:, -1].argmax(-1, keepdim=True)
        mask = torch.ones(2, 3 + 7 + 1, dtype=torch.long)
        step = am(input_ids=nxt, attention_mask=mask, past_key_values=first.past_key_values).logits[:, -1]
        ids = torch.cat([x["input_ids"], nxt], dim=1)
        torch.testing.assert_close(step, am(input_ids=ids).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_prompt_routing_with_left_padding() -> None:
    model = tiny_model("gpt2").eval()
    am = unipeft.attach(model, "prompt", name="p", length=3)
    randomize(am, "p")
    x = inputs()
    x["attention_mask"][:, :2] = 0
    with torch.no_grad():
        routed = am(**x, adapter_names=["p", "__base__"]).logits
        alone = am(**{k: v[:1] for k, v in x.items()}).logits
        am.deactivate()
        base = am(**{k: v[1:] for k, v in x.items()}).logits
    torch.testing.assert_close(routed[:1, 2:], alone[:, 2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[1:, 2:], base[:, 2:], rtol=1e-5, atol=1e-5)


def test_routing_survives_interleaved_forwards_under_checkpointing() -> None:
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model("llama").train()
        am = unipeft.attach(model, "lora", name="a")
        am.add("b", "lora")
        randomize(am, "a")
        randomize(am, "b", seed=1)
        if checkpointing:
            am.gradient_checkpointing_enable()
        x = inputs()
        loss = output_of(am(**x, adapter_names=["a", "b"])).pow(2).mean()
        with torch.no_grad():
            am(**x, adapter_names=["b", "a"])  # another forward before backward (an eval, a reference pass)
        loss.backward()
        return {k: p.grad.clone() for k, p in am.adapter_parameters("a").items()}

    plain, ckpt = grads(False), grads(True)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6)


def test_save_never_deletes_foreign_files_in_an_adapter_folder(tmp_path) -> None:
    am = unipeft.attach(tiny_model("llama"), "lora")
    d = am.save(tmp_path / "ad")
    (d / "README.md").write_text("mine")
    with pytest.raises(UnipeftError, match="README.md"):
        am.save(d)
    assert (d / "README.md").read_text() == "mine"


@pytest.mark.parametrize("corrupt", [
    lambda ix: ix["adapters"]["default"].pop("file"),
    lambda ix: ix["adapters"]["default"].pop("recipe"),
    lambda ix: ix.update(format_version="1"),
    lambda ix: ix["adapters"].update(default=[1, 2]),
])
def test_malformed_index_is_a_one_line_error(tmp_path, corrupt) -> None:
    d = unipeft.attach(tiny_model("llama"), "lora").save(tmp_path / "ad")
    index = json.loads((d / INDEX).read_text())
    corrupt(index)
    (d / INDEX).write_text(json.dumps(index))
    with pytest.raises(UnipeftError) as e:
        unipeft.load(tiny_model("llama"), d)
    assert "\n" not in str(e.value)


def test_bad_api_arguments_are_unipeft_errors() -> None:
    model = tiny_model("llama")
    am = unipeft.attach(model, "lora")
    with pytest.raises(UnipeftError, match="already adapted"):
        unipeft.attach(model, "lora")
    with pytest.raises(UnipeftError, match="identifier"):
        am.add(1, "lora")
    with pytest.raises(UnipeftError, match="separate arguments"):
        am.activate(["default"])
    with pytest.raises(UnipeftError, match="one adapter name"):
        am.merge(["default"])
    for knob in ({"magnitude": "false"}, {"learn_scale": "no"}, {"layers": [1.7]}):
        with pytest.raises(UnipeftError):
            unipeft.preset("lora", **knob)
