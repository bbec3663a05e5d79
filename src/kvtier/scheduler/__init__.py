"""Continuous batching: which requests run each step, and how many tokens each computes."""

from kvtier.scheduler.scheduler import Scheduler

__all__ = ["Scheduler"]
