"""Shared fixtures: tiny random-init models of every mapped family, and the real shipped models (loaded once)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# CPU tests run Triton kernels in Triton's interpreter; it must be on before anything imports triton, because the
# library's own jitted helpers (tl.zeros, ...) are built at import time
os.environ.setdefault("TRITON_INTERPRET", "1")
T.logging.set_verbosity_error()

FAMILIES = ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_call_plans(monkeypatch):
    """Every test starts without the two-stream op's call plans (overlap._CALLS): a test that declares the Triton
    kernels available on the CPU would otherwise leave plans that a later test's call with the same signature
    runs, kernels and all."""
    from unipeft import overlap

    monkeypatch.setattr(overlap, "_CALLS", {})


def bench_module(name: str):
    """bench/<name>.py imported as a module (the bench scripts are files, not a package); it imports unipeft from
    src/ as the tests do, and other bench scripts from bench/ as it does when run."""
    import importlib.util
    import sys

    if str(ROOT / "bench") not in sys.path:
        sys.path.append(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
VOCAB = 64


def tiny_model(family: str, *, attn: str = "sdpa", seed: int = 0, head: str = "lm") -> torch.nn.Module:
    """A 2-layer, 32-wide random-init model. Decoder families use GQA (4 heads, 2 KV heads)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, attn_implementation=attn)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "bert":
        cfg = T.BertConfig(**common, **no_dropout, max_position_embeddings=64)
        return T.BertForSequenceClassification(cfg) if head == "cls" else T.BertModel(cfg)
    if family == "roberta":
        cfg = T.RobertaConfig(**common, **no_dropout, max_position_embeddings=70, pad_token_id=1)
        return T.RobertaModel(cfg)
    if family == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_implementation=attn,
                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return T.GPT2LMHeadModel(cfg)
    decoder = dict(common, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                   pad_token_id=0)
    cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "mistral": (T.MistralConfig, T.MistralForCausalLM),
           "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[family]
    return cls[1](cls[0](**decoder))


def as_compiled(fn):
    """fn run as a compiled call runs it: torch.compiler.is_compiling() is True inside (the layer-side routed paths
    take their compiled branches, the routed kernels run as their ops — eagerly here: a real torch.compile cannot
    trace Triton on CPU, and the interpreter reads the fake tensors' data). The model's routing setup before the
    layers runs as it does outside a compiled region."""
    def run(*args):
        real = torch.compiler.is_compiling
        torch.compiler.is_compiling = lambda: True
        try:
            return fn(*args)
        finally:
            torch.compiler.is_compiling = real
    return run


def output_of(out) -> torch.Tensor:
    """The per-token output of any model here: logits for LMs / classifiers, the last hidden state for encoders."""
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if t is not None:
            return t
    raise AssertionError(f"no tensor output in {type(out).__name__}")


def inputs(batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="session")
def minilm_path():
    from unipeft.assets import minilm_path

    return str(minilm_path())


@pytest.fixture(scope="session")
def smollm2_path():
    from unipeft.assets import smollm2_path

    return str(smollm2_path())


# ---- tiny models saved to disk with the real shipped tokenizers, and a tiny labelled data file ------------------
POS = ["a wonderful, moving film", "brilliant acting and a sharp script", "funny, warm and clever", "a joy to watch",
       "beautifully shot and deeply felt", "an instant classic", "smart and touching", "great fun from start to end"]
NEG = ["a dull, lifeless mess", "tedious and far too long", "the plot makes no sense", "badly acted and boring",
       "a waste of two hours", "clumsy, loud and empty", "painfully unfunny", "I wanted to leave early"]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_path) -> str:
    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=128)
    T.BertModel(cfg).save_pretrained(d)
    T.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_path) -> str:
    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
                        tie_word_embeddings=True)
    T.LlamaForCausalLM(cfg).save_pretrained(d)
    T.AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rows = [{"review": t, "sentiment": "pos"} for t in POS] + [{"review": t, "sentiment": "neg"} for t in NEG]
    path = d / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    return path
