"""The redis tier against a real redis-server: replicas share entries and one capacity, a new
store finds what earlier ones left, and every fault (an entry another replica evicted, a
damaged value, a server that goes away or was never there) is a clean miss."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest
import redis
import torch

from kvtier.config import ConfigError, TierSpec
from kvtier.tiers import entry_codec
from kvtier.tiers.base import TierError
from kvtier.tiers.redis_store import RedisStore, redacted
from kvtier.utils.redis_server import RedisServer
from tests.unit.tiers.test_stores import LAYOUT, make_meta, payload_for, put, redis_store


def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def replicas(redis_server: RedisServer) -> list[RedisStore]:
    """Two stores on one server: two engine replicas' redis tiers."""
    stores = [redis_store(redis_server.url, 4) for _ in range(2)]
    yield stores
    for store in stores:
        store.close()


def raw_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def test_an_entry_one_replica_stores_is_found_and_read_by_the_other(
        replicas: list[RedisStore]) -> None:
    first, second = replicas
    meta = make_meta(1)
    assert put(first, meta)
    assert eventually(lambda: second.has(meta.key)), "the event never reached the other"
    assert second.locate(meta.block_hashes[0]) == (meta, 0)
    assert second.pin(meta.key)
    assert torch.equal(second.read(meta), payload_for(meta))
    second.unpin(meta.key)
    # Storing what the store already holds is not a second copy.
    assert second.prepare_store(meta) is None
    first.remove(meta.key)
    assert eventually(lambda: not second.has(meta.key)), "the removal never reached the other"
    for store in replicas:
        store.check_integrity()


def test_a_new_store_finds_the_entries_earlier_ones_left_in_store_order(
        redis_server: RedisServer) -> None:
    earlier = redis_store(redis_server.url, 4)
    metas = [make_meta(seed) for seed in (3, 1, 2)]
    for meta in metas:
        assert put(earlier, meta)
    earlier.close()
    restarted = redis_store(redis_server.url, 4)
    try:
        for meta in metas:
            assert restarted.locate(meta.block_hashes[-1]) == (meta, len(meta.block_hashes) - 1)
        assert torch.equal(restarted.read(metas[1]), payload_for(metas[1]))
        # LRU over store order: the oldest (first stored, never read here) goes first.
        assert put(restarted, make_meta(4)) and put(restarted, make_meta(5))
        assert not restarted.has(metas[0].key) and restarted.has(metas[1].key)
        restarted.check_integrity()
    finally:
        restarted.close()


def test_a_new_store_adopts_many_entries_in_batches_and_skips_foreign_fields(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvtier.tiers.redis_store.RESYNC_BATCH", 2)
    earlier = redis_store(redis_server.url, 8)
    metas = [make_meta(seed) for seed in range(5)]
    for meta in metas:
        assert put(earlier, meta)
    client = raw_client(redis_server)
    client.hset(earlier._index_key, "not-a-key", "{}")  # a field no replica wrote
    client.hset(earlier._index_key, "ab" * 16, "not json")
    earlier.close()
    later = redis_store(redis_server.url, 8)
    try:
        assert not later.broken
        assert sorted(m.key for m in later.ready_entries()) == sorted(m.key for m in metas)
    finally:
        later.close()


@pytest.mark.parametrize("record", ["[1]", "null", "3", '"text"'])
def test_an_index_record_that_is_no_object_is_skipped_at_start_and_in_a_resync(
        redis_server: RedisServer, record: str) -> None:
    """A record of valid JSON that is no object (a foreign writer, another version). Before,
    its AttributeError escaped the start (the engine did not start) and, met by a resync,
    ended the replica's event thread for good, silently."""
    earlier = redis_store(redis_server.url, 8)
    kept = make_meta(1)
    assert put(earlier, kept)
    client = raw_client(redis_server)
    client.hset(earlier._index_key, make_meta(2).key.hex(), record)
    later = redis_store(redis_server.url, 8, resync_s=0.1)
    try:
        assert not later.broken
        assert [m.key for m in later.ready_entries()] == [kept.key]
        client.hset(earlier._index_key, make_meta(3).key.hex(), record)  # met by a resync
        time.sleep(0.5)
        assert later._listener is not None and later._listener.is_alive()
        added = make_meta(4)
        assert put(earlier, added)
        assert eventually(lambda: later.has(added.key))  # still following the others
    finally:
        later.close()
        earlier.close()


def test_replicas_storing_at_once_never_exceed_the_shared_capacity(
        redis_server: RedisServer) -> None:
    """Each replica alone would fit 4 entries in its view; together they must share 4."""
    stores = [redis_store(redis_server.url, 4) for _ in range(3)]
    stored = [0] * len(stores)

    def fill(index: int) -> None:
        for seed in range(index * 100, index * 100 + 12):
            stored[index] += put(stores[index], make_meta(seed))

    threads = [threading.Thread(target=fill, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert sum(stored) >= 12, "the replicas should mostly evict, not refuse"
        client = raw_client(redis_server)
        records = [json.loads(r) for r in client.hgetall(stores[0]._index_key).values()]
        per_entry = entry_codec.encoded_bytes(make_meta(0), LAYOUT.namespace)
        assert len(records) <= 4
        assert int(client.get(stores[0]._used_key)) == len(records) * per_entry
        assert len(client.keys(f"{stores[0]._entry_prefix}*")) == len(records)
        # Published, refused for room or beaten by another replica: no staged value stays.
        assert not client.keys(f"{stores[0]._staged_prefix}*")
        for store in stores:
            store.check_integrity()  # shared used == the records', within capacity
            assert eventually(lambda s=store: {m.key.hex() for m in s.ready_entries()}
                              == {r["key"] for r in records}), "a replica's index drifted"
    finally:
        for store in stores:
            store.close()


def test_an_entry_another_replica_evicted_is_a_miss(replicas: list[RedisStore]) -> None:
    first, second = replicas
    meta = make_meta(1)
    assert put(first, meta) and eventually(lambda: second.has(meta.key))
    assert second.pin(meta.key)  # a load planned here, while the other evicts the entry
    first.remove(meta.key)
    first.check_integrity()  # the removal has run
    with pytest.raises(TierError, match="no longer in the store"):
        second.read(meta)
    second.unpin(meta.key)
    assert not second.has(meta.key) and second.stats.num_errors == 1
    for store in replicas:
        store.check_integrity()


def test_a_value_redis_lost_on_its_own_is_removed_with_its_record(
        replicas: list[RedisStore], redis_server: RedisServer) -> None:
    """Redis evicting by maxmemory (or a flush of the values) leaves the index record: the
    read that finds the value gone removes the record and its charge, for every replica,
    or the capacity would count it for good."""
    first, second = replicas
    meta = make_meta(1)
    assert put(first, meta) and eventually(lambda: second.has(meta.key))
    client = raw_client(redis_server)
    client.delete(first._entry_key(meta.key))
    assert second.pin(meta.key)
    with pytest.raises(TierError, match="no longer in the store"):
        second.read(meta)
    second.unpin(meta.key)
    second.check_integrity()  # the removal has run; shared used == the records'
    assert client.hlen(first._index_key) == 0 and int(client.get(first._used_key)) == 0
    assert eventually(lambda: not first.has(meta.key)), "the other replica kept the entry"


@pytest.mark.parametrize("damage", ["bit-flip", "truncated", "foreign", "garbage"])
def test_a_damaged_value_is_a_miss_that_removes_it_for_every_replica(
        damage: str, replicas: list[RedisStore], redis_server: RedisServer) -> None:
    first, second = replicas
    meta, other = make_meta(1), make_meta(2)
    assert put(first, meta) and put(first, other)
    assert eventually(lambda: second.has(meta.key))
    client = raw_client(redis_server)
    key = first._entry_key(meta.key)
    blob = bytearray(client.get(key))
    if damage == "bit-flip":
        blob[-1] ^= 0x40
    elif damage == "truncated":
        del blob[-3:]
    elif damage == "foreign":  # another entry's bytes under this key
        blob = bytearray(client.get(first._entry_key(other.key)))
    else:
        blob = bytearray(b"not an entry")
    client.set(key, bytes(blob))
    assert second.pin(meta.key)
    with pytest.raises(TierError):
        second.read(meta)
    second.unpin(meta.key)
    assert second.stats.num_errors == 1
    assert eventually(lambda: not first.has(meta.key)), "the damaged entry stayed shared"
    assert client.get(key) is None
    for store in replicas:
        store.check_integrity()


def test_a_server_that_goes_away_costs_misses_not_crashes(redis_server: RedisServer) -> None:
    store = redis_store(redis_server.url, 4, socket_timeout_s=1.0)
    try:
        meta = make_meta(1)
        assert put(store, meta)
        redis_server.stop()
        assert store.pin(meta.key)
        with pytest.raises(TierError):
            store.read(meta)
        store.unpin(meta.key)
        assert not store.has(meta.key)
        put(store, make_meta(2))  # prepared locally; publishing fails and drops it
        assert not store.has(make_meta(2).key) and store.num_entries == 0
        assert store.stats.num_errors >= 2
    finally:
        store.close()


def test_an_unreachable_server_disables_the_tier_at_start(tmp_path) -> None:  # noqa: ANN001
    store = redis_store(f"unix://{tmp_path}/no-such.sock", 4)
    try:
        assert store.broken and "no-such.sock" in store.broken
        assert store.prepare_store(make_meta(1)) is None
        assert store.stats.num_rejected == 1 and store.stats.num_errors == 1
        assert store.probe(payload_for(make_meta(1))).latency_s >= 1.0  # never pays
        store.check_integrity()
    finally:
        store.close()


def test_a_start_that_fails_after_connecting_closes_its_connections(
        redis_server: RedisServer) -> None:
    """The server answers, but reading the shared index fails (here a key of the wrong
    type under the index's name): the tier is disabled, and the connections it opened
    (its client's, the event subscription's) are closed. Before, they stayed open."""
    client = raw_client(redis_server)
    store = redis_store(redis_server.url, 4)
    index_key = store._index_key
    store.close()
    client.set(index_key, "not a hash")
    own = client.client_id()
    store = redis_store(redis_server.url, 4)
    try:
        assert store.broken and "WRONGTYPE" in store.broken
        others = [c for c in client.client_list() if int(c["id"]) != own]
        assert others == [], [c["cmd"] for c in others]
    finally:
        store.close()


def test_a_password_in_the_url_never_reaches_the_log(caplog: pytest.LogCaptureFixture,
                                                     tmp_path) -> None:  # noqa: ANN001
    assert redacted("redis://:hunter2@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redacted("rediss://app:hunter2@cache:6380") == "rediss://app:***@cache:6380"
    assert redacted("redis://cache:6379") == "redis://cache:6379"
    store = redis_store("redis://:hunter2@127.0.0.1:1/0", 4, socket_timeout_s=0.5)
    try:
        assert store.broken and "hunter2" not in store.broken
        assert "hunter2" not in caplog.text and "***" in caplog.text
    finally:
        store.close()


def test_a_resync_repairs_an_index_that_missed_events(redis_server: RedisServer) -> None:
    """Events published while a replica was not listening (a reconnect) are lost; the
    periodic re-read of the shared index brings its view back."""
    first = redis_store(redis_server.url, 4)
    second = redis_store(redis_server.url, 4, resync_s=0.2)
    try:
        kept, dropped = make_meta(1), make_meta(2)
        assert put(first, kept) and put(first, dropped)
        assert eventually(lambda: second.has(dropped.key))
        # Removed and added behind the channel's back:
        client = raw_client(redis_server)
        charged = json.loads(client.hget(first._index_key, dropped.key.hex()))["charged"]
        client.hdel(first._index_key, dropped.key.hex())
        client.delete(first._entry_key(dropped.key))
        client.decrby(first._used_key, charged)
        added = make_meta(3)
        added_record = json.loads(first._record(added))
        added_record["replica"] = "elsewhere"
        client.hset(first._index_key, added.key.hex(), json.dumps(added_record))
        assert eventually(lambda: not second.has(dropped.key) and second.has(added.key))
        assert second.has(kept.key)
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("reads_at_once", [1, 4])
def test_probe_measures_a_round_trip(redis_server: RedisServer, reads_at_once: int) -> None:
    store = redis_store(redis_server.url, 4)
    try:
        rate = store.probe(torch.zeros(1 << 20, dtype=torch.uint8), reads_at_once)
        assert 0 < rate.latency_s < 0.5 and rate.bytes_per_s > 1e6
        assert raw_client(redis_server).keys("*probe*") == []
    finally:
        store.close()


def test_a_probe_that_fails_half_way_leaves_no_value_behind(redis_server: RedisServer) -> None:
    """A server without room for all of the probe's values (maxmemory, noeviction) refuses
    its later writes: the probe judges the tier unusable, and the values it did write go
    too. Before, they stayed in the shared server for good, outside every capacity."""
    client = raw_client(redis_server)
    payload = torch.zeros(1 << 20, dtype=torch.uint8)
    store = redis_store(redis_server.url, 4)
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", client.info("memory")["used_memory"] + (6 << 20))
        rate = store.probe(payload, reads_at_once=8)  # 16 values of 1 MiB: some fit
        assert rate.latency_s >= 1.0  # never worth loading from
        assert client.keys("*probe*") == []
    finally:
        client.config_set("maxmemory", 0)
        store.close()


@pytest.mark.parametrize(("text", "url"), [
    ("redis:redis://cache.internal:6379/2:8GiB", "redis://cache.internal:6379/2"),
    ("redis:cache.internal:6379:1GiB", "redis://cache.internal:6379"),
    ("redis:unix:///run/redis.sock:512MiB:s3fifo", "unix:///run/redis.sock"),
    ("redis:rediss://:secret@cache:6380:1GiB", "rediss://:secret@cache:6380"),
])
def test_redis_tier_specs_parse_to_urls(text: str, url: str) -> None:
    spec = TierSpec.parse(text)
    assert spec.kind == "redis" and spec.url == url


@pytest.mark.parametrize("text", ["redis:ftp://host:21:1GiB", "redis:1GiB", "redis::1GiB"])
def test_bad_redis_tier_specs_are_refused_by_name(text: str) -> None:
    with pytest.raises(ConfigError, match="redis"):
        TierSpec.parse(text)


def test_an_entry_removed_and_stored_again_while_a_load_holds_it_keeps_its_pins_whole(
        replicas: list[RedisStore]) -> None:
    """A load here pins an entry; another replica removes it (the event drops it here
    although pinned) and stores it again (adopted here anew). Before, the load's unpin then
    took the new entry's count below zero: an AssertionError in the scheduler's poll."""
    first, second = replicas
    meta = make_meta(1)
    assert put(first, meta) and eventually(lambda: second.has(meta.key))
    assert second.pin(meta.key)
    first.remove(meta.key)
    assert eventually(lambda: not second.has(meta.key))
    assert put(first, meta) and eventually(lambda: second.has(meta.key))
    second.unpin(meta.key)
    assert second.pin(meta.key)  # a later load's pin is the entry's only one
    second.unpin(meta.key)
    assert second._entries[meta.key].pins == 0
    for store in replicas:
        store.check_integrity()
