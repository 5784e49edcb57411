"""bench/idle_probe.py's trace accounting, on a synthetic chrome trace: which part of each gap between kernels the
host caused (the next kernel's launch call began after the previous kernel ended) and which the device did."""

from __future__ import annotations

import pytest
from conftest import bench_module


def _ev(cat, name, ts, dur, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_gaps_split_into_host_late_and_device():
    events = [
        _ev("user_annotation", "step", 0, 1000),
        _ev("user_annotation", "fwd", 0, 400), _ev("user_annotation", "bwd", 400, 500),
        _ev("cpu_op", "aten::mm", 90, 20), _ev("cpu_op", "slow_python_op", 300, 200),
        # k1 launched at 100, runs 110-210; k2 launched at 150 (early), runs 215-300: a 5 µs device gap
        _ev("cuda_runtime", "cudaLaunchKernel", 100, 5, corr=1), _ev("kernel", "k1", 110, 100, corr=1),
        _ev("cuda_runtime", "cudaLaunchKernel", 150, 5, corr=2), _ev("kernel", "k2", 215, 85, corr=2),
        # k3 launched at 450 (150 µs after k2 ended at 300), runs 460-600: 150 host-late, 10 device, in bwd
        _ev("cuda_driver", "cuLaunchKernelEx", 450, 5, corr=3), _ev("kernel", "k3", 460, 140, corr=3),
        # a memset overlapping nothing, launched early: 20 µs device gap
        _ev("cuda_runtime", "cudaMemsetAsync", 455, 3, corr=4), _ev("gpu_memset", "Memset", 620, 30, corr=4),
    ]
    r = bench_module("idle_probe").analyse(events)
    assert r["step_ms"] == pytest.approx(1.0)
    assert r["busy_ms"] == pytest.approx((100 + 85 + 140 + 30) / 1e3)
    assert r["lead_ms"] == pytest.approx(0.110)
    assert r["tail_ms"] == pytest.approx((1000 - 650) / 1e3)
    assert r["host_late_ms"] == pytest.approx(0.150)
    assert r["host_late_by_phase"]["bwd"] == pytest.approx(0.150)
    assert r["device_gap_ms"] == pytest.approx((5 + 10 + 20) / 1e3)
    assert r["worst_late"][0]["next"] == "k3" and r["worst_late"][0]["host_op"] == "slow_python_op"
    # every microsecond of the step is accounted for exactly once
    parts = r["lead_ms"] + r["busy_ms"] + r["host_late_ms"] + r["device_gap_ms"] + r["tail_ms"]
    assert parts == pytest.approx(r["step_ms"])


def test_overlapping_device_events_count_once():
    events = [_ev("user_annotation", "step", 0, 100),
              _ev("cuda_runtime", "cudaLaunchKernel", 0, 1, corr=1), _ev("kernel", "a", 10, 50, corr=1),
              _ev("cuda_runtime", "cudaLaunchKernel", 1, 1, corr=2), _ev("kernel", "b", 30, 40, corr=2)]
    r = bench_module("idle_probe").analyse(events)
    assert r["busy_ms"] == pytest.approx(0.060)
    assert r["host_late_ms"] == 0 and r["device_gap_ms"] == 0


def test_a_step_without_kernels_is_an_error():
    with pytest.raises(ValueError, match="no kernels"):
        bench_module("idle_probe").analyse([_ev("user_annotation", "step", 0, 10)])


def test_kernel_table_and_lead_ops():
    events = [_ev("user_annotation", "step", 0, 100),
              _ev("cpu_op", "guards", 2, 20), _ev("cpu_op", "late_op", 50, 5),
              _ev("cuda_runtime", "cudaLaunchKernel", 30, 1, corr=1), _ev("kernel", "a", 40, 10, corr=1),
              _ev("cuda_runtime", "cudaLaunchKernel", 31, 1, corr=2), _ev("kernel", "a", 60, 20, corr=2),
              _ev("cuda_runtime", "cudaLaunchKernel", 32, 1, corr=3), _ev("kernel", "b", 85, 5, corr=3)]
    r = bench_module("idle_probe").analyse(events)
    assert r["kernels"][0] == {"name": "a", "ms": 0.03, "calls": 2}
    assert r["kernels"][1] == {"name": "b", "ms": 0.005, "calls": 1}
    assert [o["op"] for o in r["lead_ops"]] == ["guards"]
