"""Keep freed host memory for reuse instead of returning it to the OS (glibc's malloc).

A forward pass on the CPU allocates and frees activations of a few MB each, op after op.
glibc serves blocks above its mmap threshold with a fresh mapping and unmaps them on free,
and trims the heap's free top back to the OS: every activation then page-faults its memory
in again. On this repo's 2-core VM a batch of 32 prefills (8,192 tokens, SmolLM2, float32)
took 810,000 minor faults and 1.3 s of system time, 6.2 s in all; with the settings below
34,000 faults, 0.07 s and 5.2 s. vLLM's CPU backend gets the same from preloading tcmalloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from the heap (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD = (1 << 31) - 1
"""Free memory at the heap's top is handed back only past this (its largest value)."""


def keep_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process; False where the C
    library is not glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        logger.debug("mallopt refused the thresholds; freed memory goes back to the OS")
    return done
