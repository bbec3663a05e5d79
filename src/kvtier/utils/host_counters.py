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
