"""HostCounters measure what the host did to this process between two snapshots."""

from __future__ import annotations

import mmap
import sys
import time

import pytest

from kvtier.utils.host_counters import HostCounters


def test_busy_loop_counts_as_cpu_time_and_a_difference_is_non_negative() -> None:
    before = HostCounters.snapshot()
    deadline = time.perf_counter() + 0.2
    while time.perf_counter() < deadline:
        pass
    counts = HostCounters.snapshot().since(before)
    assert counts.wall_s >= 0.2
    assert counts.user_s + counts.system_s >= 0.1  # the loop ran on a CPU, not asleep
    assert counts.minor_faults >= 0 and counts.involuntary_switches >= 0
    summary = counts.summary()
    assert 0.5 <= summary["cpu_share"] <= 1.5


def test_sleeping_takes_no_cpu() -> None:
    before = HostCounters.snapshot()
    time.sleep(0.2)
    assert HostCounters.snapshot().since(before).summary()["cpu_share"] < 0.25


def test_touching_fresh_memory_counts_minor_faults() -> None:
    size = 64 << 20
    # A fresh anonymous mapping: the allocator could hand back pages already touched.
    with mmap.mmap(-1, size) as block:
        before = HostCounters.snapshot()
        block[::4096] = b"\x01" * (size // 4096)  # a write to every page
        counts = HostCounters.snapshot().since(before)
    assert counts.minor_faults >= size // 4096 // 4  # huge pages would take fewer faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_steal_time_is_read_on_linux() -> None:
    before = HostCounters.snapshot()
    assert before.steal_s is not None and before.steal_s >= 0
    share = HostCounters.snapshot().since(before).summary()["steal_share"]
    assert share is not None and share >= 0
