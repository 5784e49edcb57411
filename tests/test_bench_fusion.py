"""bench/fusion_probe.py's pieces: the filter for generated kernels that only transpose-copy a tensor (named after
clone and transpose and nothing else, from launch lines as Inductor writes them), and its graph variant's views."""

from __future__ import annotations

import types

import torch
from conftest import bench_module


def test_only_copy_kernels_are_listed() -> None:
    probe = bench_module("fusion_probe")
    code = "\n".join([
        "    triton_poi_fused__unsafe_view_clone_transpose_view_9.run(buf44, buf45, 16777216, stream=stream0)",
        "    triton_poi_fused__to_copy_add_bmm_cat_clone_cos_mul_neg_sin_slice_slice_backward_transpose_10.run(buf41)",
        "    triton_poi_fused_add_clone_transpose_11.run(buf47, tangents_3, 16777216, stream=stream0)",
        "    triton_poi_fused__unsafe_view_clone_transpose_view_9.run(buf98, buf101, 16777216, stream=stream0)",
        "    triton_poi_fused_clone_transpose_view_3.run(buf1, buf2, 64, stream=stream0)",
        "triton_poi_fused_clone_transpose_7 = async_compile.triton('triton_poi_fused_clone_transpose_7', '''",
        "    triton_red_fused_clone_transpose_sum_2.run(buf3, buf4, 64, stream=stream0)",
    ])
    assert probe.standalone_copies(code) == ["triton_poi_fused__unsafe_view_clone_transpose_view_9",
                                             "triton_poi_fused_clone_transpose_view_3"]


def test_distinct_views_share_memory_but_are_new_tensors() -> None:
    """The `distinct_kernel_views` variant's views: same values, shape, strides and memory as the gradients they
    stand for, but other tensor objects (other nodes in a traced graph); None stays None."""
    probe = bench_module("fusion_probe")
    g = torch.arange(24.0).reshape(4, 6)[:, 1:5]  # a strided view
    views = probe.distinct_views([g, None])
    assert views[1] is None and views[0] is not g
    assert views[0].shape == g.shape and views[0].stride() == g.stride()
    assert views[0].data_ptr() == g.data_ptr() and torch.equal(views[0], g)


def test_patched_grads_routes_the_gradients_through_distinct_views() -> None:
    """Inside `patched_grads`, a call of kernels.lora_grads reaches the real function with new views of the same
    gradients (the other arguments unchanged); afterwards the real function is back."""
    probe = bench_module("fusion_probe")
    seen = []
    real = lambda gs, *rest: seen.append((gs, rest))  # noqa: E731
    fake = types.SimpleNamespace(lora_grads=real)
    g = torch.randn(3, 4)
    with probe.patched_grads(fake):
        fake.lora_grads([g], "b", 7)
    assert fake.lora_grads is real
    (gs, rest), = seen
    assert rest == ("b", 7) and gs[0] is not g and gs[0].data_ptr() == g.data_ptr() and torch.equal(gs[0], g)
