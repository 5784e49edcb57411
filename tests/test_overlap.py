"""overlap.py: a compiled LoRA backward's products (x·Aᵀ, grads kernel, dA) beside the dx GEMMs. On CPU there is no
second stream, so these tests check what the function and its custom op compute — against the explicit formulas in
fp64, with the plain GEMMs and with the Triton kernels in the interpreter — the op's registration (schema, fake
tensors), that a compiled backward routes through it (and an eager one does not) with gradients equal to the
reference path's. The streams themselves run on the GPU: bench/kernel_check.py compares a compiled step's gradients
with the eager step's, with `UNIPEFT_STREAMS` on and off."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import inputs, output_of, tiny_model
from test_engine import randomize

import unipeft
from unipeft import kernels, overlap


def _case(widths, ranks, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    n, d_in = 20, 24
    x = rnd(2, n // 2, d_in)
    ws = [rnd(d, d_in, scale=0.3) for d in widths]
    as_ = [rnd(r, d_in, scale=0.3) for r in ranks]
    bs = [rnd(d, r, scale=0.3) for d, r in zip(widths, ranks)]
    gs = [rnd(2, n // 2, d) for d in widths]
    return x, ws, as_, bs, gs


def _expected(x, ws, as_, bs, gs, scales, rebuild: bool):
    """fp64 formulas: gaᵀ_i = s_i·(g_i·B_i)ᵀ, dB_i = s_i·g_iᵀ·(x·A_iᵀ), dA = gaᵀ·x, dx = Σ g_i·(W_i + s_i·B_i·A_i)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    ga, dbs, dx = [], [], 0
    for w, a, b, g, s in zip(ws, as_, bs, gs, scales):
        a, b, w = a.double(), b.double(), w.double()
        if g is None:
            ga.append(torch.zeros(a.shape[0], x2.shape[0], dtype=torch.float64))
            continue
        g2 = g.reshape(-1, g.shape[-1]).double()
        ga.append(s * (g2 @ b).t())
        dbs.append(s * g2.t() @ (x2 @ a.t()))
        dx = dx + g2 @ (w + s * b @ a)
    ga_t = torch.cat(ga)
    return dx, dbs, ga_t, ga_t @ x2


@pytest.mark.parametrize("rebuild", [False, True])
@pytest.mark.parametrize("with_xa", [False, True])
@pytest.mark.parametrize("dead", [False, True])
def test_lora_backward_matches_the_formulas(rebuild: bool, with_xa: bool, dead: bool) -> None:
    """A group of three (GQA widths, ranks 4/2/4, one member without a gradient when `dead`) or a lone projection
    (dx through W′ built again): dx, each dB, gaᵀ and dA, with x·Aᵀ given or computed."""
    if rebuild and dead:
        pytest.skip("a lone projection without a gradient has no backward")
    widths, ranks, scales = ([12], [4], [2.0]) if rebuild else ([12, 8, 8], [4, 2, 4], [0.5, 2.0, 1.5])
    x, ws, as_, bs, gs = _case(widths, ranks)
    if dead:
        gs[1] = None
    a_cat = torch.cat(as_)
    xa = x.reshape(-1, x.shape[-1]) @ a_cat.t() if with_xa else None
    dx, flat, da = overlap.lora_backward(gs, ws, bs, x, a_cat, scales, ranks, True, True, rebuild, xa)
    want_dx, want_dbs, want_ga, want_da = _expected(x, ws, as_, bs, gs, scales, rebuild)
    torch.testing.assert_close(dx.double(), want_dx)
    torch.testing.assert_close(da.double(), want_da)
    n_db = sum(d.numel() for d in want_dbs)
    torch.testing.assert_close(flat[:n_db].double(), torch.cat([d.reshape(-1) for d in want_dbs]))
    torch.testing.assert_close(flat[n_db:].view(sum(ranks), -1).double(), want_ga)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton's interpreter")
@pytest.mark.parametrize("rebuild", [False, True])
def test_lora_backward_with_the_triton_kernels(rebuild: bool, monkeypatch) -> None:
    """The same with the grads kernel (and the merge kernel for W′) in Triton's interpreter, fp32."""
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "grads_available", lambda tensors, ranks: True)
    monkeypatch.setattr(kernels, "available", lambda t: True)
    monkeypatch.setattr(overlap, "_CALLS", {})  # (a first call: worked out from its arguments)
    widths, ranks, scales = ([12], [4], [2.0]) if rebuild else ([12, 8, 8], [4, 2, 4], [0.5, 2.0, 1.5])
    x, ws, as_, bs, gs = _case(widths, ranks, dtype=torch.float32)
    used = []
    real = kernels.lora_grads_buffer
    monkeypatch.setattr(kernels, "lora_grads_buffer", lambda *a: used.append(1) or real(*a))
    dx, flat, da = overlap.lora_backward(gs, ws, bs, x, torch.cat(as_), scales, ranks, True, True, rebuild)
    assert used == [1]
    want_dx, want_dbs, want_ga, want_da = _expected(x, ws, as_, bs, gs, scales, rebuild)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx.double(), want_dx, **tol)
    torch.testing.assert_close(da.double(), want_da, **tol)
    n_db = sum(d.numel() for d in want_dbs)
    torch.testing.assert_close(flat[:n_db].double(), torch.cat([d.reshape(-1) for d in want_dbs]), **tol)
    torch.testing.assert_close(flat[n_db:].view(sum(ranks), -1).double(), want_ga, **tol)


def test_the_custom_op_is_registered_consistently() -> None:
    """torch.library.opcheck: schema, fake-tensor outputs (shapes, dtypes) and AOT dispatch agree with the op; it is
    tagged layout-flexible; and it keeps the contract torch.library.custom_op would check at every call (it is
    registered through torch.library.Library, which does not): its outputs alias no input and no other output."""
    x, ws, as_, bs, gs = _case([12, 8, 8], [4, 2, 4], dtype=torch.float32)
    gs[1] = None
    op = torch.ops.unipeft.lora_backward.default
    assert torch.Tag.flexible_layout in op.tags
    for need_dx, need_da in ((True, True), (False, True), (True, False), (False, False)):
        args = (gs, ws, bs, x, torch.cat(as_), [0.5, 2.0, 1.5], [4, 2, 4], need_dx, need_da, False)
        torch.library.opcheck(op, args)
        outs = op(*args)
        ins = {t.untyped_storage().data_ptr() for t in (*ws, *bs, x, args[4], *(g for g in gs if g is not None))}
        ptrs = [t.untyped_storage().data_ptr() for t in outs if t.numel()]
        assert not ins & set(ptrs) and len(set(ptrs)) == len(ptrs)
        assert len({id(t) for t in outs}) == 3


def _grads_through(am, model, monkeypatch, flag: str) -> dict:
    monkeypatch.setenv("UNIPEFT_FUSED", flag)
    am.zero_grad(set_to_none=True)
    (output_of(model(**inputs(batch=4, seq=48))) ** 2).mean().backward()
    return {k: p.grad.clone() for k, p in am.adapter_parameters("default").items()}


def _routed(monkeypatch) -> list:
    """overlap.applies answers yes on CPU too; the calls of lora_backward are counted."""
    calls: list = []
    real = overlap.lora_backward
    monkeypatch.setattr(overlap, "applies", lambda gs, ranks: True)
    monkeypatch.setattr(overlap, "lora_backward", lambda *a, **kw: calls.append(len(a[0])) or real(*a, **kw))
    return calls


def test_eager_backward_keeps_its_own_kernels(monkeypatch) -> None:
    """Eager Llama LoRA on all seven projections: even where the op would apply, no backward goes through
    lora_backward (an eager step keeps one stream: see overlap.py), and the gradients equal the reference."""
    am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
    randomize(am)
    want = _grads_through(am, am, monkeypatch, "0")
    calls = _routed(monkeypatch)
    got = _grads_through(am, am, monkeypatch, "1")
    assert calls == []
    for k, g in want.items():
        torch.testing.assert_close(got[k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_compiled_backward_calls_the_op(monkeypatch) -> None:
    """Compiled (AOTAutograd), the traced backward calls the custom op — forward then leaves x·Aᵀ to it — and the
    gradients equal the reference path's; with UNIPEFT_STREAMS=0 the traced backward keeps its own kernels."""
    am = unipeft.attach(tiny_model("llama"), "lora", targets=["q", "k", "v", "o", "gate", "up", "down"]).train()
    randomize(am)
    want = _grads_through(am, am, monkeypatch, "0")
    calls = _routed(monkeypatch)
    for streams, expect in (("1", [3, 2, 1, 1] * 2), ("0", [])):
        monkeypatch.setenv("UNIPEFT_STREAMS", streams)
        calls.clear()
        torch._dynamo.reset()
        got = _grads_through(am, torch.compile(am, backend="aot_eager"), monkeypatch, "1")
        torch._dynamo.reset()
        assert sorted(calls) == sorted(expect), streams
        for k, g in want.items():
            torch.testing.assert_close(got[k], g, rtol=1e-4, atol=1e-6, msg=f"{k} (streams {streams})")


def _kernels_on_cpu(monkeypatch) -> tuple[list, object]:
    """The Triton kernels declared available (they run in the interpreter); calls of `_unplanned` counted."""
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "grads_available", lambda tensors, ranks: True)
    monkeypatch.setattr(kernels, "available", lambda t: True)
    unplanned, real = [], overlap._unplanned
    monkeypatch.setattr(overlap, "_unplanned", lambda *a: unplanned.append(1) or real(*a))
    return unplanned, real


def _check_formulas(got, case, scales, rebuild, need_dx, need_da, dtype) -> None:
    x, ws, as_, bs, gs = case
    want_dx, want_dbs, want_ga, want_da = _expected(x, ws, as_, bs, gs, scales, rebuild)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert (got[0] is None) != need_dx and (got[2] is None) != need_da
    if need_dx:
        torch.testing.assert_close(got[0].double(), want_dx, **tol)
    if need_da:
        torch.testing.assert_close(got[2].double(), want_da, **tol)
    n_db = sum(d.numel() for d in want_dbs)
    torch.testing.assert_close(got[1][:n_db].double(), torch.cat([d.reshape(-1) for d in want_dbs]), **tol)
    torch.testing.assert_close(got[1][n_db:].view(sum(a.shape[0] for a in as_), -1).double(), want_ga, **tol)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton's interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rebuild", "dead"), [(False, False), (False, True), (True, False)])
def test_a_call_seen_before_runs_from_its_plan(rebuild: bool, dead: bool, dtype, monkeypatch) -> None:
    """The first call of a signature is worked out from its arguments and leaves a plan; later calls with new
    values run from it — no unplanned work, no launch through kernels.py's grads or merge entry points — and give
    bit for bit what the unplanned path gives for the same inputs, which matches the formulas: for every pair of
    need_dx / need_da, fp32 gradients (the kernel's sums are the result) and fp16 ones (rounded into a buffer of
    their own, zeroed first where a member has no gradient)."""
    unplanned, real = _kernels_on_cpu(monkeypatch)
    forbid = [False]
    for name in ("lora_grads_buffer", "merged_weight"):
        entry = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=entry, _n=name: pytest.fail(_n) if forbid[0] else _f(*a))
    widths, ranks, scales = ([12], [4], [2.0]) if rebuild else ([12, 8, 8], [4, 2, 4], [0.5, 2.0, 1.5])
    flags = [(True, True), (False, True), (True, False), (False, False)]
    for signature, (need_dx, need_da) in enumerate(flags):
        for seed in range(3):
            case = _case(widths, ranks, dtype=dtype, seed=seed)
            x, ws, as_, bs, gs = case
            if dead:
                gs[1] = None
            a_cat = torch.cat(as_)
            want = real(gs, ws, bs, x, a_cat, scales, ranks, need_dx, need_da, rebuild, None)
            forbid[0] = seed > 0
            got = overlap.lora_backward(gs, ws, bs, x, a_cat, scales, ranks, need_dx, need_da, rebuild)
            forbid[0] = False
            assert len(unplanned) == signature + 1, "only a signature's first call is worked out from its arguments"
            assert [type(c) for c in overlap._CALLS.values()] == [overlap._Call] * (signature + 1)
            for a, b in zip(got, want):
                assert (a is None and b is None) or torch.equal(a, b)
            _check_formulas(got, case, scales, rebuild, need_dx, need_da, dtype)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton's interpreter")
@pytest.mark.parametrize("rebuild", [False, True])
def test_a_plan_whose_launcher_refuses_falls_back(rebuild: bool, monkeypatch) -> None:
    """A recorded launch that refuses its arguments (another Triton's launcher API) makes the call launch through
    kernels.py's own path, with the same results, and drops every plan; once launching has fallen back to
    Triton's own path for good, a plan made before is not used."""
    from unipeft import launching

    unplanned, real = _kernels_on_cpu(monkeypatch)
    widths, ranks, scales = ([12], [4], [2.0]) if rebuild else ([12, 8, 8], [4, 2, 4], [0.5, 2.0, 1.5])
    x, ws, as_, bs, gs = _case(widths, ranks, dtype=torch.float16)
    a_cat = torch.cat(as_)
    args = (gs, ws, bs, x, a_cat, scales, ranks, True, True, rebuild)
    want = overlap.lora_backward(*args)
    assert [type(c) for c in overlap._CALLS.values()] == [overlap._Call]
    with monkeypatch.context() as m:
        m.setattr(launching._Plan, "__call__", lambda self, tensors: False)
        got = overlap.lora_backward(*args)
    assert len(unplanned) == 1 and overlap._CALLS == {}
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    overlap.lora_backward(*args)  # planned again
    assert len(unplanned) == 2 and [type(c) for c in overlap._CALLS.values()] == [overlap._Call]
    monkeypatch.setattr(launching, "_DIRECT", [False])
    got = overlap.lora_backward(*args)
    assert len(unplanned) == 3
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("answer", "tries"), [(False, overlap._TRIES), (None, 1)])
def test_a_signature_without_launch_plans_is_retried_a_few_times(answer, tries: int, monkeypatch) -> None:
    """Where making a plan finds the launch plans missing (False: launching's table was cleared meanwhile) the next
    calls try again, `_TRIES` times in all; where the call cannot have one (None) it is not tried again."""
    made = []
    monkeypatch.setattr(overlap._Call, "make", classmethod(lambda cls, *a: made.append(1) or answer))
    x, ws, as_, bs, gs = _case([12, 8, 8], [4, 2, 4], dtype=torch.float32)
    for _ in range(overlap._TRIES + 2):
        overlap.lora_backward(gs, ws, bs, x, torch.cat(as_), [0.5, 2.0, 1.5], [4, 2, 4], True, True, False)
    assert len(made) == tries and list(overlap._CALLS.values()) == [overlap._TRIES]


def test_the_plan_key_follows_every_input_and_switch(monkeypatch) -> None:
    """A plan is only reused by a call it fits: the key changes with each runtime switch that decides the path
    (deterministic algorithms, UNIPEFT_TRITON, UNIPEFT_STREAMS), the flags, a scale, a rank, a member without a
    gradient, and the shape, strides, dtype or alignment of a tensor a recorded launch reads; it does not change
    with values."""
    x, ws, as_, bs, gs = _case([12, 8, 8], [4, 2, 4], dtype=torch.float32)
    args = [gs, ws, bs, x, torch.cat(as_), [0.5, 2.0, 1.5], [4, 2, 4], True, True, False]
    key = overlap._call_key(*args)
    assert overlap._call_key(*args) == key
    changed = []
    for i, v in ((0, [gs[0], None, gs[2]]), (5, [0.5, 2.5, 1.5]), (6, [4, 2, 3]), (7, False), (8, False), (9, True),
                 (0, [gs[0].transpose(0, 1).contiguous().transpose(0, 1), gs[1], gs[2]]), (3, x.double()),
                 (3, x.reshape(-1, 24)), (2, [bs[0], bs[1], torch.empty(bs[2].numel() + 1)[1:].view_as(bs[2])])):
        changed.append(overlap._call_key(*args[:i], v, *args[i + 1:]))
    assert key not in changed and len(set(changed)) == len(changed)
    assert overlap._call_key(*args[:3], x.clone(), *args[4:]) == key  # new values, same layout
    # a lone projection's W′ is rebuilt by a recorded launch: its W's and A's layouts are in its key too
    lone = [[gs[0]], [ws[0]], [bs[0]], x, as_[0], [0.5], [4], True, True, True]
    odd_w = torch.empty(ws[0].numel() + 1)[1:].view_as(ws[0])
    assert overlap._call_key(*lone[:1], [odd_w], *lone[2:]) != overlap._call_key(*lone)
    assert overlap._call_key(*lone[:4], as_[0].t().contiguous().t(), *lone[5:]) != overlap._call_key(*lone)
    for name in ("UNIPEFT_TRITON", "UNIPEFT_STREAMS"):
        monkeypatch.setenv(name, "0")
        assert overlap._call_key(*args) != key
        monkeypatch.delenv(name)
    torch.use_deterministic_algorithms(True)
    try:
        assert overlap._call_key(*args) != key
    finally:
        torch.use_deterministic_algorithms(False)
