"""The engine on tiny random-init models of every mapped family: every preset attaches, trains only adapter
parameters, starts as the identity where its init says so, merges exactly, and detaches bit-exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, inputs, output_of, tiny_model

import unipeft
from unipeft import UnipeftError

PRESETS = unipeft.list_presets()
ZERO_INIT = {"lora", "rslora", "dora", "ia3", "houlsby", "pfeiffer", "parallel", "scaled_parallel"}
MERGEABLE = {"lora", "rslora", "dora", "ia3"}


def randomize(am: unipeft.AdaptedModel, name: str = "default", seed: int = 0, std: float = 0.1) -> None:
    """Move every adapter parameter away from its init so merge/formula checks are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapter_parameters(name).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_only_adapter_parameters(family: str, preset: str) -> None:
    model = tiny_model(family).eval()
    x = inputs()
    with torch.no_grad():
        reference = output_of(model(**x)).clone()
    am = unipeft.attach(model, preset)
    out = output_of(am(**x))
    assert out.shape == reference.shape
    if preset in ZERO_INIT:
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(out, reference, atol=1e-4), f"{preset} should change outputs at init"
    out.pow(2).mean().backward()
    adapter = {id(p) for p in am.adapter_parameters("default").values()}
    assert adapter, "no adapter parameters"
    for n, p in am.named_parameters():
        if id(p) in adapter:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert any(float(p.grad.abs().sum()) > 0 for p in am.adapter_parameters("default").values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_detach_restores_bit_identical_state_dict(family: str, preset: str) -> None:
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    am = unipeft.attach(model, preset)
    randomize(am)
    restored = am.detach()
    after = restored.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert {n: p.requires_grad for n, p in restored.named_parameters()} == flags
    assert not any("adapters" in n or "base_layer" in n for n, _ in restored.named_modules())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", sorted(MERGEABLE))
def test_merge_matches_unmerged_and_unmerge_restores(family: str, preset: str) -> None:
    model = tiny_model(family).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    am = unipeft.attach(model, preset, r=4) if preset != "ia3" else unipeft.attach(model, preset)
    randomize(am, std=0.2)
    x = inputs()
    with torch.no_grad():
        unmerged = output_of(am(**x)).clone()
        am.merge()
        merged = output_of(am(**x)).clone()
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(w.base_layer.weight, weights[f"{path}.weight"]) for path, w in am._wrappers.items())
    am.unmerge()
    with torch.no_grad():
        torch.testing.assert_close(output_of(am(**x)), unmerged, rtol=1e-5, atol=1e-5)
    restored = am.detach().state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(restored[k], v, rtol=0, atol=1e-6)


def test_merged_weights_stay_after_detach_and_differ_from_base() -> None:
    model = tiny_model("llama").eval()
    base_q = model.model.layers[0].self_attn.q_proj.weight.clone()
    am = unipeft.attach(model, "lora")
    randomize(am)
    x = inputs()
    with torch.no_grad():
        expected = output_of(am(**x)).clone()
        am.merge()
        plain = am.detach()
        torch.testing.assert_close(output_of(plain(**x)), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(plain.model.layers[0].self_attn.q_proj.weight, base_q)


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - MERGEABLE))
def test_non_mergeable_preset_refuses_merge_with_reason(preset: str) -> None:
    am = unipeft.attach(tiny_model("llama"), preset)
    with pytest.raises(UnipeftError, match="cannot be merged") as e:
        am.merge()
    assert "\n" not in str(e.value)


# ---- named adapters --------------------------------------------------------------------------------------------------
def test_add_activate_deactivate_remove() -> None:
    model = tiny_model("llama").eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs()
    with torch.no_grad():
        base = output_of(model(**x)).clone()
    am = unipeft.attach(model, "lora", name="a")
    am.add("b", "houlsby")
    assert am.active == ["a"], "add() does not activate a second adapter"
    randomize(am, "a", seed=1)
    randomize(am, "b", seed=2)
    with torch.no_grad():
        only_a = output_of(am(**x)).clone()
        am.activate("b")
        only_b = output_of(am(**x)).clone()
        am.activate("a", "b")
        both = output_of(am(**x)).clone()
        am.deactivate()
        none = output_of(am(**x)).clone()
    assert not torch.allclose(only_a, only_b)
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    torch.testing.assert_close(none, base, rtol=0, atol=0)
    am.activate("a", "b")
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert any(".adapters.a." in n for n in trainable) and any(".adapters.b." in n for n in trainable)
    am.activate("b")
    assert not any(".adapters.a." in n for n, p in am.named_parameters() if p.requires_grad)
    am.remove("a")
    am.remove("b")
    assert am.recipes == {}
    assert list(am.model.state_dict()) == list(original)
    with pytest.raises(UnipeftError, match="no adapter 'zzz'"):
        am.activate("zzz")


def test_summary_counts_each_adapter() -> None:
    model = tiny_model("llama")
    am = unipeft.attach(model, "lora", name="a")
    am.add("b", "ia3")
    text = am.summary()
    # lora r=8 on q (32->32) and v (32->16, GQA) in 2 layers: A r×in + B out×r per site.
    lora = 2 * ((8 * 32 + 32 * 8) + (8 * 32 + 16 * 8))
    ia3 = 2 * (16 + 16 + 48)  # k and v outputs (2 KV heads × 8) and the FFN down input
    assert sum(p.numel() for p in am.adapter_parameters("a").values()) == lora
    assert sum(p.numel() for p in am.adapter_parameters("b").values()) == ia3
    assert f"{lora:,}" in text and f"{ia3:,}" in text and "inactive" in text


def test_train_modules_are_per_adapter_copies_saved_with_the_adapter(tmp_path) -> None:
    model = tiny_model("bert", head="cls")
    head_before = model.classifier.weight.clone()
    am = unipeft.attach(model, "lora", train_modules=["classifier"])
    keys = list(am.adapter_parameters("default"))
    assert "classifier::module.weight" in keys and "classifier::module.bias" in keys
    x = inputs()
    am(**x, labels=torch.tensor([0, 1])).loss.backward()
    assert am.model.classifier.copies["default"].weight.grad is not None
    assert am.model.classifier.base_layer.weight.grad is None
    torch.optim.SGD([p for p in am.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(am.model.classifier.base_layer.weight, head_before)
    with pytest.raises(UnipeftError, match="matches no module"):
        am.add("x", "lora", train_modules=["no_such_head"])


# ---- errors ----------------------------------------------------------------------------------------------------------
def test_missing_site_lists_what_exists() -> None:
    with pytest.raises(UnipeftError, match=r"site\(s\) gate do not exist on bert.*available: q, k, v") as e:
        unipeft.attach(tiny_model("bert"), "lora", targets=["gate"])
    assert "\n" not in str(e.value)


def test_target_matching_nothing_lists_linear_modules() -> None:
    with pytest.raises(UnipeftError, match="target 'nope' .* matched nothing; linear modules are e.g.") as e:
        unipeft.attach(tiny_model("llama"), "lora", targets=["nope"])
    assert "q_proj" in str(e.value)


def test_target_matching_non_linear_is_refused() -> None:
    with pytest.raises(UnipeftError, match="only non-linear modules"):
        unipeft.attach(tiny_model("llama"), "lora", targets=["input_layernorm"])


def test_layers_out_of_range() -> None:
    with pytest.raises(UnipeftError, match=r"layer\(s\) \[5\] do not exist; the model has 2 layers"):
        unipeft.attach(tiny_model("llama"), "lora", layers=[0, 5])


def test_failed_add_leaves_model_unchanged() -> None:
    model = tiny_model("llama")
    am = unipeft.attach(model, "lora", name="a")
    state = {k: v.clone() for k, v in am.state_dict().items()}
    with pytest.raises(UnipeftError):
        am.add("b", "lora", train_modules=["nope"])
    with pytest.raises(UnipeftError):
        am.add("c", {"name": "bad", "parts": {"x": {"function": "lowrank", "composition": "scaled", "r": 4,
                                                   "alpha": 8, "scale": "alpha/r", "sites": ["q"]},
                                             "y": {"function": "lowrank", "composition": "add", "r": 2,
                                                   "targets": ["nothing_here"]}}})
    assert list(am.recipes) == ["a"]
    assert list(am.state_dict()) == list(state)


def test_attach_twice_and_bad_names() -> None:
    am = unipeft.attach(tiny_model("llama"), "lora")
    with pytest.raises(UnipeftError, match="already adapted"):
        unipeft.attach(am, "lora")
    with pytest.raises(UnipeftError, match="already exists"):
        am.add("default", "ia3")
    with pytest.raises(UnipeftError, match="identifier"):
        am.add("my.adapter", "ia3")


def test_unknown_architecture_uses_name_patterns() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(
                torch.nn.ModuleDict({"fc1": torch.nn.Linear(8, 16), "fc2": torch.nn.Linear(16, 8)}) for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = x + b["fc2"](torch.relu(b["fc1"](x)))
            return x

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 8)
    assert unipeft.sites(net) == []
    with pytest.raises(UnipeftError, match="no interface map"):
        unipeft.attach(net, "lora")
    am = unipeft.attach(net, "lora", targets=["fc1", "blocks.2.fc2"], layers=[0, 2])
    wrapped = sorted(am._wrappers)
    assert wrapped == ["blocks.0.fc1", "blocks.2.fc1", "blocks.2.fc2"]
    randomize(am)
    lora_a = am.model.blocks[0]["fc1"].adapters["default"]["lora"]["out"].fn
    with torch.no_grad():
        h = am.model.blocks[0]["fc1"](x)
        expected = net.blocks[0]["fc1"].base_layer(x) + 2.0 * (x @ lora_a.down.weight.T @ lora_a.up.weight.T)
    torch.testing.assert_close(h, expected)
    am2 = unipeft.attach(Net(), "ia3", targets=["fc2:in"])
    assert all(w.adapters["default"]["ia3"]["in"].role == "in" for w in am2._wrappers.values())


@pytest.mark.parametrize("preset", PRESETS)
def test_adapter_dtype_follows_base_unless_the_recipe_says(preset: str) -> None:
    """Adapters take the frozen weight's dtype (no silent fp32 upcast); dtype=float32 keeps fp32 master weights on a
    bf16 base, and the output keeps the base's dtype either way."""
    x = inputs()
    for dtype, expected in ((None, torch.bfloat16), ("float32", torch.float32)):
        model = tiny_model("llama").to(torch.bfloat16)
        am = unipeft.attach(model, preset) if dtype is None else unipeft.attach(model, preset, dtype=dtype)
        assert {p.dtype for p in am.adapter_parameters("default").values()} == {expected}
        out = output_of(am(**x))
        assert out.dtype == torch.bfloat16
        out.float().mean().backward()
