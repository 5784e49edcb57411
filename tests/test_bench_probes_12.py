"""The twelfth session's bench probes, on CPU: codegen_dump.py's reading of Inductor's generated code (which kernel
a launch runs, and the comment Inductor writes above its definition), and grads_loop_probe.py's row-looping grads
kernel against the explicit formulas in Triton's interpreter (fp32, ragged rows, columns and ranks)."""

from __future__ import annotations

import pytest
import torch
from conftest import bench_module

_CODE = '''
# kernel path: /tmp/x.py
# Topologically Sorted Source Nodes: [permute_79, clone_10], Original ATen: [aten.transpose, aten.clone]
# Source node to ATen node mapping:
#   clone_10 => clone_10
triton_poi_fused_clone_transpose_9 = async_compile.triton('triton_poi_fused_clone_transpose_9', \'\'\'
\'\'\', device_str='cuda')

triton_poi_fused_zeros_2 = async_compile.triton('triton_poi_fused_zeros_2', \'\'\'
\'\'\', device_str='cuda')

def call(args):
    triton_poi_fused_zeros_2.run(buf5, 163936, stream=stream0)
    triton_poi_fused_clone_transpose_9.run(buf44, buf45, 16777216, stream=stream0)
    _grads_kernel_0.run(buf4, stream=stream0)
    triton_poi_fused_clone_transpose_9.run(buf98, buf101, 16777216, stream=stream0)
'''


def test_codegen_dump_maps_launches_to_their_origins() -> None:
    probe = bench_module("codegen_dump")
    assert probe.launched(_CODE) == ["triton_poi_fused_zeros_2", "triton_poi_fused_clone_transpose_9",
                                     "triton_poi_fused_clone_transpose_9"]  # user kernels (_grads_kernel) are not
    origins = probe.kernel_origins(_CODE)
    assert origins["triton_poi_fused_zeros_2"] == ""
    assert origins["triton_poi_fused_clone_transpose_9"].startswith(
        "Topologically Sorted Source Nodes: [permute_79, clone_10], Original ATen: [aten.transpose, aten.clone]")
    assert "kernel path" not in origins["triton_poi_fused_clone_transpose_9"]


@pytest.mark.parametrize(("n", "d", "r", "rows", "bn", "bd"), [(96, 80, 8, 32, 16, 32), (150, 70, 5, 64, 16, 64),
                                                                (40, 300, 16, 64, 32, 128)])
def test_loop_grads_kernel_matches_the_formulas(n: int, d: int, r: int, rows: int, bn: int, bd: int) -> None:
    """gaᵀ = s·(g·B)ᵀ and dB = s·gᵀ·xa: rows and columns not multiples of the tiles, several row programs adding into
    one dB block, several column programs into one gaᵀ block, a rank below the 16-wide rank block."""
    pytest.importorskip("triton")
    probe = bench_module("grads_loop_probe")
    gen = torch.Generator().manual_seed(n)
    g, b, xa = torch.randn(n, d, generator=gen), torch.randn(d, r, generator=gen), torch.randn(n, r, generator=gen)
    ga_t, db = probe.loop_grads(g, b, xa, 0.5, rows, bn, bd)
    torch.testing.assert_close(ga_t.double(), 0.5 * (g.double() @ b.double()).t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db.double(), 0.5 * g.double().t() @ xa.double(), rtol=1e-5, atol=1e-4)
