"""The GIL's switch interval for processes whose threads hand work to each other.

A thread that wakes with something to do (a command read from a pipe, a step's outputs to
dispatch, a finished tier copy) must take the GIL from a thread that is running Python. At
Python's default 5 ms switch interval it waits up to that long for each acquisition, and
reading one pickled command off a pipe takes two (after the length header, after the body).
Against a thread looping in pure Python, a command took ~9 ms to arrive at 5 ms and ~1 ms at
0.5 ms (a two-process probe on the 2-core CI box). The engine's loop spends much of a step in
torch calls, which release the GIL, so on an H200 host the server's front-end share did not
move measurably (BENCHMARKS.md, twenty-third session); the short interval bounds the worst
case. A thread that wants nothing costs nothing: the running thread is only asked to drop the
GIL when another one waits for it.
"""

from __future__ import annotations

import sys

SWITCH_INTERVAL_S = 0.0005


def shorten_switch_interval() -> None:
    """Set this process's switch interval to SWITCH_INTERVAL_S."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
