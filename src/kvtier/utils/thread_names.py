"""The OS sees Python's thread names (Linux), so per-thread tools can tell the threads apart.

Python 3.12 leaves every thread's kernel name (`comm`) as the process's, `python3`, so
`top -H`, `py-spy dump --native`, `perf` and the lab's per-thread CPU record
(`host_counters.ProcessTreeCPU`) show a server's front end as several `python3` threads
with no way to tell the event loop from the thread that dispatches the engine's outputs.
`name_os_threads` names the calling thread, and every thread the `threading` module
starts afterwards, after its Python name (cut to the kernel's 15 bytes): `kvtier-engine-u`
for `kvtier-engine-updates`, `kvtier-store_0` for a tier's store worker.

The hook is `threading.setprofile`: the profile function runs once in each new thread,
before its target, names it and removes itself, so the thread runs unprofiled afterwards.
It replaces any profile function set through `threading.setprofile` earlier, so only the
processes kvtier starts call it (the engine process, the server's front ends), not the
library's users. Elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from types import FrameType
from typing import Any

_PR_SET_NAME = 15
_COMM_BYTES = 15
"""The kernel's limit, without the terminating NUL (TASK_COMM_LEN 16)."""


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def set_os_thread_name(name: str) -> bool:
    """Name the calling thread for the kernel (its first 15 bytes of UTF-8, cut at a
    character boundary); whether that worked."""
    if _LIBC is None:
        return False
    raw = name.encode("utf-8")[:_COMM_BYTES]
    raw = raw.decode("utf-8", errors="ignore").encode("utf-8")
    return _LIBC.prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0


def _name_then_leave(frame: FrameType, event: str, arg: Any) -> None:
    sys.setprofile(None)
    set_os_thread_name(threading.current_thread().name)


def name_os_threads(main_name: str) -> None:
    """Name the calling thread `main_name`, and every thread started from now on after its
    Python name."""
    if _LIBC is None:
        return
    set_os_thread_name(main_name)
    threading.setprofile(_name_then_leave)
