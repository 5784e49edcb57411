"""GPU check of the Triton kernels against PyTorch (bf16 / fp16 / fp32) and the fp64 formulas, and of the grouped
q/k/v path's gradients against the per-projection path on a random Llama (bf16), and a compiled LoRA step against the
eager one (gradients, and no weight-sized view copies in the generated code).
Usage: PYTHONPATH=src python3 bench/kernel_check.py [--only two_streams,compiled_step,graphed_steps,q4]
(q4: the 4-bit weight kernel against bitsandbytes; carry the bitsandbytes wheel)"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys

import torch

from unipeft import kernels, launching


def merged_weight_rows() -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m, n, r in ((2048, 2048, 16), (5632, 2048, 16), (2048, 5632, 64), (1000, 300, 8)):
            w = torch.randn(m, n, device="cuda", dtype=dtype)
            b = torch.randn(m, r, device="cuda", dtype=dtype) * 0.01
            a = torch.randn(r, n, device="cuda", dtype=dtype)
            ref64 = w.double() + 2.0 * (b.double() @ a.double())
            got = kernels.merged_weight(w, b, a, 2.0)
            again = kernels.merged_weight(w, b, a, 2.0)  # second launch: the cached compiled kernel (_launch)
            torch_ = torch.addmm(w, b, a, alpha=2.0)
            rows.append(dict(dtype=str(dtype), shape=[m, n, r],
                             triton_err=float((got.double() - ref64).abs().max()),
                             torch_err=float((torch_.double() - ref64).abs().max()),
                             differ_frac=float((got != torch_).float().mean()),
                             cached_launch_equal=bool(torch.equal(got, again))))
    return rows


def launch_host_us() -> dict:
    """Host time per call (µs) of merged_weight on its first launch per key (Triton's own path, `JITFunction.run`, then
    the launcher's one-time check), through the
    cached compiled kernel's runner (`compiled[grid](*args)`: the launch before launching._launcher), through the
    direct C launch without a launch plan (launching._launcher), from the call's launch plan (launching._Plan, the
    product's path), and of torch.addmm, on a 2048² bf16 weight (the GPU is faster than these calls, so the loop
    time is host time). `direct_used`: whether this Triton's layout passed the launcher's check (else the cached
    rows are the same path)."""
    import time

    w = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2048, 16, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    product, record = launching._launcher, launching._plan

    def runner_only(compiled, grid, args, stream_of):
        return lambda grid, args: compiled[grid](*args)

    def cached(launcher):
        def setup():
            launching._COMPILED.clear()
            launching._PLANS.clear()
            launching._launcher = launcher
            try:
                kernels.merged_weight(w, b, a, 2.0)  # compiles (first call per key) and caches the launcher
            finally:
                launching._launcher = product
        return setup

    out = {}
    for name, setup, fn in (
            ("triton_jit_path", launching._PLANS.clear,
             lambda: (launching._COMPILED.clear(), kernels.merged_weight(w, b, a, 2.0))),
            ("triton_cached_runner", cached(runner_only), lambda: kernels.merged_weight(w, b, a, 2.0)),
            ("triton_cached_direct", cached(product), lambda: kernels.merged_weight(w, b, a, 2.0)),
            ("triton_planned", cached(product), lambda: kernels.merged_weight(w, b, a, 2.0)),
            ("torch_addmm", None, lambda: torch.addmm(w, b, a, alpha=2.0))):
        launching._plan = lambda *a, **kw: None  # (no plans, but for the product's row)
        if setup is not None:
            setup()
        if name == "triton_planned":
            launching._plan = record
        try:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(300):
                fn()
            out[name] = round((time.perf_counter() - t0) / 300 * 1e6, 1)
            torch.cuda.synchronize()
        finally:
            launching._plan = record
    out["planned_used"] = bool(launching._PLANS)
    out["direct_used"] = any(getattr(f, "__name__", "") == "direct" for f in launching._COMPILED.values())
    return out


def grouped_grads() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import unipeft

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000)
    base = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    x = torch.randint(0, 1000, (4, 512), device="cuda")
    out = {}
    for env in ("1", "0"):
        os.environ["UNIPEFT_GROUPS"] = env
        torch.manual_seed(1)
        am = unipeft.attach(copy.deepcopy(base), "lora", r=16, alpha=32, targets=["q", "k", "v", "o", "gate", "up"])
        with torch.no_grad():
            for p in am.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
        loss = am(input_ids=x, labels=x).loss
        loss.backward()
        out[env] = (loss.item(), {n: p.grad.float() for n, p in am.named_parameters() if p.requires_grad})
    os.environ["UNIPEFT_GROUPS"] = "1"
    (l1, g1), (l0, g0) = out["1"], out["0"]
    rel = max(float((g1[n] - g0[n]).norm() / g0[n].norm()) for n in g0)
    return dict(loss_grouped=l1, loss_single=l0, max_rel_grad_diff=rel, params=len(g0))


def _flat(result) -> torch.Tensor:
    ga_t, dbs = result  # (views of one rounded buffer: the dB's, then gaᵀ)
    return torch.cat([ga_t.flatten(), dbs]).double()


def merged_weights_rows() -> list[dict]:
    """kernels.merged_weights (a sibling group's W' in one launch) against merged_weight per member: the same
    numbers bit for bit (one kernel, the member picked per program), the error against fp64, and the A's it
    stacks against torch.cat."""
    rows = []
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for d_outs in ((2048, 2048, 2048), (5632, 5632), (2048, 512, 512), (100, 70, 50, 30)):
            ws = [torch.randn(m, 2048, device="cuda", dtype=dtype) for m in d_outs]
            bs = [torch.randn(m, 16, device="cuda", dtype=dtype) * 0.01 for m in d_outs]
            as_ = [torch.randn(16, 2048, device="cuda", dtype=dtype) for _ in d_outs]
            scales = [2.0, 0.5, 1.0, 3.0][:len(d_outs)]
            got, a_cat = kernels.merged_weights(ws, bs, as_, scales)
            one = [kernels.merged_weight(w, b, a, s) for w, b, a, s in zip(ws, bs, as_, scales)]
            err = max(float((g.double() - (w.double() + s * b.double() @ a.double())).abs().max())
                      for g, w, b, a, s in zip(got, ws, bs, as_, scales))
            rows.append(dict(dtype=str(dtype), d_outs=list(d_outs),
                             equal_to_per_member=all(torch.equal(g, o) for g, o in zip(got, one)), max_abs_err=err,
                             a_stack_equal_to_cat=torch.equal(a_cat, torch.cat(as_))))
    return rows


def lora_grads_rows() -> list[dict]:
    """kernels.lora_grads (gaᵀ and dB from one read of g, fp32 atomics) against the fp64 formula, next to cuBLAS's
    bf16 GEMMs' error, at the harness shapes (N = 8192, d_out 2048 / 5632, r = 16) and a q/k/v-like group."""
    rows = []
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for dims, ranks in (([2048], [16]), ([5632], [16]), ([2048, 512, 512], [16, 16, 16]), ([1000], [40])):
            n = 8192
            gs = [torch.randn(n, d, device="cuda", dtype=dtype) for d in dims]
            bs = [torch.randn(d, r, device="cuda", dtype=dtype) * 0.02 for d, r in zip(dims, ranks)]
            xa = torch.randn(n, sum(ranks), device="cuda", dtype=dtype)
            xas = list(xa.split(ranks, 1))
            offs = [sum(ranks[:i]) for i in range(len(ranks))]
            got = _flat(kernels.lora_grads(gs, bs, xas, offs, [2.0] * len(dims), sum(ranks)))
            again = _flat(kernels.lora_grads(gs, bs, xas, offs, [2.0] * len(dims), sum(ranks)))  # cached launch
            ga64 = torch.cat([2.0 * (g.double() @ b.double()).t() for g, b in zip(gs, bs)])
            db64 = [2.0 * g.double().t() @ x.double() for g, x in zip(gs, xas)]
            want = torch.cat([ga64.flatten(), *(d.flatten() for d in db64)])
            cublas = torch.cat([torch.cat([(2.0 * (g @ b)).t() for g, b in zip(gs, bs)]).flatten(),
                                *((2.0 * (g.t() @ x)).flatten() for g, x in zip(gs, xas))]).double()
            scale = want.abs().max()
            # the 16-bit result is rounded by the last program to add into each block (kernels._grads_kernel): into
            # a NaN-filled buffer, over 20 calls, an element rounded before every add arrived, or never, would show
            real_new = kernels._new_output
            kernels._new_output = lambda size, dt, dev: torch.full((size,), float("nan"), dtype=dt, device=dev)
            try:
                runs = [_flat(kernels.lora_grads(gs, bs, xas, offs, [2.0] * len(dims), sum(ranks)))
                        for _ in range(20)]
            finally:
                kernels._new_output = real_new
            rows.append(dict(dtype=str(dtype), dims=dims, ranks=ranks,
                             kernel_rel_err=float((got - want).abs().max() / scale),
                             cublas_rel_err=float((cublas - want).abs().max() / scale),
                             cached_launch_rel_diff=float((again - got).abs().max() / scale),
                             nan_filled_20_calls_unwritten=int(sum(int(r.isnan().sum()) for r in runs)),
                             nan_filled_20_calls_max_rel_err=float(max((r - want).abs().max() for r in runs) / scale)))
    return rows


def _lora_llama():
    """A random bf16 Llama (2 layers, GQA) with LoRA r=16 on all 7 linears, its adapters drawn from N(0, 0.02), and a
    batch of 4 × 512 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import unipeft

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000)
    am = unipeft.attach(LlamaForCausalLM(cfg).to("cuda", torch.bfloat16), "lora", r=16, alpha=32,
                        targets=["q", "k", "v", "o", "gate", "up", "down"])
    with torch.no_grad():
        for p in am.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return am, torch.randint(0, 1000, (4, 512), device="cuda")


def grads_kernel_training() -> dict:
    """LoRA gradients of a random bf16 Llama (groups and lone projections) with the grads kernel and with the cuBLAS
    GEMMs, three steps each (the later ones through the cached launch path): relative norm of the difference."""
    am, x = _lora_llama()
    real, out = kernels.grads_available, {}
    for on in (True, False):
        kernels.grads_available = real if on else (lambda *a: False)
        for _ in range(3):
            am.zero_grad(set_to_none=True)
            am(input_ids=x, labels=x).loss.backward()
        out[on] = {n: p.grad.float() for n, p in am.named_parameters() if p.requires_grad}
    kernels.grads_available = real
    rel = max(float((out[True][n] - out[False][n]).norm() / out[False][n].norm()) for n in out[False])
    return dict(max_rel_grad_diff_kernel_vs_cublas=rel, params=len(out[False]))


def compiled_step(streams: str = "1") -> dict:
    """A compiled LoRA step of a small bf16 Llama (groups, both kernels as custom ops; UNIPEFT_STREAMS=`streams`: "1"
    the backward's products beside the dx GEMMs in the op unipeft::lora_backward, "0" traced in the graph) against
    the eager step: the gradients' largest relative difference, the graph count, the op's call sites in the
    generated code, and the kernels that do nothing but `split_with_sizes`
    in the generated code (`triton_poi_fused_split_with_sizes_N`) — weight-sized copies the compiler adds when a
    kernel writes views of one buffer (none expected since W' of a group is written at offsets into the buffer
    itself; kernels that fuse a split into other work, such as the SwiGLU or RoPE backward, are not copies)."""
    import re

    from torch._inductor.utils import run_and_get_code

    am, x = _lora_llama()
    os.environ["UNIPEFT_STREAMS"] = streams
    torch._dynamo.reset()

    def step(model):
        am.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.float().clone() for n, p in am.named_parameters() if p.requires_grad}
    eager = step(am)
    compiled, codes = run_and_get_code(step, torch.compile(am))
    os.environ.pop("UNIPEFT_STREAMS")
    text = "\n".join(codes)
    copies = sorted(set(re.findall(r"triton_poi_fused_split_with_sizes_\d+\b", text)))
    return dict(graphs=len(codes), split_copy_kernels=copies,
                merge_launch_sites=text.count("_merge_kernel"),
                lora_backward_op_sites=text.count("unipeft.lora_backward"),
                max_rel_grad_diff=max(float((compiled[n] - eager[n]).norm() / eager[n].norm()) for n in eager))


def graphed_steps(streams: str = "1", steps: int = 6) -> dict:
    """torch.compile(mode="reduce-overhead") — the step replayed from CUDA graphs (cudagraph trees) — against eager,
    over `steps` training steps from the same start with an SGD update between them (so replays must read the updated
    weights): per step the loss difference and the gradients' largest relative difference. UNIPEFT_STREAMS=`streams`:
    "1" the backward's LoRA products in the op unipeft::lora_backward (on the capturing stream while a graph is
    recorded), "0" traced in the graph."""
    import copy

    am, x = _lora_llama()
    ref = copy.deepcopy(am)
    os.environ["UNIPEFT_STREAMS"] = streams
    torch._dynamo.reset()
    compiled = torch.compile(am, mode="reduce-overhead")
    losses, grads = [], []
    try:
        for _ in range(steps):
            got = {}
            for name, model, owner in (("eager", ref, ref), ("graphed", compiled, am)):
                owner.zero_grad(set_to_none=True)
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                got[name] = (float(loss), {n: p.grad.float().clone() for n, p in owner.named_parameters()
                                           if p.requires_grad})
                with torch.no_grad():
                    for p in owner.parameters():
                        if p.requires_grad:
                            p.sub_(0.5 * p.grad)
            losses.append(abs(got["graphed"][0] - got["eager"][0]))
            e, g = got["eager"][1], got["graphed"][1]
            grads.append(max(float((g[n] - e[n]).norm() / e[n].norm()) for n in e))
    finally:
        os.environ.pop("UNIPEFT_STREAMS")
    torch.cuda.synchronize()
    return dict(steps=steps, loss_abs_diff=[round(v, 5) for v in losses], max_rel_grad_diff=grads)


def two_streams(iters: int = 20) -> dict:
    """overlap.lora_backward with its products on the side stream against the same call on one stream, at the
    benchmark model's q/k/v (GQA) and o shapes, bf16, `iters` times each. Every input is made by a main-stream
    kernel queued behind a long GEMM just before the call, and a main-stream fill right after it may take any block
    the call freed: a side stream that did not wait for the main one (or a block reused before the join) would read
    stale or half-written data. Also the bytes in memory segments the side stream owns (none expected: the buffers
    are allocated on the main stream), and how many call signatures run from a plan (overlap._Call: after its
    first call each of the four — two shapes, two and one streams — runs from its plan, so both paths are
    compared)."""
    from unipeft import overlap

    torch.manual_seed(0)
    dev, dt, n, d, kv, r = "cuda", torch.bfloat16, 8192, 2048, 512, 16
    big = torch.randn(8192, 8192, device=dev, dtype=dt)
    worst, vs_plain, calls = 0.0, 0.0, 0
    for widths, rebuild in (([d, kv, kv], False), ([d], True)):
        ws = [torch.randn(w, d, device=dev, dtype=dt) * 0.02 for w in widths]
        bs = [torch.randn(w, r, device=dev, dtype=dt) * 0.02 for w in widths]
        a_cat = torch.randn(r * len(widths), d, device=dev, dtype=dt) * 0.02
        scales = [2.0] * len(widths)
        for _ in range(iters):
            torch.mm(big, big)  # ~1 ms on the main stream, ahead of the inputs
            x = torch.randn(n, d, device=dev, dtype=dt)
            gs = [torch.randn(n, w, device=dev, dtype=dt) for w in widths]
            got = overlap.lora_backward(gs, ws, bs, x, a_cat, scales, [r] * len(widths), True, True, rebuild)
            torch.full((64 * 1024 * 1024,), float("nan"), device=dev, dtype=dt)  # may reuse freed blocks at once
            os.environ["UNIPEFT_STREAMS"] = "0"
            want = overlap.lora_backward(gs, ws, bs, x, a_cat, scales, [r] * len(widths), True, True, rebuild)
            os.environ.pop("UNIPEFT_STREAMS")
            for a, b in zip(got, want):
                worst = max(worst, float((a.float() - b.float()).norm() / b.float().norm()))
            plain = overlap._unplanned(gs, ws, bs, x, a_cat, scales, [r] * len(widths), True, True, rebuild, None)
            for a, b in zip(got, plain):  # (fp32 atomics in the grads kernel: equal up to the order of additions)
                vs_plain = max(vs_plain, float((a.float() - b.float()).norm() / b.float().norm()))
            calls += 1
    torch.cuda.synchronize()
    side = {lane.side.cuda_stream for lane in overlap._LANES.values()}
    side_bytes = sum(seg["total_size"] for seg in torch.cuda.memory_snapshot() if seg.get("stream") in side)
    return dict(calls=calls, max_rel_diff_two_vs_one_stream=worst, max_rel_diff_vs_unplanned=vs_plain,
                side_stream_segment_bytes=side_bytes,
                lanes=len(overlap._LANES), planned_signatures=sum(type(c) is overlap._Call
                                                                  for c in overlap._CALLS.values()))


def _host_us(fn, iters: int) -> float:
    """µs per call of fn, issued back to back with one synchronization at the end (after 5 warm-up calls)."""
    import time

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / iters * 1e6, 1)


def q4_rows(iters: int = 200) -> list[dict]:
    """The 4-bit weight kernel (kernels_q4.py) on the GPU against bitsandbytes: its dequantization (expected equal
    bit for bit), W' against addmm_ on bitsandbytes' dequantized W (relative difference), and host µs per call with
    a synchronization only at the end (the GPU keeps up at these sizes only if the host is the bottleneck: the
    ratio is what matters) — kernel from its launch plan against bitsandbytes' op + addmm_."""
    import bitsandbytes.functional as bf

    from unipeft import kernels_q4

    rows = []
    for (m, n), qt, nested, dtype in [((2048, 2048), "nf4", True, torch.bfloat16), ((5632, 2048), "nf4", True,
                                      torch.bfloat16), ((2048, 5632), "fp4", False, torch.bfloat16),
                                      ((512, 2048), "nf4", True, torch.float16)]:
        g = torch.Generator(device="cuda").manual_seed(m + n)
        w = torch.randn(m, n, device="cuda", dtype=dtype, generator=g)
        b = torch.randn(m, 16, device="cuda", dtype=dtype, generator=g) * 0.01
        a = torch.randn(16, n, device="cuda", dtype=dtype, generator=g)
        q, st = bf.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=nested)
        ref = bf.dequantize_4bit(q, st)
        absmax = st.absmax if not st.nested else bf.dequantize_blockwise(st.absmax, st.state2).float() + st.offset
        codes = kernels_q4.table(qt, q.device)
        plain = kernels_q4.q4_weight(q, absmax.float(), codes, (m, n), 64, dtype)
        merged = kernels_q4.q4_weight(q, absmax.float(), codes, (m, n), 64, dtype, b, a, 0.5)
        expected = ref.clone().addmm_(b, a, alpha=0.5)

        def theirs(q=q, absmax=absmax, qt=qt, shape=st.shape, dtype=dtype, b=b, a=a):
            torch.ops.bitsandbytes.dequantize_4bit.default(q, absmax, 64, qt, shape, dtype).addmm_(b, a, alpha=0.5)
        ours = functools.partial(kernels_q4.q4_weight, q, absmax.float(), codes, (m, n), 64, dtype, b, a, 0.5)
        host = {"kernel": _host_us(ours, iters), "bnb_op_addmm": _host_us(theirs, iters)}
        extra = {}
        if nested:  # the double-quantized absmax decoded in the kernel (what quant.dequantizer passes)
            packed_absmax = kernels_q4.Nested(st.absmax, st.state2.code, st.state2.absmax, st.offset,
                                              st.state2.blocksize)
            in_kernel = functools.partial(kernels_q4.q4_weight, q, packed_absmax, codes, (m, n), 64, dtype, b, a, 0.5)

            def decode_then_kernel(st=st, q=q, codes=codes, shape=(m, n), dtype=dtype, b=b, a=a):
                # the path before: bitsandbytes' blockwise decode and the offset added, then the kernel
                decoded = bf.dequantize_blockwise(st.absmax, st.state2).float() + st.offset
                return kernels_q4.q4_weight(q, decoded, codes, shape, 64, dtype, b, a, 0.5)
            extra = dict(nested_dequant_equal=bool(torch.equal(
                             kernels_q4.q4_weight(q, packed_absmax, codes, (m, n), 64, dtype), ref)),
                         nested_merged_equal=bool(torch.equal(in_kernel(), merged)))
            host.update(kernel_absmax_in_kernel=_host_us(in_kernel, iters),
                        decode_then_kernel=_host_us(decode_then_kernel, iters))
        rows.append(dict(shape=[m, n], quant_type=qt, nested=nested, dtype=str(dtype),
                         dequant_equal=bool(torch.equal(plain, ref)),
                         dequant_max_abs_diff=float((plain.float() - ref.float()).abs().max()),
                         merged_rel_diff=float((merged.float() - expected.float()).norm() / expected.float().norm()),
                         us_per_call=host, **extra))
    return rows


CHECKS = dict(merged_weight=merged_weight_rows, merged_weights=merged_weights_rows, launch_host_us=launch_host_us,
              q4=q4_rows,
              grouped=grouped_grads, lora_grads=lora_grads_rows, grads_kernel_training=grads_kernel_training,
              compiled_step=lambda: compiled_step("1"), compiled_step_one_stream=lambda: compiled_step("0"),
              two_streams=two_streams, graphed_steps=lambda: graphed_steps("1"),
              graphed_steps_one_stream=lambda: graphed_steps("0"))


if __name__ == "__main__":
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else list(CHECKS)
    res = {name: CHECKS[name]() for name in only}
    print(json.dumps(res, indent=1))
