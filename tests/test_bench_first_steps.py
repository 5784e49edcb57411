"""bench/first_steps.py on CPU: its garbage-collection clock and its summary of slow first steps."""

from __future__ import annotations

import gc

from conftest import bench_module


def test_gc_clock_sees_a_full_collection():
    probe = bench_module("first_steps")
    clock = probe.GcClock()
    try:
        clock.take()
        gc.collect()
        got = clock.take()
        assert got["gen2"][0] == 1 and got["gen2"][1] >= 0
        assert clock.take() == {}, "take() empties the log"
    finally:
        clock.close()
    assert clock._callback not in gc.callbacks


def test_summary_counts_the_slow_steps_before_the_steady_state():
    probe = bench_module("first_steps")
    times = [900.0, 91.0, 88.0, 76.0, 79.5, 75.0] + [75.0, 76.0, 74.0, 75.5] * 3  # steady median 75.0–75.5
    rows = [dict(step=i, step_ms=t, gc={"gen2": (1, 5.0)} if i == 2 else {}) for i, t in enumerate(times)]
    s = probe.summary(rows, tail=10)
    assert s["steady_ms"] == 75.25
    assert s["slow_step_indices"] == [1, 2, 4] and s["slow_steps"] == 3, "step 0 (compile) is not counted"
    assert s["gc_ms_in_slow_steps"] == 5.0 and s["gc_ms_in_all_steps"] == 5.0
