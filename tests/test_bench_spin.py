"""bench/spin_probe.py on CPU: the busy-wait it adds per op call, the back-and-forth order of its conditions, the
per-condition medians, and the CPU squeeze (threads pinned beside busy loops, undone afterwards)."""

from __future__ import annotations

import os
import time

import pytest
from conftest import bench_module


def test_spin_wrapper_adds_host_time_and_passes_results_through() -> None:
    probe = bench_module("spin_probe")
    level = [0.0]
    wrapped = probe.spin_wrapper(lambda a, b=1: (a, b), level)
    assert wrapped(3, b=4) == (3, 4)
    level[0] = 20_000.0  # 20 ms
    t0 = time.perf_counter()
    assert wrapped(5) == (5, 1)
    assert time.perf_counter() - t0 >= 0.02


def test_conditions_go_up_and_back_and_summaries_are_per_condition() -> None:
    probe = bench_module("spin_probe")
    assert probe.order([0, 1, 2], 2) == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]
    rounds = [dict(spin_us=0.0, squeeze=None, calls_per_step=64, lora=76.0, floor=69.0),
              dict(spin_us=400.0, squeeze=None, calls_per_step=64, lora=80.0, floor=70.0),
              dict(spin_us=400.0, squeeze=None, calls_per_step=64, lora=90.0, floor=70.0),
              dict(spin_us=0.0, squeeze="2:2", calls_per_step=64, lora=120.0, floor=80.0),
              dict(spin_us=0.0, squeeze=None, calls_per_step=64, lora=74.0, floor=69.0)]
    got = {(s["spin_us"], s["squeeze"]): s for s in probe.summarize(rounds)}
    assert set(got) == {(0.0, None), (400.0, None), (0.0, "2:2")}
    assert got[(0.0, None)]["lora_ms"] == 75.0 and got[(0.0, None)]["ratios"] == [round(76 / 69, 4), round(74 / 69, 4)]
    assert got[(400.0, None)]["per_step_ms"] == 25.6 and got[(400.0, None)]["median_ratio"] == round(85 / 70, 4)
    assert got[(0.0, "2:2")]["median_ratio"] == 1.5


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux CPU affinity")
def test_squeeze_pins_every_thread_beside_hogs_and_undoes_it() -> None:
    probe = bench_module("spin_probe")
    before = os.sched_getaffinity(0)
    with probe.squeezed(None):
        assert os.sched_getaffinity(0) == before
    with probe.squeezed("1:1"):
        assert os.sched_getaffinity(0) == {min(before)}
        assert all(os.sched_getaffinity(int(t)) == {min(before)} for t in os.listdir("/proc/self/task"))
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == os.getpid()]
        assert len(children) == 1
    assert os.sched_getaffinity(0) == before
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == os.getpid()]


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
