"""bench/fusion_probe.py's filter: which generated kernels launched in a compiled graph's code only transpose-copy a
tensor (named after clone and transpose and nothing else), from launch lines as Inductor writes them."""

from __future__ import annotations

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
