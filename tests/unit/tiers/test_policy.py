"""Eviction policies: LRU order, and S3-FIFO's resistance to one-off scans."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.tiers.policy import LRUPolicy, S3FIFOPolicy, create_policy


def always(_: object) -> bool:
    return True


def test_lru_evicts_least_recently_used_and_skips_unevictable() -> None:
    policy = LRUPolicy()
    for key in "abc":
        policy.insert(key)
    policy.access("a")
    assert policy.victim(always) == "b"
    assert policy.victim(lambda k: k != "b") == "c"
    policy.remove("b")
    assert policy.victim(always) == "c" and len(policy) == 2


def simulate(policy_name: str, capacity: int, trace: list[str]) -> int:
    """Replay a trace against a cache of `capacity` keys; returns the number of hits."""
    policy = create_policy(policy_name)
    cached: set[str] = set()
    hits = 0
    for key in trace:
        if key in cached:
            hits += 1
            policy.access(key)
            continue
        if len(cached) >= capacity:
            victim = policy.victim(always)
            assert victim is not None
            policy.remove(victim)
            cached.discard(victim)
        policy.insert(key)
        cached.add(key)
    return hits


def test_s3fifo_keeps_the_hot_set_through_a_scan_that_flushes_lru() -> None:
    hot = [f"hot{i}" for i in range(8)]
    trace = hot * 3
    for round_ in range(10):
        trace += [f"scan{round_}-{i}" for i in range(12)] + hot
    lru_hits = simulate("lru", 16, trace)
    s3_hits = simulate("s3fifo", 16, trace)
    assert s3_hits > lru_hits
    assert s3_hits >= 8 * 10  # every hot key hit after each scan


@given(st.lists(st.integers(0, 30), max_size=300), st.integers(1, 10))
def test_s3fifo_victim_is_always_a_live_key(trace: list[int], capacity: int) -> None:
    policy = S3FIFOPolicy()
    live: set[int] = set()
    for key in trace:
        if key in live:
            policy.access(key)
            continue
        if len(live) >= capacity:
            victim = policy.victim(always)
            assert victim in live
            policy.remove(victim)
            live.discard(victim)
        policy.insert(key)
        live.add(key)
        assert len(policy) == len(live)


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        create_policy("mru")


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_inserting_a_tracked_key_again_keeps_one_copy(name: str) -> None:
    """A second insert of a key is an access. S3-FIFO used to queue it in small as well as
    main, so removing it left a stale copy behind that could be named as a victim."""
    policy = create_policy(name)
    for key in range(20):
        policy.insert(key)
    for _ in range(3):  # key 0 moves to main under s3fifo
        policy.access(0)
    assert policy.victim(lambda key: key < 2) is not None
    policy.insert(0)
    policy.remove(0)
    live = set(range(1, 20))
    while (victim := policy.victim(lambda key: key in live)) is not None:
        assert victim in live
        live.discard(victim)
        policy.remove(victim)
    assert not live
    assert policy.victim(lambda key: True) is None
