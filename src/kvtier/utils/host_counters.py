"""What the host did to a process while it ran: CPU time, page faults, preemptions and the
hypervisor's steal time.

On a virtual machine the same engine process can run twice as slow as its twin for reasons
no timer inside it shows: the hypervisor ran other guests on its cores (steal time), or the
guest's memory was still being backed on first touch (minor faults). Benchmarks snapshot
these around a measured part and report the difference next to their timings, so a slow run
says whether the machine was the cause.

Linux only for steal time (`/proc/stat`); elsewhere it reads as None.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

_PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class HostCounters:
    wall_s: float
    user_s: float
    system_s: float
    minor_faults: int
    major_faults: int
    involuntary_switches: int
    steal_s: float | None
    """The whole machine's steal time summed over its CPUs (`/proc/stat`), or None where the
    kernel does not report it."""

    @classmethod
    def snapshot(cls) -> HostCounters:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(wall_s=time.perf_counter(), user_s=usage.ru_utime, system_s=usage.ru_stime,
                   minor_faults=usage.ru_minflt, major_faults=usage.ru_majflt,
                   involuntary_switches=usage.ru_nivcsw, steal_s=_steal_seconds())

    def since(self, earlier: HostCounters) -> HostCounters:
        """The counts between `earlier` and this snapshot."""
        steal = (None if self.steal_s is None or earlier.steal_s is None
                 else self.steal_s - earlier.steal_s)
        return HostCounters(
            wall_s=self.wall_s - earlier.wall_s, user_s=self.user_s - earlier.user_s,
            system_s=self.system_s - earlier.system_s,
            minor_faults=self.minor_faults - earlier.minor_faults,
            major_faults=self.major_faults - earlier.major_faults,
            involuntary_switches=self.involuntary_switches - earlier.involuntary_switches,
            steal_s=steal)

    def summary(self) -> dict[str, float | int | None]:
        """A difference as a results-file record, with CPU and steal shares of the wall time
        (steal as a share of all the machine's CPUs)."""
        wall = max(self.wall_s, 1e-9)
        cpus = os.cpu_count() or 1
        return {
            "wall_s": round(self.wall_s, 3),
            "cpu_share": round((self.user_s + self.system_s) / wall, 3),
            "system_s": round(self.system_s, 3),
            "minor_faults": self.minor_faults, "major_faults": self.major_faults,
            "involuntary_switches": self.involuntary_switches,
            "steal_share": None if self.steal_s is None else round(self.steal_s / wall / cpus, 4),
        }


def _steal_seconds() -> float | None:
    """Steal ticks of the aggregate `cpu` line of /proc/stat (its eighth value), in seconds."""
    try:
        first = _PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if len(first) < 9 or first[0] != "cpu":
        return None
    return int(first[8]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ThreadCPU:
    """One thread of a process tree and the CPU seconds (user + system) it had used."""

    role: str
    """`server` (the tree's root: `kvtier serve`'s front end, or its supervisor) or
    `child <pid>` (an engine process, another front end)."""
    name: str
    """The thread's `comm` (Python threads keep the process's name; CUDA's and the
    tokenizer's pools have their own)."""
    cpu_s: float


@dataclass(frozen=True)
class ProcessTreeCPU:
    """CPU time of a process and its descendants, per thread (Linux `/proc`), so that a run
    can say which process (front end or engine) and which of its threads took the host's
    CPU. Threads and processes that ended between two snapshots are not counted."""

    threads: dict[tuple[int, int], ThreadCPU]
    """(pid, tid) -> the thread's CPU so far."""

    @classmethod
    def snapshot(cls, root_pid: int) -> ProcessTreeCPU | None:
        """None off Linux or when the process is gone."""
        parents = _parent_pids()
        if root_pid not in parents:
            return None
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        tree, frontier = {root_pid: "server"}, [root_pid]
        while frontier:
            for pid in children.get(frontier.pop(), ()):
                tree[pid] = f"child {pid}"
                frontier.append(pid)
        ticks = os.sysconf("SC_CLK_TCK")
        threads = {}
        for pid, role in tree.items():
            with_tasks = Path(f"/proc/{pid}/task")
            try:
                tids = [int(t.name) for t in with_tasks.iterdir()]
            except OSError:
                continue  # ended meanwhile
            for tid in tids:
                stat = _read_stat(with_tasks / str(tid) / "stat")
                if stat is not None:
                    name, fields = stat
                    # After the name: state is field 3, utime 14 and stime 15 (proc(5)).
                    threads[(pid, tid)] = ThreadCPU(
                        role, name, (int(fields[11]) + int(fields[12])) / ticks)
        return cls(threads)

    def since(self, earlier: ProcessTreeCPU) -> dict[str, object]:
        """CPU seconds used between the snapshots: per role, and the busiest threads."""
        used: dict[tuple[int, int], ThreadCPU] = {}
        for key, thread in self.threads.items():
            before = earlier.threads.get(key)
            # A thread first seen now started meanwhile: all its time is new.
            used[key] = ThreadCPU(thread.role, thread.name,
                                  thread.cpu_s - (before.cpu_s if before else 0.0))
        per_role: dict[str, float] = {}
        for thread in used.values():
            per_role[thread.role] = per_role.get(thread.role, 0.0) + thread.cpu_s
        busiest = sorted(used.values(), key=lambda t: -t.cpu_s)[:BUSIEST_THREADS]
        return {"cpu_s": {role: round(s, 2) for role, s in sorted(per_role.items())},
                "busiest_threads": [[t.role, t.name, round(t.cpu_s, 2)] for t in busiest
                                    if t.cpu_s > 0]}


BUSIEST_THREADS = 6


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process in /proc ({} off Linux)."""
    parents = {}
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return {}
    for entry in entries:
        if entry.name.isdigit():
            stat = _read_stat(entry / "stat")
            if stat is not None:
                parents[int(entry.name)] = int(stat[1][1])
    return parents


def _read_stat(path: Path) -> tuple[str, list[str]] | None:
    """A `stat` file's name (between the parentheses, which may hold spaces) and the fields
    after it (state first); None when unreadable (the process or thread ended)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    open_at, close_at = text.find("("), text.rfind(")")
    if open_at < 0 or close_at < open_at:
        return None
    return text[open_at + 1:close_at], text[close_at + 2:].split()
