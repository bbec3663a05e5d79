"""HostCounters measure what the host did to this process between two snapshots."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtier.utils.host_counters import HostCounters, ProcessTreeCPU


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


SPIN_THEN_SLEEP = """
import subprocess, sys, time
def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
if sys.argv[1] == "parent":
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "child", sys.argv[2]])
    spin(0.3)
    print("spun", flush=True)
    child.wait()
else:
    spin(0.9)
    print("spun", flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_process_tree_cpu_splits_the_servers_time_from_its_childrens() -> None:
    """The lab's record of which process of a server (front end or engine) used the CPU: a
    parent that burns 0.3 s of CPU and a child that burns 0.9 s, snapshotted before and after,
    come out per role with the child's thread the busiest."""
    parent = subprocess.Popen([sys.executable, "-c", SPIN_THEN_SLEEP, "parent", SPIN_THEN_SLEEP],
                              stdout=subprocess.PIPE, text=True)
    after = None
    try:
        before = ProcessTreeCPU.snapshot(parent.pid)
        assert before is not None
        assert parent.stdout is not None
        assert [parent.stdout.readline() for _ in range(2)] == ["spun\n", "spun\n"]
        after = ProcessTreeCPU.snapshot(parent.pid)
        assert after is not None
        used = after.since(before)
    finally:
        children = {pid for pid, _ in after.threads} - {parent.pid} if after else set()
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
    cpu = used["cpu_s"]
    assert len(children) == 1
    child_role = f"child {children.pop()}"
    assert set(cpu) == {"server", child_role}
    # Interpreter start-up adds some time to each; the spins bound them from below.
    assert 0.25 <= cpu["server"] < 0.8
    assert 0.85 <= cpu[child_role] < 1.6
    assert used["busiest_threads"][0][0] == child_role
    assert ProcessTreeCPU.snapshot(2**22 + 12345) is None  # no such process
