"""Per-sample routing (`adapter_names=`), generation with the KV cache, and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import inputs, output_of, tiny_model
from test_engine import PRESETS, randomize

import unipeft
from unipeft import UnipeftError

MIX = {"a": "lora", "b": "ia3", "c": "houlsby", "d": "prefix", "e": "prompt", "f": "dora"}


def mixed(family: str, attn: str = "sdpa") -> unipeft.AdaptedModel:
    model = tiny_model(family, attn=attn).eval()
    am = None
    for i, (name, preset) in enumerate(MIX.items()):
        am = unipeft.attach(model, preset, name=name) if am is None else am.add(name, preset)
        randomize(am, name, seed=i)
    return am


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_routing_equals_each_row_alone(family: str, attn: str) -> None:
    am = mixed(family, attn)
    names = ["a", "b", "__base__", "c", "d", "e", "f"]
    x = inputs(batch=len(names), seq=5)
    with torch.no_grad():
        routed = output_of(am(**x, adapter_names=names))
        for row, name in enumerate(names):
            if name == "__base__":
                am.deactivate()
            else:
                am.activate(name)
            alone = output_of(am(**{k: v[row:row + 1] for k, v in x.items()}))
            torch.testing.assert_close(routed[row:row + 1], alone, rtol=1e-5, atol=1e-5, msg=f"row {row} ({name})")


def test_routing_beside_a_prompt_keeps_first_token_heads_exact() -> None:
    """BERT's pooler and classification head read the first position: in a routed batch with a prompt adapter every
    row must start where it would alone — its own prompt token, or [CLS] for rows without one (the rows are packed,
    prompt.py) — so logits and pooled outputs equal each row alone, hidden states included."""
    model = tiny_model("bert", head="cls").eval()
    am = None
    for i, (name, preset) in enumerate(MIX.items()):
        am = unipeft.attach(model, preset, name=name) if am is None else am.add(name, preset)
        randomize(am, name, seed=i)
    names = ["e", "__base__", "a", "e", "c"]
    x = inputs(batch=len(names), seq=6)
    with torch.no_grad():
        routed = am(**x, adapter_names=names, output_hidden_states=True)
        for row, name in enumerate(names):
            am.deactivate() if name == "__base__" else am.activate(name)
            alone = am(**{k: v[row:row + 1] for k, v in x.items()}, output_hidden_states=True)
            torch.testing.assert_close(routed.logits[row:row + 1], alone.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(routed.hidden_states[-1][row:row + 1], alone.hidden_states[-1], rtol=1e-5,
                                       atol=1e-5, msg=f"row {row} ({name})")


def test_routing_errors() -> None:
    am = mixed("llama")
    x = inputs(batch=2)
    with pytest.raises(UnipeftError, match="3 entries but the batch has 2 rows"):
        am(**x, adapter_names=["a", "b", "c"])
    with pytest.raises(UnipeftError, match=r"unknown adapter\(s\) \['zz'\]"):
        am(**x, adapter_names=["a", "zz"])
    am.activate("a")
    am.merge()
    with pytest.raises(UnipeftError, match="unmerged"):
        am(**x, adapter_names=["a", "a"])


def greedy_without_cache(am, ids: torch.Tensor, steps: int, **kw) -> torch.Tensor:
    """The reference decoder: re-run the full sequence each step (no KV cache) and take the argmax."""
    for _ in range(steps):
        logits = am(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("preset", ["prefix", "prompt", "mam", "unipelt", "lora"])
def test_generate_with_kv_cache_matches_full_recompute_gqa(preset: str) -> None:
    """Prefix tuning with generate() and the KV cache on a GQA model (4 heads, 2 KV heads)."""
    am = unipeft.attach(tiny_model("llama").eval(), preset)
    randomize(am, std=0.3)
    ids = inputs(batch=2, seq=4)["input_ids"]
    with torch.no_grad():
        generated = am.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False, pad_token_id=0)
        reference = greedy_without_cache(am, ids, 6)
    assert torch.equal(generated, reference)


def test_generate_with_routing() -> None:
    am = mixed("llama")
    ids = inputs(batch=3, seq=4)["input_ids"]
    names = ["d", "a", "e"]
    with torch.no_grad():
        routed = am.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=0, adapter_names=names)
        for row, name in enumerate(names):
            am.activate(name)
            alone = greedy_without_cache(am, ids[row:row + 1], 5)
            assert torch.equal(routed[row:row + 1], alone), name


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("preset", PRESETS)
def test_gradient_checkpointing_gives_the_same_gradients(family: str, preset: str) -> None:
    def grads(checkpointing: bool, routed: bool) -> dict[str, torch.Tensor]:
        model = tiny_model(family).train()
        am = unipeft.attach(model, preset)
        am.add("other", "lora")
        randomize(am)
        if checkpointing:
            model.gradient_checkpointing_enable()  # transformers' default settings, as a user would call it
        x = inputs(batch=2)
        names = ["default", "other"] if routed else None
        output_of(am(**x, adapter_names=names)).pow(2).mean().backward()
        return {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}

    for routed in (False, True):
        plain, ckpt = grads(False, routed), grads(True, routed)
        assert plain.keys() == ckpt.keys()
        for k in plain:
            torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


class _Walks(dict):
    """AdaptedModel._wrappers that counts the walks over its layers."""

    walks = 0

    def values(self):
        self.walks += 1
        return super().values()

    def items(self):
        self.walks += 1
        return super().items()


def test_a_plain_call_walks_no_layer_for_routing_or_prompts() -> None:
    """Without per-sample routing and prompt adapters a model call reads no layer to clear a routing or to look for
    prompt tokens (per layer, a compiled call paid an identity guard evaluated in Python and a replayed write);
    after a routed call the next plain call clears the routing from every layer, and only that one walks them."""
    am = unipeft.attach(tiny_model("llama").eval(), "lora")
    am.add("b", "lora")
    randomize(am, "b")
    spy = _Walks(am._wrappers)
    am._wrappers = spy
    x = inputs(batch=2)
    with torch.no_grad():
        plain = output_of(am(**x))
        assert spy.walks == 0
        routed = output_of(am(**x, adapter_names=["b", "default"]))
        assert all(w.routing is not None for w in dict.values(spy)) and spy.walks == 1
        again = output_of(am(**x))
        assert all(w.routing is None for w in dict.values(spy)) and spy.walks == 2
        output_of(am(**x))
        assert spy.walks == 2
    torch.testing.assert_close(again, plain)
    assert not torch.allclose(routed[:1], plain[:1])  # row 0 ran adapter b, so the routing did act


def test_prompt_adapters_are_found_after_others() -> None:
    """The model-level flag follows the layers: a prompt adapter added after a LoRA one is seen, detach resets it."""
    model = tiny_model("llama").eval()
    am = unipeft.attach(model, "lora")
    x = inputs(batch=1)
    assert not am.__dict__["_has_prompt"]
    am.add("p", "prompt")
    randomize(am, "p")
    am.activate("p")
    assert am.__dict__["_has_prompt"]
    with torch.no_grad():
        with_prompt = output_of(am(**x))
        am.deactivate()
        without = output_of(am(**x))
    assert with_prompt.shape == without.shape and not torch.allclose(with_prompt, without)
    am.detach()
    assert not am.__dict__["_has_prompt"]
