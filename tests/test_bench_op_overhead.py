"""bench/op_overhead.py: both registrations of the probe op dispatch to the same body with the op's schema (the
prepared outputs come back as they are), and a measurement reports one host time per registration."""

from __future__ import annotations

import torch
from conftest import bench_module


def test_both_registrations_reach_the_body_and_are_timed() -> None:
    probe = bench_module("op_overhead")
    decorated, plain = probe._register()
    assert probe._register() == (decorated, plain)  # registered once per process
    args = ([torch.ones(2, 3), None], [torch.ones(3, 4)], [torch.ones(3, 1)], torch.ones(2, 4), torch.ones(1, 4),
            [1.0], [1], True, False, False)
    for op in (decorated, plain):
        probe._OUT[:] = [torch.zeros(1), torch.zeros(2), torch.zeros(3)]
        outs = op(*args)
        assert [o.numel() for o in outs] == [1, 2, 3]
        assert all(o is p for o, p in zip(outs, probe._OUT))
    row = probe.measure(calls=20, repeats=1)
    assert set(row) == {"custom_op_us", "library_us", "calls", "torch"} and row["calls"] == 20
    assert all(isinstance(row[k], float) for k in ("custom_op_us", "library_us"))
