"""Each function and composition checked against its explicit formula, computed here from the raw weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import inputs, output_of, tiny_model
from test_engine import randomize

import unipeft


def site(am, path: str, part: str, key: str, name: str = "default"):
    return am._wrappers[path].adapters[name][part][key]


@pytest.mark.parametrize("preset,scale", [("lora", 16 / 8), ("rslora", 16 / math.sqrt(8))])
def test_lora_formula(preset: str, scale: float) -> None:
    """LoRA: h + (α/r)·x·Aᵀ·Bᵀ (rsLoRA: α/√r), on a projection with a bias (BERT's query)."""
    am = unipeft.attach(tiny_model("bert"), preset)
    randomize(am)
    path = "encoder.layer.1.attention.self.query"
    wrapper, sa = am._wrappers[path], site(am, path, preset, "q")
    x = torch.randn(3, 5, 32)
    w, b = wrapper.base_layer.weight, wrapper.base_layer.bias
    a, bb = sa.fn.down.weight, sa.fn.up.weight
    expected = x @ w.T + b + scale * (x @ a.T @ bb.T)
    torch.testing.assert_close(wrapper(x), expected)


def test_dora_formula() -> None:
    """DoRA: m ⊙ (x·Vᵀ)/‖V‖_row + b with V = W + s·B·A."""
    am = unipeft.attach(tiny_model("bert"), "dora")
    randomize(am)
    path = "encoder.layer.0.attention.self.value"
    wrapper, sa = am._wrappers[path], site(am, path, "dora", "v")
    x = torch.randn(2, 4, 32)
    w, b = wrapper.base_layer.weight, wrapper.base_layer.bias
    v = w + 2.0 * sa.fn.up.weight @ sa.fn.down.weight
    expected = sa.magnitude * (x @ v.T) / v.norm(dim=1) + b
    torch.testing.assert_close(wrapper(x), expected)


def test_dora_magnitude_starts_at_weight_norm() -> None:
    am = unipeft.attach(tiny_model("llama"), "dora")
    path = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(site(am, path, "dora", "q").magnitude, am._wrappers[path].base_layer.weight.norm(dim=1))


def test_ia3_formulas() -> None:
    """IA3: k, v outputs scaled, (x·Wᵀ + b) ⊙ l; FFN down input scaled, (x ⊙ l)·Wᵀ + b."""
    am = unipeft.attach(tiny_model("bert"), "ia3")
    randomize(am)
    kpath, dpath = "encoder.layer.0.attention.self.key", "encoder.layer.0.output.dense"
    k, d = am._wrappers[kpath], am._wrappers[dpath]
    x = torch.randn(2, 3, 32)
    lk = site(am, kpath, "ia3", "k").fn.scale
    torch.testing.assert_close(k(x), (x @ k.base_layer.weight.T + k.base_layer.bias) * lk)
    xi = torch.randn(2, 3, 48)
    ld = site(am, dpath, "ia3", "down_in").fn.scale
    torch.testing.assert_close(d(xi), (xi * ld) @ d.base_layer.weight.T + d.base_layer.bias)


def test_gpt2_fused_projection_only_changes_its_chunk() -> None:
    """LoRA on q of GPT-2's fused c_attn (Conv1D, weight in × out) changes only the first third of the output."""
    am = unipeft.attach(tiny_model("gpt2"), "lora", targets=["q"])
    randomize(am)
    path = "transformer.h.0.attn.c_attn"
    wrapper, sa = am._wrappers[path], site(am, path, "lora", "q")
    x = torch.randn(2, 3, 32)
    base = x @ wrapper.base_layer.weight + wrapper.base_layer.bias
    delta = 2.0 * x @ sa.fn.down.weight.T @ sa.fn.up.weight.T
    expected = torch.cat([base[..., :32] + delta, base[..., 32:]], dim=-1)
    torch.testing.assert_close(wrapper(x), expected)


def _bottleneck(fn, x):
    return fn.up(fn.act(fn.down(fn.norm(x))))


def test_sequential_bottleneck_formula_llama() -> None:
    """Houlsby/Pfeiffer (sequential at the FFN): h + f(h), h = the FFN's output (Llama: down_proj's output)."""
    am = unipeft.attach(tiny_model("llama"), "pfeiffer", layer_norm=True)
    randomize(am)
    path = "model.layers.1.mlp.down_proj"
    wrapper, sa = am._wrappers[path], site(am, path, "pfeiffer", "ffn")
    assert sa.fn.down.out_features == 2  # 32 / reduction factor 16
    x = torch.randn(2, 3, 48)
    h = x @ wrapper.base_layer.weight.T
    torch.testing.assert_close(wrapper(x), h + _bottleneck(sa.fn, h))
    assert isinstance(sa.fn.norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("preset,s", [("parallel", 1.0), ("scaled_parallel", 4.0)])
def test_parallel_adapter_formula_llama(preset: str, s: float) -> None:
    """Parallel adapter at the FFN (Llama): mlp(x) + s·f(x) with x the FFN sublayer's input."""
    am = unipeft.attach(tiny_model("llama"), preset)
    randomize(am)
    path = "model.layers.0.mlp"
    wrapper, sa = am._wrappers[path], site(am, path, preset, "ffn")
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        expected = wrapper.base_layer(x) + s * _bottleneck(sa.fn, x)
        torch.testing.assert_close(wrapper(x), expected)


def test_parallel_adapter_formula_bert_post_ln() -> None:
    """BERT's FFN block adds the residual inside a LayerNorm: LN(dense(i) + x + s·f(x)), x the FFN input."""
    model = tiny_model("bert").eval()
    am = unipeft.attach(model, "scaled_parallel")
    randomize(am)
    path = "encoder.layer.0.output"
    wrapper, sa = am._wrappers[path], site(am, path, "scaled_parallel", "ffn")
    inter, x = torch.randn(2, 3, 48), torch.randn(2, 3, 32)
    block = wrapper.base_layer
    with torch.no_grad():
        expected = block.LayerNorm(inter @ block.dense.weight.T + block.dense.bias + x + 4.0 * _bottleneck(sa.fn, x))
        torch.testing.assert_close(wrapper(inter, x), expected)


def test_gated_composition_formula() -> None:
    """Gated (UniPELT's LoRA): h + σ(x·w_g + b_g)·x·Aᵀ·Bᵀ."""
    am = unipeft.attach(tiny_model("llama"), "unipelt")
    randomize(am)
    path = "model.layers.0.self_attn.q_proj"
    wrapper, sa = am._wrappers[path], site(am, path, "lora", "q")
    x = torch.randn(2, 3, 32)
    gate = torch.sigmoid(x @ sa.gate.weight.T + sa.gate.bias)
    expected = x @ wrapper.base_layer.weight.T + gate * (x @ sa.fn.down.weight.T @ sa.fn.up.weight.T)
    torch.testing.assert_close(wrapper(x), expected)


def test_learned_scale_is_a_parameter() -> None:
    am = unipeft.attach(tiny_model("llama"), "lora", learn_scale=True)
    sa = site(am, "model.layers.0.self_attn.q_proj", "lora", "q")
    assert float(sa.learned_scale.detach()) == 2.0 and sa.learned_scale.requires_grad


def test_bert_attention_prefix_formula() -> None:
    """Prefix at BERT self-attention: softmax(q·[P_k; K]ᵀ/√d)·[P_v; V] per head (no mask, encoder)."""
    model = tiny_model("bert", attn="eager").eval()
    am = unipeft.attach(model, "prefix", length=3, reparam_hidden=None)
    randomize(am)
    path = "encoder.layer.0.attention.self"
    wrapper, sa = am._wrappers[path], site(am, path, "prefix", "kv")
    attn = wrapper.base_layer
    hs = torch.randn(2, 5, 32)

    def heads(t):
        return t.view(2, -1, 4, 8).transpose(1, 2)

    q, k, v = heads(attn.query(hs)), heads(attn.key(hs)), heads(attn.value(hs))
    pk, pv = sa.fn.kv()
    k = torch.cat([pk[None].expand(2, -1, -1, -1), k], dim=2)
    v = torch.cat([pv[None].expand(2, -1, -1, -1), v], dim=2)
    expected = (F.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v).transpose(1, 2).reshape(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(hs)[0], expected)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_decoder_prefix_equals_a_kv_cache_prefix(family: str, attn: str) -> None:
    """Reference: transformers' own KV cache holding P_k, P_v at every layer, with the real tokens at positions
    0..T-1 and an all-ones mask over prefix + tokens. unipeft's prefix must give identical logits (GQA: 2 KV heads)."""
    from transformers import DynamicCache

    model = tiny_model(family, attn=attn).eval()
    am = unipeft.attach(model, "prefix", length=4, reparam_hidden=16)
    randomize(am)
    x = inputs(batch=2, seq=6)
    with torch.no_grad():
        ours = output_of(am(**x))
        am.deactivate()
        cache = DynamicCache(config=model.config)
        for i, path in enumerate(sorted(am._wrappers, key=lambda p: int(p.split(".")[-2]))):
            pk, pv = am._wrappers[path].adapters["default"]["prefix"]["kv"].fn.kv()
            cache.update(pk[None].expand(2, -1, -1, -1), pv[None].expand(2, -1, -1, -1), i)
        mask = torch.ones(2, 4 + 6, dtype=torch.long)
        pos = torch.arange(6)[None].expand(2, -1)
        reference = output_of(model(input_ids=x["input_ids"], attention_mask=mask, past_key_values=cache,
                                    position_ids=pos))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_prompt_formula() -> None:
    """Prompt tuning: the model run on [P; E(ids)] with the prompt positions dropped from the output."""
    model = tiny_model("llama").eval()
    am = unipeft.attach(model, "prompt", length=3)
    x = inputs()
    tokens = site(am, "model.embed_tokens", "prompt", "embeddings").fn.weight
    with torch.no_grad():
        ours = output_of(am(**x))
        am.deactivate()
        embeds = torch.cat([tokens[None].expand(2, -1, -1), model.get_input_embeddings()(x["input_ids"])], dim=1)
        reference = output_of(model(inputs_embeds=embeds, attention_mask=torch.ones(2, 3 + 7)))[:, 3:]
    torch.testing.assert_close(ours, reference)


def test_prompt_vocab_init_copies_vocabulary_rows() -> None:
    model = tiny_model("llama")
    am = unipeft.attach(model, "prompt", length=5)
    tokens = site(am, "model.embed_tokens", "prompt", "embeddings").fn.weight
    vocab = am._wrappers["model.embed_tokens"].base_layer.weight
    for row in tokens:
        assert (vocab == row).all(dim=1).any()


def test_prompt_loss_counts_real_tokens_only() -> None:
    """Labels gain -100 at the prompt positions: the loss is the mean cross-entropy of predicting each real token
    (the first one from the last prompt position, as peft does), nothing for the prompt itself."""
    model = tiny_model("llama").eval()
    am = unipeft.attach(model, "prompt", length=3)
    x = inputs()
    tokens = site(am, "model.embed_tokens", "prompt", "embeddings").fn.weight
    with torch.no_grad():
        loss = am(**x, labels=x["input_ids"]).loss
        am.deactivate()
        embeds = torch.cat([tokens[None].expand(2, -1, -1), model.get_input_embeddings()(x["input_ids"])], dim=1)
        full = model(inputs_embeds=embeds).logits
    expected = F.cross_entropy(full[:, 2:-1].reshape(-1, full.shape[-1]), x["input_ids"].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_gated_prefix_formula() -> None:
    """Gated prefix (UniPELT): Attn(x) + g·(Attn_prefix(x) − Attn(x)), g = σ(x_t·w + b) per token."""
    model = tiny_model("bert", attn="eager").eval()
    am = unipeft.attach(model, "prefix", composition="gated", length=3, reparam_hidden=None)
    randomize(am, std=0.3)
    path = "encoder.layer.0.attention.self"
    wrapper, sa = am._wrappers[path], site(am, path, "prefix", "kv")
    attn = wrapper.base_layer
    hs = torch.randn(2, 5, 32)

    def heads(t):
        return t.view(2, -1, 4, 8).transpose(1, 2)

    def attention(k, v):
        return (F.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v).transpose(1, 2).reshape(2, 5, 32)

    q, k, v = heads(attn.query(hs)), heads(attn.key(hs)), heads(attn.value(hs))
    pk, pv = sa.fn.kv()
    prefixed = attention(torch.cat([pk[None].expand(2, -1, -1, -1), k], 2),
                         torch.cat([pv[None].expand(2, -1, -1, -1), v], 2))
    base = attention(k, v)
    g = torch.sigmoid(hs @ sa.gate.weight.T + sa.gate.bias)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(hs)[0], base + g * (prefixed - base))
        sa.gate.bias.fill_(-1e4)  # gate shut: exactly the frozen attention
        torch.testing.assert_close(wrapper(hs)[0], base)


def test_prefix_refuses_flash_attention() -> None:
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(unipeft.UnipeftError, match="needs eager or sdpa attention, not 'flash_attention_2'"):
        unipeft.attach(model, "prefix")
    assert not any("base_layer" in n for n, _ in model.named_modules()), "a refused attach leaves no wrapper behind"
    assert all(p.requires_grad for p in model.parameters()), "and leaves requires_grad as it was"
