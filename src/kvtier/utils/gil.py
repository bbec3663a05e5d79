"""The GIL's switch interval for processes whose threads hand work to each other.

A thread that wakes with something to do (a command read from a pipe, a step's outputs to
dispatch, a finished tier copy) must take the GIL from a thread that is running Python. At
Python's default 5 ms switch interval it waits up to that long for each acquisition, and
reading one pickled command off a pipe takes two (after the length header, after the body):
~9 ms of delivery against a busy engine loop, measured, for every request. At 0.5 ms a
hand-over costs at most about a millisecond, and a thread that wants nothing costs nothing:
the running thread is only asked to drop the GIL when another one waits for it.
"""

from __future__ import annotations

import sys

SWITCH_INTERVAL_S = 0.0005


def shorten_switch_interval() -> None:
    """Set this process's switch interval to SWITCH_INTERVAL_S."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
