"""The training loop's optimizer: AdamW runs fused where torch has the kernel, and computes what the default
(foreach) AdamW computes — checked on the LoRA tensors of the real MiniLM encoder."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

import unipeft
from unipeft.train import LoopConfig, fusable, make_optimizer


def _lora_params(minilm_path: str) -> list[torch.nn.Parameter]:
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    am = unipeft.attach(model, "lora", r=8)
    return [p for p in am.parameters() if p.requires_grad]


def test_adamw_is_fused_and_matches_the_foreach_update(minilm_path) -> None:
    """Five steps with weight decay on MiniLM's LoRA tensors (and its new head): the fused optimizer the loop
    builds against torch's foreach AdamW from the same start and the same gradients."""
    params = _lora_params(minilm_path)
    assert len(params) > 20 and fusable(params)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]
    cfg = LoopConfig(lr=3e-3, weight_decay=0.01)
    fused = make_optimizer(cfg, params)
    assert fused.defaults["fused"] is True
    reference = torch.optim.AdamW(twins, lr=3e-3, weight_decay=0.01, foreach=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        fused.step()
        reference.step()
    apart = max((p.detach() - q.detach()).abs().max().item() for p, q in zip(params, twins))
    assert apart < 1e-6, "fused and foreach AdamW agree to rounding"
    moved = min((p.detach() - s).abs().max().item() for p, s in zip(params, start))
    assert moved > 1e-3, "every tensor was updated (five steps of lr 3e-3)"


def test_adamw_falls_back_where_there_is_no_fused_kernel() -> None:
    """Tensors on a device without the kernel (meta) or not floating point: the default AdamW, no error at the
    first step; the 8-bit optimizer is not touched by the choice."""
    meta = [torch.nn.Parameter(torch.zeros(4, device="meta"))]
    assert not fusable(meta) and not fusable([])
    assert make_optimizer(LoopConfig(), meta).defaults["fused"] is None
    assert not fusable([torch.zeros(3, dtype=torch.long)])
