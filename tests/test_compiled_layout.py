"""The traced group backward's dx GEMMs as layout-flexible custom ops (siblings._flexible_mm): under Inductor a
member's output gradient is realized in its own (B, T, H, D) shape, never as an N × d buffer that only copies an
already computed one — the copy that, for k after RoPE's backward, ran as a kernel per layer the frozen floor does
not pay — and the compiled gradients equal the eager ones. (A group that computes no dx, the first layer's, has
the grads kernel as its gradients' only reader, which fixes their strides: N × d buffers, computed with their
producers' expressions in them.) Inductor compiles for the CPU here (a C++ compiler is needed)."""

from __future__ import annotations

import shutil

import pytest
import torch

import unipeft
from unipeft import kernels, siblings

SITES = ["q", "k", "v", "o", "gate", "up", "down"]


@torch.library.custom_op("unipeft_test::grads", mutates_args=())
def _grads_op(gs: list[torch.Tensor], bs: list[torch.Tensor], xas: list[torch.Tensor], rows: list[int],
              scales: list[float], total_rank: int) -> torch.Tensor:
    """A CPU stand-in for the grads kernel's op (kernels.lora_grads's flat buffer: the dB's, then gaᵀ), with the
    default layout constraint a Triton kernel's op gets under Inductor (its inputs fixed to their traced strides)."""
    n = gs[0].shape[0]
    ga = gs[0].new_zeros(total_rank, n)
    for g, b, row, s in zip(gs, bs, rows, scales):
        ga[row:row + b.shape[1]] = (s * (g @ b)).t()
    return torch.cat([(s * (g.t() @ xa)).reshape(-1) for g, xa, s in zip(gs, xas, scales)] + [ga.reshape(-1)])


_grads_op.register_fake(lambda gs, bs, xas, rows, scales, total_rank: gs[0].new_empty(
    sum(g.shape[1] * b.shape[1] for g, b in zip(gs, bs)) + total_rank * gs[0].shape[0]))


def _lora_grads_through_op(gs, bs, xas, rows, scales, total_rank):
    flat = torch.ops.unipeft_test.grads(gs, bs, xas, rows, scales, total_rank)
    n_db = sum(g.shape[1] * b.shape[1] for g, b in zip(gs, bs))
    return flat[n_db:].view(total_rank, gs[0].shape[0]), flat[:n_db]


def _llama():
    """Two layers, head_dim 128 (two heads), 4 × 128 tokens: enough rows that the merged form (and so the groups)
    pays. (The second layer's groups need dx; the first's input does not, its groups compute none.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    am = unipeft.attach(LlamaForCausalLM(cfg), "lora", r=16, alpha=32, targets=SITES)
    with torch.no_grad():
        for p in am.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return am, torch.randint(0, 128, (4, 128), generator=torch.Generator().manual_seed(1))


def _grads(model, am, x) -> dict[str, torch.Tensor]:
    am.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in am.named_parameters() if p.grad is not None}


def test_flexible_ops_are_tagged_and_compute_the_products() -> None:
    a, b = torch.randn(6, 4), torch.randn(4, 3)
    torch.testing.assert_close(siblings._flexible_mm(a, b), a @ b)
    acc = torch.randn(6, 3)
    want = acc + a @ b
    siblings._accumulate(acc, a, b)
    torch.testing.assert_close(acc, want)
    for op in (torch.ops.unipeft.mm.default, torch.ops.unipeft.addmm_acc.default):
        assert torch.Tag.flexible_layout in op.tags


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="Inductor needs a C++ compiler")
@pytest.mark.parametrize("grads_op", [False, True])
def test_inductor_realizes_gradients_without_transposing_copies(grads_op: bool, monkeypatch) -> None:
    """grads_op: the group's gaᵀ and dB through a custom op with a Triton kernel's layout constraint (as on CUDA,
    where it is the grads kernel), else through the GEMMs the CPU runs."""
    import torch._inductor.config as inductor_config
    import torch._inductor.ir as ir

    if grads_op:
        monkeypatch.setattr(kernels, "grads_available", lambda tensors, ranks: True)
        monkeypatch.setattr(kernels, "lora_grads", _lora_grads_through_op)
    am, x = _llama()
    rows, width = x.numel(), 256
    copies: list[list[str]] = []  # N × d buffers that only copy a permuted (B, H, T, D) one
    realized = []  # every pointwise buffer (so the check cannot pass without a lowering having run)
    real = ir.StorageBox.realize

    def realize(self):
        data = self.data
        if isinstance(data, ir.Pointwise) and not ir.IRNode.is_realized_node(data):
            realized.append(data)
            names = sorted(str(o) for o in getattr(data, "origins", ()))
            if list(data.get_size()) == [rows, width] and any(n.startswith("permute") for n in names) \
                    and all(n.split("_")[0] in ("view", "clone", "permute", "t") for n in names):
                copies.append(names)  # nothing computed: a transposing copy of a buffer already made
        return real(self)

    monkeypatch.setattr(ir.StorageBox, "realize", realize)
    torch._dynamo.reset()
    # no cached graphs (they would skip the lowering); the GPU's opcount threshold (the CPU has its own)
    with inductor_config.patch(force_disable_caches=True, realize_opcount_threshold=30):
        got = _grads(torch.compile(am), am, x)
    torch._dynamo.reset()
    assert len(realized) > 20
    assert copies == [], f"transposing N × d copies realized: {copies}"
    monkeypatch.undo()  # the eager reference through the plain GEMMs
    want = _grads(am, am, x)
    assert set(got) == set(want) and len(want) == 2 * len(SITES) * 2
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)
