"""The Triton kernels (kernels.py) under TRITON_INTERPRET=1 on CPU against their explicit formulas in fp64.
(The interpreter runs fp32 and fp16 correctly, not bf16; the GPU check in bench/kernel_check.py covers bf16 and
the cached launch path.)"""

from __future__ import annotations

import os

import pytest
import torch

from unipeft import kernels, launching, routed_kernels

pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py turns it on unless the environment says otherwise
    pytest.skip("these tests run Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)


@pytest.mark.parametrize("m,n,r", [(70, 130, 16), (33, 17, 4), (128, 64, 40)])
def test_merged_weight_matches_the_formula(m: int, n: int, r: int) -> None:
    """Ranks below one tile (masked), exactly one tile, and two chunks; shapes that are not tile multiples."""
    g = torch.Generator().manual_seed(m)
    w, b, a = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(m, n), (m, r), (r, n)])
    expected = w + 0.7 * (b @ a)
    got = kernels.merged_weight(w.float(), b.float(), a.float(), 0.7)
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    half = kernels.merged_weight(w.half(), b.half(), a.half(), 0.7)  # fp32 accumulation, one rounding to fp16
    reference = torch.addmm(w.half().float(), b.half().float(), a.half().float(), alpha=0.7).half()
    torch.testing.assert_close(half, reference, rtol=1e-3, atol=1e-3)


def test_merged_weight_takes_strided_inputs_and_works_in_place() -> None:
    g = torch.Generator().manual_seed(0)
    w_t = torch.randn(40, 24, generator=g)  # transformers' Conv1D stores d_in × d_out: W is its transpose
    b, a = torch.randn(24, 8, generator=g), torch.randn(8, 40, generator=g)
    expected = w_t.t().double() + 2.0 * (b.double() @ a.double())
    torch.testing.assert_close(kernels.merged_weight(w_t.t(), b, a, 2.0).double(), expected, rtol=1e-5, atol=1e-5)
    w = w_t.t().contiguous()
    out = kernels.merged_weight(w, b, a, 2.0, out=w)  # a dequantized 4-bit weight is updated in place
    assert out.data_ptr() == w.data_ptr()
    torch.testing.assert_close(w.double(), expected, rtol=1e-5, atol=1e-5)


def test_merged_weight_refuses_mismatched_operands() -> None:
    with pytest.raises(ValueError, match="shapes/dtypes disagree"):
        kernels.merged_weight(torch.zeros(4, 6), torch.zeros(4, 2), torch.zeros(3, 6), 1.0)
    with pytest.raises(ValueError, match="shapes/dtypes disagree"):
        kernels.merged_weight(torch.zeros(4, 6), torch.zeros(4, 2).half(), torch.zeros(2, 6), 1.0)
    with pytest.raises(ValueError, match="out must match W"):
        kernels.merged_weight(torch.zeros(4, 6), torch.zeros(4, 2), torch.zeros(2, 6), 1.0,
                              out=torch.zeros(4, 6).half())


def test_triton_path_only_for_cuda_tensors_and_can_be_turned_off(monkeypatch) -> None:
    assert not kernels.available(torch.zeros(2))  # CPU: the PyTorch ops are the path (and the reference)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert kernels.available(torch.zeros(2)) == kernels._HAS_TRITON
    assert not kernels.available(torch.zeros(2, dtype=torch.float64))  # the kernel would round W to fp32
    monkeypatch.setenv("UNIPEFT_TRITON", "0")
    assert not kernels.available(torch.zeros(2))


def test_compiled_op_is_registered_and_matches_the_formula() -> None:
    """The kernel as the custom op torch.compile graphs call (`unipeft::merged_weight`, a triton_op): called outside a
    compiler it runs the same kernel; `tag` (forward 0, backward 1) only keeps the compiler from merging calls."""
    assert hasattr(torch.ops.unipeft, "merged_weight")
    g = torch.Generator().manual_seed(3)
    w, b, a = torch.randn(50, 70, generator=g), torch.randn(50, 6, generator=g), torch.randn(6, 70, generator=g)
    expected = w.double() + 1.5 * (b.double() @ a.double())
    for tag in (0, 1):
        torch.testing.assert_close(kernels.compiled_merged_weight(w, b, a, 1.5, tag).double(), expected,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shapes/dtypes disagree"):
        kernels.compiled_merged_weight(w, b, a.t().contiguous(), 1.0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_merged_weights_builds_a_group_in_one_launch_per_three(k: int) -> None:
    """Sibling projections' W' (q/k/v, gate/up: one d_in and rank, d_out may differ — GQA's k/v are narrower) from
    one launch per three members into one buffer, returned as its row blocks, and the members' A's stacked by the
    same launches (= torch.cat, bit for bit; A given with column strides here): each W' against the formula in
    fp64, in fp32 and in fp16 (fp32 accumulation, one rounding); the eager call and the compiled graph's custom op
    agree."""
    g = torch.Generator().manual_seed(k)
    d_outs = [70, 33, 33, 48][:k]
    ws = [torch.randn(d, 40, generator=g) for d in d_outs]
    bs = [torch.randn(d, 6, generator=g) for d in d_outs]
    as_ = [torch.randn(40, 6, generator=g).t() for _ in d_outs]
    scales = [0.5, 2.0, -1.0, 0.25][:k]
    launches = []
    outs, a_cat = kernels._merged_weights(ws, bs, as_, scales, lambda grid, args: launches.append(args) or
                                          kernels._launch_merge(grid, args))
    assert len(launches) == (k + 2) // 3 and outs.shape == (sum(d_outs), 40)
    assert torch.equal(a_cat, torch.cat(as_)) and a_cat.is_contiguous()
    inputs = {id(t) for t in ws + bs + as_}
    written = {id(t) for args in launches for t in args if isinstance(t, torch.Tensor) and id(t) not in inputs}
    assert written == {id(outs), id(a_cat)}, "the kernel writes two buffers, not views (copies when compiled)"
    got, got_a = kernels.merged_weights(ws, bs, as_, scales)
    assert [t.shape[0] for t in got] == d_outs and all(t._base is got[0]._base for t in got), "row blocks of one buffer"
    assert torch.equal(got_a, a_cat)
    for w_, b_, a_, s_, t in zip(ws, bs, as_, scales, got):
        torch.testing.assert_close(t.double(), w_.double() + s_ * b_.double() @ a_.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(got), outs, rtol=0, atol=0)
    op_w, op_a = torch.ops.unipeft.merged_weights(ws, bs, as_, scales)
    torch.testing.assert_close(op_w, outs, rtol=0, atol=0)
    assert torch.equal(op_a, a_cat)
    half, half_a = kernels.merged_weights([t.half() for t in ws], [t.half() for t in bs], [t.half() for t in as_],
                                          scales)
    assert torch.equal(half_a, torch.cat([t.half() for t in as_]))
    for w_, b_, a_, s_, t in zip(ws, bs, as_, scales, half):
        want = (w_.half().double() + s_ * b_.half().double() @ a_.half().double()).half()
        torch.testing.assert_close(t, want, rtol=1e-3, atol=1e-2)


def test_merged_weights_refuses_members_it_cannot_build_together() -> None:
    w, b, a = torch.zeros(8, 6), torch.zeros(8, 2), torch.zeros(2, 6)
    assert kernels.groupable([w, w], [b, b], [a, a])
    assert not kernels.groupable([w, torch.zeros(8, 5)], [b, b], [a, torch.zeros(2, 5)])  # d_in differs
    assert not kernels.groupable([w, w], [b, torch.zeros(8, 3)], [a, torch.zeros(3, 6)])  # rank differs
    with pytest.raises(ValueError, match="build them one by one"):
        kernels.merged_weights([w, w.t().contiguous().t()], [b, b], [a, a], [1.0, 1.0])  # strides differ
    with pytest.raises(ValueError, match="shapes/dtypes disagree"):
        kernels.merged_weights([w, w], [b, torch.zeros(7, 2)], [a, a], [1.0, 1.0])


def test_lora_function_compiler_branch_through_the_kernel(monkeypatch) -> None:
    """`_LoraLinear` as a compiled graph runs it — W' from the custom op in forward and, tagged, in backward — against
    y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ differentiated by autograd (fp32 tensors, compared in fp64)."""
    from unipeft import fused

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(kernels, "available", lambda t: True)
    calls = []
    real = kernels.compiled_merged_weight
    monkeypatch.setattr(kernels, "compiled_merged_weight",
                        lambda *args, **kw: calls.append(kw.get("tag", 0)) or real(*args, **kw))
    g = torch.Generator().manual_seed(1)
    x, w, a, b = (torch.randn(*shape, generator=g, requires_grad=True) for shape in [(2, 5, 16), (12, 16), (4, 16),
                                                                                       (12, 4)])
    expected = x.double() @ w.double().t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    gy = torch.randn(expected.shape, generator=g)
    want = torch.autograd.grad(expected, (x, a, b), gy.double())
    y = fused._LoraLinear.apply(x, w.detach(), None, a, b, 0.5, True, None)
    got = torch.autograd.grad(y, (x, a, b), gy)
    assert calls == [0, 1], "forward builds W' with tag 0, backward again with tag 1"
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg.double(), ww.double(), rtol=1e-4, atol=1e-4)


def test_launch_arithmetic_matches_triton() -> None:
    """The grid and rank-chunk sizes come from plain integer arithmetic (Triton's helpers cost µs per call from
    Python); the numbers must be Triton's."""
    import triton

    for x in range(0, 300):
        assert kernels._next_power_of_2(x) == triton.next_power_of_2(x)
        for y in (1, 16, 64, 128):
            assert kernels._cdiv(x, y) == triton.cdiv(x, y)


def _grads_expected(gs, bs, xas, rows, scales, total_rank):
    """The formula in fp64: gaᵀ rows s_i·(g_i·B_i)ᵀ at their offsets (zeros elsewhere), then each
    dB_i = s_i·g_iᵀ·xa_i."""
    n = gs[0].shape[0]
    ga_t = torch.zeros(total_rank, n, dtype=torch.float64)
    dbs = []
    for g, b, xa, row, s in zip(gs, bs, xas, rows, scales):
        ga_t[row:row + b.shape[1]] = s * (g.double() @ b.double()).t()
        dbs.append((s * g.double().t() @ xa.double()).flatten())
    return torch.cat([ga_t.flatten(), *dbs])


def _joined(result) -> torch.Tensor:
    ga_t, dbs = result
    assert ga_t.dtype == dbs.dtype
    return torch.cat([ga_t.flatten(), dbs])


def _from_buffer(flat: torch.Tensor, n_db: int) -> torch.Tensor:
    """`_lora_grads`' one rounded buffer (every dB, then gaᵀ) in `_grads_expected`'s order."""
    return torch.cat([flat[n_db:], flat[:n_db]])


@pytest.mark.parametrize("n", [50, 300])
def test_lora_grads_matches_the_formula(n: int) -> None:
    """Members of a group: d not a tile multiple and wider than one program's columns (several programs add into
    the same ga rows), ranks below a tile and odd, one member without a gradient (its gaᵀ rows stay zero), xa as
    column slices of the group's N × Σr tensor (strided), rows not a multiple of the row block."""
    gen = torch.Generator().manual_seed(n)
    ranks, dims = [16, 5, 8], [600, 70, 33]
    xa = torch.randn(n, sum(ranks), generator=gen)
    xas = list(xa.split(ranks, 1))
    gs = [torch.randn(n, d, generator=gen) for d in dims]
    bs = [torch.randn(d, r, generator=gen) for d, r in zip(dims, ranks)]
    live = [0, 2]  # member 1 got no gradient
    args = ([gs[i] for i in live], [bs[i] for i in live], [xas[i] for i in live], [0, 21], [0.5, 2.0], sum(ranks))
    ga_t, dbs = kernels.lora_grads(*args)
    assert ga_t.shape == (sum(ranks), n) and dbs.shape == (600 * 16 + 33 * 8,) and dbs.dtype == torch.float32
    # one buffer rounded in one pass: the dB's first, gaᵀ after them
    assert ga_t.untyped_storage().data_ptr() == dbs.untyped_storage().data_ptr()
    assert dbs.storage_offset() == 0 and ga_t.storage_offset() == dbs.numel() and ga_t.is_contiguous()
    torch.testing.assert_close(_joined((ga_t, dbs)).double(), _grads_expected(*args), rtol=1e-5, atol=1e-4)
    assert not ga_t[16:21].any(), "the rows of the member without a gradient are zero"
    half = kernels.lora_grads(*([t.half() for t in ts] for ts in args[:3]), *args[3:])  # fp32 sums, one rounding
    assert half[0].dtype == torch.float16
    torch.testing.assert_close(_joined(half).double(), _grads_expected(*([t.half() for t in ts] for ts in args[:3]),
                                                                       *args[3:]), rtol=2e-3, atol=2e-2)


def test_lora_grads_launches_three_members_at_a_time() -> None:
    """Four members with a gradient (more than one launch holds): different widths, ranks and strides per member
    (each member's g, B and xa are read by their own strides, its column programs found by its block counts)."""
    gen = torch.Generator().manual_seed(7)
    n, ranks, dims = 37, [4, 8, 4, 16], [130, 20, 600, 64]
    xa = torch.randn(n, sum(ranks), generator=gen)
    xas = list(xa.split(ranks, 1))
    xas[1] = xas[1].contiguous()  # one xa with its own row stride
    gs = [torch.randn(n, d, generator=gen) for d in dims]
    gs[3] = torch.randn(dims[3], n, generator=gen).t()  # a transposed g
    bs = [torch.randn(d, r, generator=gen) for d, r in zip(dims, ranks)]
    args = (gs, bs, xas, [0, 4, 12, 16], [0.5, 2.0, 1.0, -0.75], sum(ranks))
    launches = []
    got = kernels._lora_grads(*args, lambda grid, a: launches.append(grid) or kernels._launch_grads(grid, a))
    assert len(launches) == 2
    n_db = sum(d * r for d, r in zip(dims, ranks))
    torch.testing.assert_close(_from_buffer(got, n_db).double(), _grads_expected(*args), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [37, 300])
def test_lora_grads_rounds_inside_the_kernel(n: int, monkeypatch) -> None:
    """16-bit gradients: each block of the result is rounded by the program that adds into it last, into an
    uninitialized buffer (filled with NaN here, so an element no program wrote would show) — several row blocks,
    several column programs per member, four members in two launches, every member listed."""
    monkeypatch.setattr(kernels, "_new_output", lambda size, dtype, device: torch.full((size,), float("nan"),
                                                                                       dtype=dtype, device=device))
    gen = torch.Generator().manual_seed(n)
    ranks, dims = [4, 8, 16, 4], [600, 70, 1100, 33]
    xa = torch.randn(n, sum(ranks), generator=gen).half()
    xas = list(xa.split(ranks, 1))
    gs = [torch.randn(n, d, generator=gen).half() for d in dims]
    bs = [(torch.randn(d, r, generator=gen) * 0.1).half() for d, r in zip(dims, ranks)]
    args = (gs, bs, xas, [0, 4, 12, 28], [0.5, 2.0, 1.0, -0.75], sum(ranks))
    launches = []
    got = kernels._lora_grads(*args, lambda grid, a: launches.append(a[-1]) or kernels._launch_grads(grid, a))
    assert launches == [True, True] and got.dtype == torch.float16 and not got.isnan().any()
    n_db = sum(d * r for d, r in zip(dims, ranks))
    torch.testing.assert_close(_from_buffer(got, n_db).double(), _grads_expected(*args), rtol=2e-3, atol=2e-2)
    ga_t, dbs = kernels.lora_grads(*args)  # the public view of the same buffer
    assert ga_t.dtype == dbs.dtype == torch.float16 and not ga_t.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("listed", [[0, 1, 2], [0, 2]])
def test_lora_grads_into_a_callers_buffers(dtype: torch.dtype, listed: list[int]) -> None:
    """`grads_buffers` (made by the caller on its stream, uninitialized: filled with NaN here) and
    `lora_grads_buffer(..., buffers=)` zeroing them itself: the same result as the call that allocates, unplanned
    and then through its launch plan; the result is the caller's buffer (fp32: the sums buffer itself), and the gaᵀ
    rows of a member not listed are zero."""
    gen = torch.Generator().manual_seed(11)
    n, ranks, dims = 40, [4, 8, 4], [96, 33, 64]
    xa = torch.randn(n, sum(ranks), generator=gen).to(dtype)
    xas = list(xa.split(ranks, 1))
    gs = [torch.randn(n, d, generator=gen).to(dtype) for d in dims]
    bs = [(torch.randn(d, r, generator=gen) * 0.1).to(dtype) for d, r in zip(dims, ranks)]
    rows = [0, 4, 12]
    args = ([gs[i] for i in listed], [bs[i] for i in listed], [xas[i] for i in listed], [rows[i] for i in listed],
            [[0.5, 2.0, -1.0][i] for i in listed], sum(ranks))
    want = kernels.lora_grads_buffer(*args)
    launching._PLANS.clear()
    for _ in range(2):  # the second call takes the launch plan the first one recorded
        sums, result = kernels.grads_buffers(args[0], args[1], sum(ranks))
        assert (result is sums) == (dtype == torch.float32) and result.dtype == dtype
        sums.fill_(float("nan"))
        result.fill_(float("nan"))
        got = kernels.lora_grads_buffer(*args, buffers=(sums, result))
        assert got is result and not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    n_db = sum(dims[i] * ranks[i] for i in listed)
    torch.testing.assert_close(_from_buffer(got, n_db).double(), _grads_expected(*args), rtol=2e-3, atol=2e-2)


def test_grads_launch_key_follows_what_triton_specializes() -> None:
    """Compiled grads kernels are cached by a key built per launch: batches whose row counts and offsets Triton
    specializes alike share one entry (no growth per batch length), a row count that is not a multiple of 16, other
    widths or strides get their own."""
    def key(n: int, d: int = 64, transposed: bool = False):
        g = torch.empty(d, n).t() if transposed else torch.empty(n, d)
        b, xa = torch.empty(d, 8), torch.empty(n, 8)
        out = torch.empty(8 * n + d * 8 + 2 * (n // 128 + 1 + d // 64 + 1))
        dst = torch.empty(8 * n + d * 8, dtype=torch.float16)
        return kernels._grads_key(kernels._grads_grid_args([g, g], [b, b], [xa, xa], [0, 8], [1.0, 2.0],
                                                           [0, d * 8], 2 * d * 8, out, dst,
                                                           [16 * n, 16 * n + 2 * d], n // 128 + 1, True)[1])
    assert key(4096) == key(8192)
    assert key(4097) != key(4096)
    assert key(4096, d=80) != key(4096)
    assert key(4096, transposed=True) != key(4096)


@pytest.mark.parametrize("r", [33, 64])
def test_lora_grads_wide_ranks_and_strided_operands(r: int) -> None:
    """Ranks that need a 64-wide rank block; g and B given transposed (non-contiguous) — the kernel reads them by
    their strides."""
    gen = torch.Generator().manual_seed(r)
    g = torch.randn(90, 40, generator=gen).t()  # 40 × 90, strides (1, 40)
    b = torch.randn(r, 90, generator=gen).t()
    xa = torch.randn(40, r, generator=gen)
    args = ([g], [b], [xa], [0], [0.25], r)
    torch.testing.assert_close(_joined(kernels.lora_grads(*args)).double(), _grads_expected(*args),
                               rtol=1e-5, atol=1e-4)


def test_lora_grads_op_and_checks() -> None:
    """The custom op torch.compile graphs call (`unipeft::lora_grads`) gives the same numbers; mismatched operands
    get a clear error; the kernel is only for CUDA tensors."""
    gen = torch.Generator().manual_seed(1)
    g, b, xa = torch.randn(40, 30, generator=gen), torch.randn(30, 4, generator=gen), torch.randn(40, 4, generator=gen)
    expected = _grads_expected([g], [b], [xa], [0], [1.5], 4)
    torch.testing.assert_close(_from_buffer(torch.ops.unipeft.lora_grads([g], [b], [xa], [0], [1.5], 4), 30 * 4)
                               .double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shapes/dtypes disagree"):
        kernels.lora_grads([g], [b.t().contiguous()], [xa], [0], [1.0], 4)
    with pytest.raises(ValueError, match="shapes/dtypes disagree"):
        kernels.lora_grads([g], [b], [xa], [2], [1.0], 4)  # rows 2..6 of 4
    assert not kernels.grads_available([g], [4])  # CPU


def test_lora_grads_availability(monkeypatch) -> None:
    """Ranks ≤ 64, 16/32-bit floats, every offset within int32 for every operand (a strided view can reach past
    2³¹ with fewer elements), non-deterministic mode, UNIPEFT_TRITON not 0."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    g = torch.zeros(4, 4)
    assert kernels.grads_available([g, g], [16, 64]) == kernels._HAS_TRITON
    assert not kernels.grads_available([g], [65])
    assert not kernels.grads_available([g, g.double()], [16])
    wide = torch.zeros(1).expand(2**16, 2**16)  # 2³² elements, no memory: its extent is what counts
    assert kernels._extent(wide) == 1 and kernels._extent(torch.zeros(3, 5)) == 15
    strided = torch.empty_strided((3, 2), (2**30, 1), device="meta")  # 6 elements, offsets up to 2·2³⁰ + 1
    assert not kernels.grads_available([g, strided], [16])
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)  # fp32 atomics: timing-dependent
    assert not kernels.grads_available([g], [16])
    monkeypatch.undo()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setenv("UNIPEFT_TRITON", "0")
    assert not kernels.grads_available([g], [16])


def test_grads_launch_key_follows_triton_specialization() -> None:
    """The cached-launch key holds what Triton specializes ints on (== 1, multiple of 16, int32 range), not their
    values: batches of different lengths reuse one compiled kernel where Triton would."""
    assert kernels._int_spec(48) == kernels._int_spec(4096) == (False, True, True)
    assert kernels._int_spec(1) == (True, False, True)
    assert kernels._int_spec(50) == kernels._int_spec(4097) == (False, False, True)
    assert kernels._int_spec(2**31) == (False, True, False)
    assert kernels._grad_stages(torch.bfloat16, 16) == 3
    assert kernels._grad_stages(torch.float32, 64) == 1  # 48 KiB per stage: one fits the 64 KiB budget


# -- the routed kernel (per-row adapters by slot) ------------------------------------------------------------------
def _routed_expected(y, x, a_stack, b_stack, slots) -> torch.Tensor:
    """y + (x_bt·A_sᵀ)·B_sᵀ with s = slots[b], in fp64 from the operands as given."""
    a, b = a_stack.double()[slots], b_stack.double()[slots]  # (B, r, d_in), (B, d_out, r)
    return y.double() + torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", x.double(), a), b)


def _routed_operands(bsz: int, t: int, d_in: int, d_out: int, r: int, n: int, seed: int = 0):
    """Random stacks with the last slot zero (the base's), x as a strided view: for one token per row the transpose
    of a (d_in, B) tensor (its d_in stride is B), for more a column slice of a wider tensor (row stride > d_in)."""
    g = torch.Generator().manual_seed(seed)
    if t == 1:
        x = torch.randn(d_in, bsz, generator=g).t().unsqueeze(1)
    else:
        x = torch.randn(bsz, t, d_in + 5, generator=g)[:, :, 2:2 + d_in]
    assert not x.is_contiguous()
    y = torch.randn(bsz, t, d_out, generator=g)
    a_stack = torch.randn(n, r, d_in, generator=g)
    b_stack = torch.randn(n, d_out, r, generator=g)
    a_stack[-1], b_stack[-1] = 0, 0
    slots = torch.tensor([n - 1, 1, 0, 1, n - 1, 2][:bsz], dtype=torch.long)  # the zero slot and repeated slots
    return y, x, a_stack, b_stack, slots


@pytest.mark.parametrize("t,chunks", [(1, 2), (3, 3)])
def test_routed_lora_matches_the_formula(t: int, chunks: int) -> None:
    """Rank below one rank block (6 < 16, masked); d_in over 2 or 3 ROUTED_BK chunks (a count that is not a power of
    two too), not a multiple of it; d_out wider than one ROUTED_BN block and not a multiple of it; rows on the zero
    slot get y back; y is not modified (out of place)."""
    d_in, d_out = (chunks - 1) * routed_kernels.ROUTED_BK + 30, routed_kernels.ROUTED_BN + 44
    assert d_in % routed_kernels.ROUTED_BK and d_out % routed_kernels.ROUTED_BN
    y, x, a_stack, b_stack, slots = _routed_operands(6, t, d_in, d_out, 6, 4, seed=t)
    y_before = y.clone()
    got = routed_kernels.routed_lora(y, x, a_stack, b_stack, slots)
    assert got.shape == y.shape and got.dtype == torch.float32 and torch.equal(y, y_before)
    torch.testing.assert_close(got.double(), _routed_expected(y, x, a_stack, b_stack, slots), rtol=1e-5, atol=1e-4)
    base_rows = slots == 3
    assert torch.equal(got[base_rows], y[base_rows]), "rows on the zero slot are y exactly"
    half = [v.half() for v in (y, x, a_stack, b_stack)]  # fp32 accumulation, one rounding to fp16
    got16 = routed_kernels.routed_lora(*half, slots)
    assert got16.dtype == torch.float16
    reference = _routed_expected(*(v.float() for v in half), slots).half()
    torch.testing.assert_close(got16, reference, rtol=2e-3, atol=2e-2)


def test_routed_lora_reads_strided_stacks_and_y() -> None:
    """The stacks and y as views with non-unit inner strides: the kernel reads every operand by its strides."""
    g = torch.Generator().manual_seed(5)
    bsz, t, d_in, d_out, r, n = 3, 2, 40, 24, 8, 3
    x = torch.randn(bsz, t, d_in, generator=g)
    y = torch.randn(bsz, t, 2 * d_out, generator=g)[:, :, ::2]
    a_stack = torch.randn(n, d_in, r, generator=g).transpose(1, 2)  # (n, r, d_in), strides (r·d_in, 1, r)
    b_stack = torch.randn(n, r, d_out, generator=g).transpose(1, 2)  # (n, d_out, r), strides (r·d_out, 1, d_out)
    slots = torch.tensor([2, 0, 0])
    got = routed_kernels.routed_lora(y, x, a_stack, b_stack, slots)
    torch.testing.assert_close(got.double(), _routed_expected(y, x, a_stack, b_stack, slots), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("t", [1, 3])
def test_routed_delta_alone_matches_the_formula(t: int) -> None:
    """The expand without y (routed_linear's side-stream half): its output is the delta (x·A_sᵀ)·B_sᵀ alone, zero on
    the base's slot, from the same two kernels."""
    d_in, d_out = routed_kernels.ROUTED_BK + 30, routed_kernels.ROUTED_BN + 44
    y, x, a_stack, b_stack, slots = _routed_operands(6, t, d_in, d_out, 6, 4, seed=10 + t)
    part, delta = routed_kernels._buffers(x, a_stack, b_stack)
    routed_kernels._pair(None, x, a_stack, b_stack, slots, part, delta, routed_kernels._launch_routed)
    torch.testing.assert_close(delta.double(), _routed_expected(torch.zeros_like(y), x, a_stack, b_stack, slots),
                               rtol=1e-5, atol=1e-4)
    assert not delta[slots == 3].any(), "rows on the zero slot get no delta"


@pytest.mark.parametrize("bias", [False, True])
def test_routed_linear_is_the_base_gemm_and_the_delta(bias: bool) -> None:
    """routed_linear (and its custom op, which a compiled decoding step calls) returns x·Wᵀ + b and the routed delta
    apart — their sum is routed_lora's output — for a strided x too (it is the layout a compiled graph hands over);
    a weight that does not fit gets a clear error."""
    y, x, a_stack, b_stack, slots = _routed_operands(4, 1, 70, 50, 4, 3, seed=11)
    g = torch.Generator().manual_seed(12)
    w = torch.randn(50, 70, generator=g)
    b = torch.randn(50, generator=g) if bias else None
    base = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    delta = _routed_expected(torch.zeros_like(y), x, a_stack, b_stack, slots)
    for got_y, got_delta in (routed_kernels.routed_linear(x, w, b, a_stack, b_stack, slots),
                             torch.ops.unipeft.routed_linear(x, w, b, a_stack, b_stack, slots)):
        assert got_y.shape == got_delta.shape == (4, 1, 50)
        torch.testing.assert_close(got_y.double(), base, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got_delta.double(), delta, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        routed_kernels.routed_linear(x, w[:, :-1], b, a_stack, b_stack, slots)
    with pytest.raises(ValueError, match="shapes/dtypes disagree"):
        routed_kernels.routed_linear(x, w, b, a_stack, b_stack, slots.int())


def test_routed_op_is_registered_and_checks_operands() -> None:
    """The custom op torch.compile graphs call (`unipeft::routed_lora`) gives the same numbers; mismatched shapes,
    dtypes or slot types get a clear error."""
    assert hasattr(torch.ops.unipeft, "routed_lora")
    y, x, a_stack, b_stack, slots = _routed_operands(4, 2, 70, 50, 4, 3, seed=7)
    expected = _routed_expected(y, x, a_stack, b_stack, slots)
    torch.testing.assert_close(torch.ops.unipeft.routed_lora(y, x, a_stack, b_stack, slots).double(), expected,
                               rtol=1e-5, atol=1e-4)
    bad = [(y, x, a_stack[:, :, :-1], b_stack, slots),  # A's d_in is not x's
           (y, x, a_stack, b_stack[:, :, :-1], slots),  # ranks of A and B differ
           (y, x, a_stack, b_stack[:-1], slots),  # slot counts differ
           (y[:, :, :-1], x, a_stack, b_stack, slots),  # d_out of y is not B's
           (y[:, :1], x, a_stack, b_stack, slots),  # tokens per row differ
           (y, x, a_stack, b_stack, slots[:-1]),  # one slot per row
           (y, x, a_stack, b_stack, slots.int()),  # slots are int64
           (y, x, a_stack.half(), b_stack, slots)]  # one dtype
    for args in bad:
        with pytest.raises(ValueError, match="shapes/dtypes disagree"):
            routed_kernels.routed_lora(*args)
        with pytest.raises(ValueError, match="shapes/dtypes disagree"):
            routed_kernels._check_routed(*args)


def test_routed_kernel_availability(monkeypatch) -> None:
    """CUDA only, no gradient, at most ROUTED_MAX_TOKENS tokens per row, 3-d x, UNIPEFT_TRITON not 0; given the A
    stack, x's dtype (16/32-bit float) and ranks ≤ 64."""
    x = torch.zeros(2, 1, 8)
    with torch.no_grad():
        assert not routed_kernels.routed_available(x)  # CPU
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        assert routed_kernels.routed_available(x) == kernels._HAS_TRITON
        most = routed_kernels.ROUTED_MAX_TOKENS
        assert routed_kernels.routed_available(torch.zeros(2, most, 8)) == kernels._HAS_TRITON
        assert not routed_kernels.routed_available(torch.zeros(2, most + 1, 8))
        assert not routed_kernels.routed_available(torch.zeros(2, 8))
        assert routed_kernels.routed_available(x, torch.zeros(3, 64, 8)) == kernels._HAS_TRITON
        assert not routed_kernels.routed_available(x, torch.zeros(3, 65, 8))
        assert not routed_kernels.routed_available(x, torch.zeros(3, 4, 8, dtype=torch.float16))
        assert not routed_kernels.routed_available(x.double(), torch.zeros(3, 4, 8, dtype=torch.float64))
    with torch.enable_grad():
        assert not routed_kernels.routed_available(x)
    with torch.no_grad():
        monkeypatch.setenv("UNIPEFT_TRITON", "0")
        assert not routed_kernels.routed_available(x)




@pytest.mark.parametrize("path", ["graphed", "streams_off", "not_graphed"])
@pytest.mark.parametrize("shared", [False, True])
def test_routed_generate_through_the_kernel(shared: bool, path: str, monkeypatch) -> None:
    """A routed greedy `generate` whose decoding steps (one token per row) run the routed kernels — from the
    per-routing stacks, or from the shared ones (`prepare_routing`) — as a compiled call does, equals the reference
    path's (UNIPEFT_FUSED=0): from the shared stacks of a CUDA-graphed decode as the base GEMM and the delta side by
    side (`routed_linear`, summed by the layer), else — per-routing stacks, UNIPEFT_STREAMS=0, or a decode that is
    not graphed — as `routed_lora` after the base GEMM, and then never through `routed_linear`. Adapters of three
    ranks, one on more projections and one on fewer; rows on the base and repeated adapters."""
    from conftest import as_compiled, inputs, tiny_model
    from test_engine import randomize

    import unipeft
    from unipeft import routed

    am = unipeft.attach(tiny_model("llama").eval(), "lora", r=4)
    am.add("b", "lora", r=6, targets=["q", "v", "down"])  # down: d_in 48
    am.add("c", "lora", r=2, alpha=8, targets=["q"])
    for i, n in enumerate(am.recipes):
        randomize(am, n, seed=i + 1, std=0.3)
    am.eval()  # (the shared stacks serve eval calls)
    ids = inputs(batch=5, seq=5)["input_ids"]
    names = ["b", "__base__", "default", "c", "b"]
    steps = 3
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
              pad_token_id=0, adapter_names=names)
    with torch.no_grad():
        monkeypatch.setenv("UNIPEFT_FUSED", "0")
        reference = am.generate(input_ids=ids, **kw)
        base = am.generate(input_ids=ids, **{**kw, "adapter_names": ["__base__"] * len(names)})
        assert [torch.equal(reference[i], base[i]) for i in range(len(names))] == [n == "__base__" for n in names]
        monkeypatch.setenv("UNIPEFT_FUSED", "1")
        monkeypatch.setattr(routed, "lora", as_compiled(routed.lora))
        monkeypatch.setattr(routed_kernels, "routed_available", lambda x, a=None: (
            not torch.is_grad_enabled() and x.dim() == 3 and x.shape[1] <= routed_kernels.ROUTED_MAX_TOKENS
            and (a is None or a.shape[1] <= 64)))
        monkeypatch.setenv("UNIPEFT_STREAMS", "0" if path == "streams_off" else "1")
        # (as a static-cache generate compiled into CUDA graphs, or not)
        monkeypatch.setattr(routed, "graphed_decoding", lambda model, kwargs: path != "not_graphed")
        launches, unwanted = [], []
        called = "routed_linear" if path == "graphed" and shared else "routed_lora"  # (two streams: shared only)
        other = "routed_lora" if called == "routed_linear" else "routed_linear"
        real, x_at = getattr(routed_kernels, called), 0 if called == "routed_linear" else 1
        monkeypatch.setattr(routed_kernels, called, lambda *args: launches.append(args[x_at].shape) or real(*args))
        real_other = getattr(routed_kernels, other)
        monkeypatch.setattr(routed_kernels, other, lambda *args: unwanted.append(1) or real_other(*args))
        shared_out = []
        real_shared = as_compiled(routed.shared_lora)
        monkeypatch.setattr(routed, "shared_lora", lambda *args: shared_out.append(real_shared(*args)) or
                            shared_out[-1])
        if shared:
            assert am.prepare_routing() == len(am._wrappers)
        got = am.generate(input_ids=ids, **kw)
    assert all(s[1] == 1 for s in launches), "only decoding steps (one token per row) run the kernel"
    assert len(launches) == (steps - 1) * len(am._wrappers), "every adapted projection at every decoding step"
    assert not unwanted, f"{other} never runs on this path"
    if shared:
        assert len(shared_out) == steps * len(am._wrappers) and all(o is not None for o in shared_out)
    else:
        assert not shared_out
    assert torch.equal(got, reference)
