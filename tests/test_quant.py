"""Quantized bases (QLoRA) with bitsandbytes on CPU (fp32 compute): every preset family attaches, numerics equal the
same adapter on the dequantized float model, the exact dequantized merge, the flagged lossy merge, transformers'
BitsAndBytesConfig bases, QLoRA on the real SmolLM2, and the CLI (--quantize, --optim adamw8bit, merge)."""

from __future__ import annotations

import copy
import json
import sys
import warnings

import pytest
import torch
import transformers as T
from conftest import inputs, output_of, tiny_model
from test_engine import randomize
from test_train_cli import cli

import unipeft
from unipeft import UnipeftError, fused, quant

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

KINDS = ("nf4", "fp4", "int8")
FAMILIES = ("lora", "dora", "ia3", "houlsby", "parallel", "prefix", "prompt", "mam", "unipelt")


def _quantized(kind: str, seed: int = 0) -> torch.nn.Module:
    return quant.quantize(tiny_model("llama", seed=seed), kind, compute_dtype=torch.float32)


def _twin(am, reference: torch.nn.Module, preset: str):
    """The same adapter weights on another base (here: the dequantized float model)."""
    other = unipeft.attach(reference, preset)
    with torch.no_grad():
        for k, p in other.adapter_parameters("default").items():
            p.copy_(am.adapter_parameters("default")[k])
    return other


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", FAMILIES)
def test_every_preset_family_on_a_quantized_base(kind: str, preset: str) -> None:
    model = _quantized(kind)
    assert sum(quant.is_quantized(m) for m in model.modules()) == 14  # 7 linears × 2 layers; head stays float
    reference = quant.dequantize_model(copy.deepcopy(model), torch.float32)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    am = unipeft.attach(model, preset)
    randomize(am)
    twin = _twin(am, reference, preset)
    x = inputs()
    out = output_of(am(**x))
    torch.testing.assert_close(out, output_of(twin(**x)), rtol=1e-5, atol=1e-5)
    out.float().pow(2).mean().backward()
    adapter = am.adapter_parameters("default")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.values())
    torch.optim.AdamW(adapter.values(), lr=1e-2).step()
    for n, p in am.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", ["lora", "dora", "ia3"])
def test_merge_dequantized_gives_a_plain_model_with_the_same_outputs(kind: str, preset: str, tmp_path) -> None:
    am = unipeft.attach(_quantized(kind), preset)
    randomize(am)
    x = inputs()
    with torch.no_grad():
        expected = output_of(am(**x))
    plain = am.merge_dequantized()
    assert not any(quant.is_quantized(m) or getattr(m, "_unipeft_wrapper", False) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(output_of(plain(**x)), expected, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(again(**x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_move_between_a_quantized_base_and_its_float_model(kind: str, tmp_path) -> None:
    """Train on the 4/8-bit base, serve on the float model (and back): the saved fingerprint records the weights'
    logical shapes, not bitsandbytes' packed storage, and the adapter computes the same on both."""
    model = _quantized(kind)
    reference = quant.dequantize_model(copy.deepcopy(model), torch.float32)
    am = unipeft.attach(model, "lora")
    randomize(am)
    am.save(tmp_path / "q")
    on_float = unipeft.load(reference, tmp_path / "q")  # (the float twin of the quantized weights)
    with torch.no_grad():
        torch.testing.assert_close(output_of(on_float(**inputs())), output_of(am(**inputs())), rtol=1e-5, atol=1e-5)
    on_float.save(tmp_path / "f")
    back = unipeft.load(_quantized(kind), tmp_path / "f")
    trained = am.adapter_parameters("default")
    assert all(torch.equal(p, trained[k]) for k, p in back.adapter_parameters("default").items())


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_keeps_the_mode_and_eval_outputs_match_the_dequantized_merge(kind: str) -> None:
    """An eval model stays eval through quantize(); in eval mode 4-bit bases still merge exactly, while an int8 base
    itself computes with fp16 activations (bitsandbytes' int8 inference path): close, not exact."""
    model = tiny_model("llama").eval()
    quant.quantize(model, kind, compute_dtype=torch.float32)
    assert not any(m.training for m in model.modules() if quant.is_quantized(m))
    am = unipeft.attach(model, "lora")
    randomize(am)
    x = inputs()
    with torch.no_grad():
        unmerged = output_of(am(**x)).clone()
        plain = am.merge_dequantized().eval()
        gap = (output_of(plain(**x)) - unmerged).abs().max().item()
    assert gap < (1e-2 if kind == "int8" else 1e-6), gap


def test_non_mergeable_recipes_are_refused_before_anything_changes() -> None:
    am = unipeft.attach(_quantized("nf4"), "houlsby")
    with pytest.raises(UnipeftError, match="cannot be merged"):
        am.merge_dequantized()
    assert any(quant.is_quantized(w.base_layer) for w in am._wrappers.values()) or am._wrappers


def test_merge_into_quantized_weights_needs_the_flag_and_reports_the_rounding() -> None:
    am = unipeft.attach(_quantized("nf4"), "lora")
    randomize(am, std=0.5)
    x = inputs()
    with torch.no_grad():
        before = output_of(am(**x))
    with pytest.raises(UnipeftError, match="merge_dequantized"):
        am.merge()
    with pytest.warns(UserWarning, match="rounding error up to"):
        am.merge(requantize=True)
    report = am.merge_report
    assert report["quantized_modules"] == 4 and report["max_abs_rounding_error"] > 0  # q and v in 2 layers
    assert all(quant.is_quantized(w.base_layer) for w in am._wrappers.values())
    with torch.no_grad():
        after = output_of(am(**x))
    assert (after - before).abs().max() < 0.5 and not torch.equal(after, before)
    with pytest.raises(UnipeftError, match="cannot be taken out exactly"):
        am.unmerge()


@pytest.mark.parametrize("bits", [4, 8])
def test_bases_loaded_with_transformers_bitsandbytes_config(bits: int, tmp_path) -> None:
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128)).save_pretrained(tmp_path)
    cfg = (T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32) if bits == 4 else
           T.BitsAndBytesConfig(load_in_8bit=True))
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg, device_map="cpu")
    assert any(quant.is_quantized(m) for m in model.modules())
    am = unipeft.attach(model, "lora").eval()  # attach opts the layers out of bitsandbytes' lossy CPU repacking
    randomize(am)
    with torch.no_grad():
        out = output_of(am(**inputs()))
    plain = am.merge_dequantized()
    with torch.no_grad():  # int8 here casts activations to fp16 inside bitsandbytes: a looser match
        torch.testing.assert_close(output_of(plain(**inputs())), out, rtol=0,
                                   atol=1e-5 if bits == 4 else 5e-3)


def test_dequantized_weight_survives_bitsandbytes_cpu_repacking() -> None:
    """On CPUs with AVX512-bf16, bitsandbytes repacks a 4-bit weight for its CPU kernel at the first eval-mode
    forward (block scales rounded to bf16) unless the layer opted out. For layers that did not go through unipeft,
    `dequantized_weight` must undo the packing, not misread it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    model = torch.nn.Sequential(lin)
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    model[0] = q.to("cpu")
    before = quant.dequantized_weight(model[0])
    with torch.no_grad():
        model.eval()(torch.randn(3, 128))
    packed = getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
    after = quant.dequantized_weight(model[0])
    if packed:
        torch.testing.assert_close(after, before, rtol=0, atol=2e-2 * before.abs().max().item())
    else:
        assert torch.equal(after, before)
    assert (after - lin.weight).abs().max() < 0.2 * lin.weight.abs().max()


def test_qlora_on_smollm2_lowers_the_loss(smollm2_path) -> None:
    model = T.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    tok = T.AutoTokenizer.from_pretrained(smollm2_path)
    quant.quantize(model, "nf4", double_quant=True, compute_dtype=torch.float32)
    fp = quant.footprint(model)
    assert 0.5 < fp["bytes_per_quantized_weight"] < 0.56, fp  # 4 bits + double-quantized block scales
    am = unipeft.attach(model, "lora", r=8)
    batch = tok(["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"],
                return_tensors="pt")
    opt = torch.optim.AdamW(am.adapter_parameters("default").values(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = am(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_cli_quantized_run_adamw8bit_and_merge(tiny_llama, tmp_path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    run = tmp_path / "run"
    cli("train", "--model", tiny_llama, "--data", str(corpus), "--quantize", "nf4", "--optim", "adamw8bit",
        "--max-steps", "3", "--batch-size", "4", "--max-length", "32", "--out", str(run), "--quiet", capsys=capsys)
    results = json.loads((run / "results.json").read_text())
    assert results["summary"]["steps"] == 3
    am = unipeft.from_pretrained(run)
    assert any(quant.is_quantized(w.base_layer) for w in am._wrappers.values())
    cli("merge", str(run), "--to", str(tmp_path / "merged"), capsys=capsys)
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, am(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    text = cli("train", "--model", tiny_llama, "--data", str(corpus), "--quantize", "nf4", "--method", "full",
               "--out", str(tmp_path / "x"), expect=2, capsys=capsys)
    assert "--quantize freezes a quantized base" in text


def test_without_bitsandbytes_quantization_is_a_one_line_error(monkeypatch, tiny_llama, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UnipeftError, match=r"pip install 'unipeft\[quant\]'"):
        quant.quantize(tiny_model("llama"), "nf4")
    corpus = tmp_path / "c.txt"
    corpus.write_text("some words to train on. " * 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = cli("train", "--model", tiny_llama, "--data", str(corpus), "--quantize", "nf4", "--out",
                   str(tmp_path / "r"), "--quiet", expect=2, capsys=capsys)
    assert text.strip().count("\n") == 0 and "unipeft[quant]" in text and "Traceback" not in text
    assert not (tmp_path / "r" / "results.json").exists()


@pytest.mark.parametrize("kind,seq", [("nf4", 7), ("nf4", 48), ("int8", 7), ("int8", 48)])
def test_fused_qlora_path_matches_the_reference_path(kind: str, seq: int, monkeypatch) -> None:
    """The fused paths on a quantized base against the unfused reference path: outputs and adapter gradients,
    fp32 on CPU. 4-bit bases with many rows take the merged form (W dequantized, W' = W + s·B·A); int8 bases and
    few rows add the delta to bitsandbytes' own output."""
    am = unipeft.attach(_quantized(kind), "lora").train()
    randomize(am)
    seen = []
    real = fused._merged_pays
    monkeypatch.setattr(fused, "_merged_pays", lambda *a: seen.append(real(*a)) or seen[-1])
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("UNIPEFT_FUSED", flag)
        am.zero_grad(set_to_none=True)
        out = output_of(am(**inputs(seq=seq)))
        out.pow(2).mean().backward()
        results[flag] = (out.detach(), {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()})
    torch.testing.assert_close(results["1"][0], results["0"][0], rtol=1e-5, atol=1e-6)
    for k, g in results["0"][1].items():
        torch.testing.assert_close(results["1"][1][k], g, rtol=1e-4, atol=1e-6)
    assert all(w._plan()[2] for w in am._wrappers.values())
    assert set(seen) == ({seq > 7} if kind == "nf4" else set())  # int8 never merges: bitsandbytes' int8 GEMM stays


def test_fused_qlora_calls_a_hooked_4bit_base(monkeypatch) -> None:
    """A 4-bit base with a forward hook is called (the hook runs) instead of being dequantized behind its back;
    the result equals the reference path's."""
    am = unipeft.attach(_quantized("nf4"), "lora", targets=["q", "v", "o"]).train()
    randomize(am)
    seen = []
    next(w for p, w in am._wrappers.items() if p.endswith("o_proj")).base_layer.register_forward_hook(
        lambda mod, args, out: seen.append(1))
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("UNIPEFT_FUSED", flag)
        am.zero_grad(set_to_none=True)
        out = output_of(am(**inputs(seq=48)))  # many rows: unhooked 4-bit bases take the merged form
        out.pow(2).mean().backward()
        results[flag] = (out.detach(), {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()})
    assert len(seen) == 2
    torch.testing.assert_close(results["1"][0], results["0"][0], rtol=1e-5, atol=1e-6)
    for k, g in results["0"][1].items():
        torch.testing.assert_close(results["1"][1][k], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_direct_dequantizer_equals_bitsandbytes_dequantize(kind: str, double_quant: bool) -> None:
    """The fused QLoRA path's dequantizer (bitsandbytes' ops called directly, absmax decoded once) gives exactly the
    weight bitsandbytes' own dequantize_4bit gives, every time it is called."""
    model = quant.quantize(tiny_model("llama"), kind, double_quant=double_quant, compute_dtype=torch.float32)
    for name, module in model.named_modules():
        if quant.is_quantized(module):
            weight = quant.dequantizer(module, torch.float32)
            expected = quant.dequantized_weight(module)
            assert torch.equal(weight(), expected) and torch.equal(weight(), expected), name


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_weights_dequantize_straight_into_the_compute_dtype(kind: str) -> None:
    """quantize() quantizes from the fp32 values but records the compute dtype as the one bitsandbytes dequantizes
    into: a bf16 QLoRA base dequantizes straight to bf16 (one launch and one 2-byte write per weight on the GPU,
    not an fp32 tensor and a cast), with the values of the fp32 dequantization rounded once to bf16 — in the fused
    path's dequantizer too; a requantizing merge keeps that dtype."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    model = quant.quantize(tiny_model("llama"), kind, compute_dtype=torch.bfloat16)
    modules = [m for m in model.modules() if quant.is_quantized(m)]
    assert modules
    for module in modules:
        state = module.weight.quant_state
        assert state.dtype == torch.bfloat16
        direct = bnb_functional.dequantize_4bit(module.weight.data, state)
        fp32_state = copy.copy(state)
        fp32_state.dtype = torch.float32
        via_fp32 = bnb_functional.dequantize_4bit(module.weight.data, fp32_state)
        assert direct.dtype == torch.bfloat16 and via_fp32.dtype == torch.float32
        assert torch.equal(direct, via_fp32.to(torch.bfloat16))
        assert torch.equal(quant.dequantizer(module, torch.bfloat16)(), direct)
    am = unipeft.attach(model, "lora", targets=["q"])
    randomize(am, std=0.5)
    with pytest.warns(UserWarning, match="rounding error up to"):
        am.merge(requantize=True)
    assert all(w.base_layer.weight.quant_state.dtype == torch.bfloat16 for w in am._wrappers.values())


ALL_LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]


def _group_spy(monkeypatch) -> tuple[list[int], list[int]]:
    """(members per sibling-group computation, dequantizations of 4-bit weights by the fused path)."""
    from unipeft import siblings

    groups, dequantized = [], []
    real_group, real_dequantizer = siblings._LoraGroup.apply, quant.dequantizer

    def counting_dequantizer(module, dtype):
        weight = real_dequantizer(module, dtype)
        return lambda: dequantized.append(1) or weight()
    monkeypatch.setattr(siblings._LoraGroup, "apply", lambda *a: (groups.append(len(a[1][0])), real_group(*a))[1])
    monkeypatch.setattr(quant, "dequantizer", counting_dequantizer)
    return groups, dequantized


def _qlora_step(am, flag_env: dict, monkeypatch, **batch) -> tuple[torch.Tensor, dict]:
    for key, value in flag_env.items():
        monkeypatch.setenv(key, value)
    am.zero_grad(set_to_none=True)
    out = output_of(am(**batch))
    out.pow(2).mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_siblings_train_as_one_group(kind: str, monkeypatch) -> None:
    """QLoRA: q/k/v and gate/up on 4-bit bases run as sibling groups (one x·[A_q; A_k; A_v]ᵀ, one dA pass, dx
    accumulated), each member's W dequantized once in forward and once again in backward for dx (nothing
    dequantized is kept between them) — except the first layer's q/k/v, whose input comes from the frozen embeddings
    and needs no gradient, so nothing is dequantized for it in backward; outputs and adapter gradients equal the lone
    4-bit projections' (UNIPEFT_GROUPS=0) and the reference path's (UNIPEFT_FUSED=0), fp32 on CPU."""
    am = unipeft.attach(_quantized(kind), "lora", targets=ALL_LINEARS).train()
    randomize(am)
    groups, dequantized = _group_spy(monkeypatch)
    batch = inputs(seq=48)  # many rows: every member takes the merged form
    grouped = _qlora_step(am, {"UNIPEFT_FUSED": "1", "UNIPEFT_GROUPS": "1"}, monkeypatch, **batch)
    assert groups == [3, 2] * 2  # per layer: q/k/v, then gate/up
    assert len(dequantized) == 2 * 14 - 3  # 7 projections × 2 layers, forward and backward; not layer 0's q/k/v
    groups.clear()
    alone = _qlora_step(am, {"UNIPEFT_GROUPS": "0"}, monkeypatch, **batch)
    reference = _qlora_step(am, {"UNIPEFT_FUSED": "0", "UNIPEFT_GROUPS": "1"}, monkeypatch, **batch)
    assert groups == []
    for other in (alone, reference):
        torch.testing.assert_close(grouped[0], other[0], rtol=1e-5, atol=1e-6)
        for k, g in other[1].items():
            torch.testing.assert_close(grouped[1][k], g, rtol=1e-4, atol=1e-6)


def test_4bit_group_needs_every_member_4bit_in_the_compute_dtype(monkeypatch) -> None:
    """A group with a member whose compute dtype differs from x's (a cast the group does not make) runs each member
    alone: the same results as with groups off."""
    model = quant.quantize(tiny_model("llama"), "nf4", compute_dtype=torch.float32)
    for name, module in model.named_modules():
        if name.endswith("k_proj"):
            module.compute_dtype = torch.float64  # (k alone would need a cast)
    am = unipeft.attach(model, "lora", targets=ALL_LINEARS).train()
    randomize(am)
    groups, _ = _group_spy(monkeypatch)
    batch = inputs(seq=48)
    grouped = _qlora_step(am, {"UNIPEFT_GROUPS": "1"}, monkeypatch, **batch)
    assert groups == [2, 2]  # gate/up only
    alone = _qlora_step(am, {"UNIPEFT_GROUPS": "0"}, monkeypatch, **batch)
    torch.testing.assert_close(grouped[0], alone[0], rtol=1e-6, atol=1e-7)
    for k, g in alone[1].items():
        torch.testing.assert_close(grouped[1][k], g, rtol=1e-5, atol=1e-7)


def test_qlora_groups_on_real_smollm2(smollm2_path, monkeypatch) -> None:
    """The real SmolLM2-135M (first four layers, GQA k/v 576 → 192) on NF4 bases with double quantization, 2 × 448
    tokens: q/k/v and gate/up run as one group each per layer, and the step's loss and adapter gradients equal the
    lone 4-bit projections' (fp32 on CPU)."""
    model = T.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    quant.quantize(model, "nf4", double_quant=True, compute_dtype=torch.float32)
    torch.manual_seed(0)
    am = unipeft.attach(model, "lora", r=8, targets=ALL_LINEARS).train()
    randomize(am, std=0.02)
    ids = torch.randint(5, 4000, (2, 448), generator=torch.Generator().manual_seed(0))
    groups, _ = _group_spy(monkeypatch)
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("UNIPEFT_GROUPS", flag)
        am.zero_grad(set_to_none=True)
        loss = am(input_ids=ids, labels=ids).loss
        loss.backward()
        results[flag] = (loss.detach(), {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()})
        if flag == "1":
            assert groups == [3, 2] * 4
    torch.testing.assert_close(results["1"][0], results["0"][0], rtol=1e-5, atol=0.0)
    for k, g in results["0"][1].items():
        assert ((results["1"][1][k] - g).norm() / g.norm()).item() < 1e-4, k


def test_bf16_qlora_on_real_smollm2_dequantizes_straight_into_bf16(smollm2_path) -> None:
    """The real SmolLM2-135M (first two layers) quantized to NF4 for bf16 compute: every quant state records bf16,
    and a bf16 QLoRA step (loss and adapter gradients) is bit for bit the step with the states set back to fp32 —
    bitsandbytes dequantizing into fp32 and a cast, the path before — so the cheaper path changes no number."""
    model = T.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model = quant.quantize(model, "nf4", double_quant=True, compute_dtype=torch.bfloat16).to(torch.bfloat16)
    states = [m.weight.quant_state for m in model.modules() if quant.is_quantized(m)]
    assert len(states) == 14 and all(st.dtype == torch.bfloat16 for st in states)
    torch.manual_seed(0)
    am = unipeft.attach(model, "lora", r=8, targets=ALL_LINEARS).train()
    randomize(am, std=0.02)
    ids = torch.randint(5, 4000, (2, 96), generator=torch.Generator().manual_seed(0))
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        for st in states:
            st.dtype = dtype
        am.zero_grad(set_to_none=True)
        loss = am(input_ids=ids, labels=ids).loss
        loss.backward()
        results[dtype] = (loss.detach(), {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()})
    assert torch.isfinite(results[torch.bfloat16][0])
    assert torch.equal(results[torch.bfloat16][0], results[torch.float32][0])
    for k, g in results[torch.float32][1].items():
        assert torch.equal(results[torch.bfloat16][1][k], g), k


def test_4bit_groups_compile_without_graph_breaks_and_match_eager(monkeypatch) -> None:
    """torch.compile (AOTAutograd, eager backend) of a QLoRA model whose q/k/v and gate/up form 4-bit groups: one
    graph, and the traced step gives eager's outputs and adapter gradients."""
    am = unipeft.attach(_quantized("nf4"), "lora", targets=ALL_LINEARS).train()
    randomize(am)
    groups, _ = _group_spy(monkeypatch)
    batch = inputs(seq=48)
    eager = _qlora_step(am, {}, monkeypatch, **batch)
    assert groups == [3, 2] * 2
    monkeypatch.undo()  # (the spies are for eager calls)
    from unipeft import siblings

    traced, real = [], siblings._LoraGroup.forward
    monkeypatch.setattr(siblings._LoraGroup, "forward", staticmethod(lambda ctx, *a: traced.append(1) or real(ctx, *a)))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out, grads = _qlora_step(torch.compile(am, backend="aot_eager"), {}, monkeypatch, **batch)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert len(traced) == 4  # the four groups, traced once
    torch.testing.assert_close(out, eager[0], rtol=1e-5, atol=1e-6)
    for k, g in grads.items():
        torch.testing.assert_close(g, eager[1][k], rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_4bit_group_refused_for_few_rows_dequantizes_nothing(monkeypatch) -> None:
    """With few rows (the unmerged form pays) a 4-bit group is refused before any dequantizer is made — making one
    decodes a double-quantized absmax, a GPU launch per member — and every projection adds its delta to
    bitsandbytes' own output."""
    am = unipeft.attach(_quantized("nf4"), "lora", targets=ALL_LINEARS).train()
    randomize(am)
    made = []
    real = quant.dequantizer
    monkeypatch.setattr(quant, "dequantizer", lambda module, dtype: made.append(1) or real(module, dtype))
    groups, _ = _group_spy(monkeypatch)
    out = output_of(am(**inputs(seq=7)))
    out.pow(2).mean().backward()
    assert groups == [] and made == []
