"""Redis tier: a networked store that engine replicas share and that outlives any one engine.

Under `kvtier:{<layout namespace>}:` (the braces keep every key in one Redis Cluster slot, so
the scripts below may touch them together):
- `entry:<key hex>`: the entry in `entry_codec`'s self-checking format, read with one GET;
- `index`: a hash, key hex -> JSON record (block hashes, bytes charged, payload bytes, store
  time): what a replica learns the shared entries from when it starts or resynchronises;
- `used`: the bytes the entries of `index` are charged, for the shared capacity;
- channel `events`: `+<record>` when a replica publishes an entry, `-<record>` when it removes
  one, so each replica's index (the base class's, which lookups consult without I/O) follows
  the others' within a round trip; a periodic resync covers messages lost to a reconnect.

Capacity is the store's, not one replica's: publishing is one Lua script that writes the
entry, its record and its bytes only while `used` stays within the capacity, and removal is
one that takes all three away, so `used` never counts an entry a crashed replica left half
done. Each replica picks victims by its own policy among the entries it knows. A replica may
plan a load of an entry that another has just evicted: the GET finds nothing and the request
recomputes, as it does after a connection error or a failed checksum (counted as errors). A
value gone while its record stays (Redis evicting on its own) is removed with its record.
Network I/O happens in `complete_store`, `read` (transfer threads) and on the store's own
threads (events, removals); `prepare_store` and lookups only touch the local index.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import redis
import torch
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from kvtier.tiers import entry_codec, redis_bulk
from kvtier.tiers.base import EntryMeta, KVLayout, StoreHandle, TierError, TierStore, _Entry
from kvtier.tiers.cost import TierRate
from kvtier.tiers.policy import EvictionPolicy
from kvtier.types import BlockHash

logger = logging.getLogger(__name__)

RESYNC_S = 30.0
"""How often a replica re-reads the shared index, repairing what lost events left stale."""
RESYNC_BATCH = 512
"""Index records fetched per round trip when a resync adopts entries."""
PUBLISH_ATTEMPTS = 4
"""Evictions tried when the shared capacity is full of entries this replica had not seen."""

STAGED_TTL_MS = 60_000
"""An entry's value is first written under a staging key that expires after this long, so a
replica that dies before publishing it leaves nothing behind."""

# The value is already under the staging key (a plain SET: a value passed to a script as an
# argument is copied more, 0.21 against 0.52 GB/s on this repo's box).
# KEYS: staged value, entry, index, used. ARGV: key hex, record, bytes charged, capacity,
# channel. 1: published (the staged value renamed to the entry); 0: another replica already
# had it (staged value dropped); -1: no room (staged value kept for a retry); -2: the staged
# value expired.
_PUBLISH = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[1])
  return 0
end
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
if used + tonumber(ARGV[3]) > tonumber(ARGV[4]) then return -1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[4], ARGV[3])
redis.call('PUBLISH', ARGV[5], '+' .. ARGV[2])
return 1
"""

# KEYS: entry, index, used. ARGV: key hex, channel, remover. 1: removed; 0: already gone.
_REMOVE = """
local record = redis.call('HGET', KEYS[2], ARGV[1])
if not record then return 0 end
local fields = cjson.decode(record)
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('DECRBY', KEYS[3], fields['charged'])
fields['replica'] = ARGV[3]
redis.call('PUBLISH', ARGV[2], '-' .. cjson.encode(fields))
return 1
"""

_GONE = "gone"
"""An entry's location once the shared store no longer holds it: forgetting it locally must
not remove it again (another replica may have stored it anew)."""


def redacted(url: str) -> str:
    """`url` with the password of its credentials replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def _payload_tensor(payload: memoryview) -> torch.Tensor:
    """A uint8 tensor over the reply's own bytes (the bulk reader's buffer, or redis-py's
    bytes), not a copy: a fresh 12 MB buffer per read cost up to ~30 ms of first-touch page
    faults on this repo's (virtual) 2-core box, more than the GET. Read-only in fact; every
    reader of a tier's payload only copies from it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(payload, dtype=torch.uint8)


def _parse_key(raw: bytes | str) -> BlockHash | None:
    """An index field's key, or None for one that is not a key's hex (not ours)."""
    try:
        return BlockHash(bytes.fromhex(raw.decode() if isinstance(raw, bytes) else raw))
    except ValueError:
        return None


class RedisStore(TierStore):
    name = "redis"

    def __init__(self, layout: KVLayout, capacity_bytes: int, policy: EvictionPolicy,
                 url: str, *, resync_s: float = RESYNC_S,
                 socket_timeout_s: float = 5.0) -> None:
        super().__init__(layout, capacity_bytes, policy)
        self.url = url
        self.display_url = redacted(url)
        """The URL with its password hidden: what logs and errors show."""
        self.replica_id = uuid.uuid4().hex[:12]
        self.broken: str | None = None
        self.resync_s = resync_s
        prefix = f"kvtier:{{{layout.namespace}}}:"
        self._entry_prefix = prefix + "entry:"
        self._staged_prefix = prefix + "staged:"
        self._index_key = prefix + "index"
        self._used_key = prefix + "used"
        self._channel = prefix + "events"
        self._known_since: dict[BlockHash, float] = {}
        """monotonic() when each ready entry became known here (resync keeps newer ones)."""
        self._closed = threading.Event()
        self._removals = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-redis-rm")
        self._listener: threading.Thread | None = None
        try:
            self._client = redis.Redis.from_url(
                url, socket_timeout=socket_timeout_s,
                socket_connect_timeout=min(socket_timeout_s, 2.0),
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1))
            self._client.ping()
            self._bulk = (redis_bulk.BulkReader(self._client, socket_timeout_s)
                          if redis_bulk.supports(self._client) else None)
            """Reads of entries (TLS servers: redis-py's GET)."""
            self._publish_script = self._client.register_script(_PUBLISH)
            self._remove_script = self._client.register_script(_REMOVE)
            # Subscribed before the first resync: no entry published in between is missed.
            self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(self._channel)
            self._resync()
        except (redis.RedisError, ValueError, OSError) as exc:
            self._close_connections()  # those opened before the failure
            self.broken = f"{self.display_url}: {exc}"
            self.stats.num_errors += 1
            logger.error("redis tier disabled: %s", self.broken)
            return
        self._listener = threading.Thread(target=self._follow_events, daemon=True,
                                          name="kvtier-redis-events")
        self._listener.start()
        logger.info("redis tier %s: %d shared entries, %d bytes", self.display_url,
                    self.num_entries, self.used_bytes)

    def _entry_key(self, key: BlockHash) -> str:
        return self._entry_prefix + key.hex()

    def _entry_bytes(self, meta: EntryMeta) -> int:
        return entry_codec.encoded_bytes(meta, self.layout.namespace)

    # -- store -------------------------------------------------------------------------------

    def prepare_store(self, meta: EntryMeta) -> StoreHandle | None:
        with self._lock:
            if meta.key in self._entries:
                return None
            if self.broken or not self._reserve(meta, None):
                self.stats.num_rejected += 1
                return None
        return StoreHandle(meta, torch.empty(meta.num_bytes, dtype=torch.uint8))

    def complete_store(self, handle: StoreHandle, success: bool) -> None:
        meta = handle.meta
        if success:
            success = self._publish(handle)
        with self._lock:
            entry = self._entries.get(meta.key)
            if entry is not None and not success:
                entry.location = _GONE  # nothing of it reached the store: nothing to remove
            if self._finish_store(meta, success) is not None:
                self._known_since[meta.key] = time.monotonic()

    def _publish(self, handle: StoreHandle) -> bool:
        """Write the entry into the shared store; False where it found no room or failed."""
        meta = handle.meta
        payload = handle.buffer.numpy().data
        blob = entry_codec.preamble(meta, self.layout.namespace, payload) + payload
        record = self._record(meta)
        staged = f"{self._staged_prefix}{self.replica_id}:{meta.key.hex()}"
        try:
            self._client.set(staged, blob, px=STAGED_TTL_MS)
            for _ in range(PUBLISH_ATTEMPTS):
                self._await_removals()  # those that made this entry's room locally
                published = self._publish_script(
                    keys=[staged, self._entry_key(meta.key), self._index_key, self._used_key],
                    args=[meta.key.hex(), record, self._entry_bytes(meta),
                          self.capacity_bytes, self._channel])
                if published >= 0:
                    return True
                if published == -2:
                    raise redis.RedisError(f"the staged value expired ({STAGED_TTL_MS} ms)")
                # Full of entries this replica had not counted: make room among those it knows.
                with self._lock:
                    evicted = self._evict_one()
                if not evicted:
                    break
            self._client.delete(staged)
        except redis.RedisError as exc:
            logger.warning("redis tier: store of %s failed: %s", meta.key.hex(), exc)
            with self._lock:
                self.stats.num_errors += 1
            with contextlib.suppress(redis.RedisError):
                self._client.delete(staged)
            return False
        with self._lock:
            self.stats.num_rejected += 1
        return False

    def _record(self, meta: EntryMeta) -> str:
        return json.dumps({"key": meta.key.hex(), "hashes": [h.hex() for h in meta.block_hashes],
                           "charged": self._entry_bytes(meta), "num_bytes": meta.num_bytes,
                           "stored_at": time.time(), "replica": self.replica_id})

    # -- load --------------------------------------------------------------------------------

    def read(self, meta: EntryMeta) -> torch.Tensor:
        name = f"entry {meta.key.hex()}"
        if self.broken:
            raise self._fail(meta, f"{name}: unavailable ({self.broken})")
        try:
            blob = self._get(self._entry_key(meta.key))
        except redis.RedisError as exc:
            # The store may be fine and the entry with it: forget it here only.
            raise self._lose(meta, f"{name}: {exc}") from exc
        if blob is None:
            # Evicted by another replica (its record went with it, and removing again does
            # nothing), or lost by Redis itself (maxmemory, a flush): then its record and
            # bytes would stay charged to the capacity for good, so the removal drops them.
            raise self._fail(meta, f"{name}: no longer in the store")
        try:
            payload = entry_codec.decode(name, blob, meta, self.layout.namespace)
        except TierError as exc:
            raise self._fail(meta, str(exc)) from exc  # damaged: removed for every replica
        self._mark_read(meta)
        return _payload_tensor(payload)

    def _get(self, key: str) -> bytes | memoryview | None:
        """An entry's encoded bytes, None where the store has no such key."""
        if self._bulk is None:
            return self._client.get(key)
        value = self._bulk.get(key.encode())
        return None if value is None else value.numpy().data

    def _lose(self, meta: EntryMeta, reason: str) -> TierError:
        """An entry this replica can no longer read, forgotten here without removing it from
        the store (which may have lost it already, or still hold it for the others)."""
        with self._lock:
            self.stats.num_errors += 1
            self._forget(meta.key)
        return TierError(f"{self.name} tier: {reason}")

    def _forget(self, key: BlockHash) -> None:
        """Drop an entry from the local index only (caller holds the lock)."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.location = _GONE
            self._drop(key)

    def _release(self, entry: _Entry) -> None:
        self._known_since.pop(entry.meta.key, None)
        if entry.location != _GONE and not self.broken:
            self._removals.submit(self._remove, entry.meta.key)

    def _await_removals(self) -> None:
        """Return once the removals queued so far have run (not holding the lock)."""
        if not self._closed.is_set():  # closing ran them all
            self._removals.submit(lambda: None).result()

    def _remove(self, key: BlockHash) -> None:
        try:
            self._remove_script(keys=[self._entry_key(key), self._index_key, self._used_key],
                                args=[key.hex(), self._channel, self.replica_id])
        except redis.RedisError as exc:
            logger.warning("redis tier: removal of %s failed: %s", key.hex(), exc)
            with self._lock:
                self.stats.num_errors += 1

    # -- following the other replicas --------------------------------------------------------

    def _follow_events(self) -> None:
        next_resync = time.monotonic() + self.resync_s
        backoff_s = 0.0
        while not self._closed.is_set():
            try:
                message = self._pubsub.get_message(timeout=0.2)
                if message is not None and message.get("type") == "message":
                    self._apply(message["data"])
                if time.monotonic() >= next_resync:
                    self._resync()
                    next_resync = time.monotonic() + self.resync_s
                backoff_s = 0.0
            except (redis.RedisError, OSError, ValueError) as exc:
                if self._closed.is_set():
                    return
                if backoff_s == 0.0:
                    logger.warning("redis tier: event stream interrupted (%s); retrying", exc)
                backoff_s = min(max(2 * backoff_s, 0.25), 5.0)  # a server that is down
                self._closed.wait(backoff_s)
                next_resync = time.monotonic()  # messages may have been lost meanwhile

    def _apply(self, data: bytes) -> None:
        """One event of the channel: another replica published or removed an entry."""
        text = data.decode() if isinstance(data, bytes) else data
        try:
            record = json.loads(text[1:])
            meta = self._meta_of(record)
        except (ValueError, KeyError, TypeError, IndexError):
            logger.warning("redis tier: ignoring a malformed event %.80r", text)
            return
        if record.get("replica") == self.replica_id:
            return
        with self._lock:
            entry = self._entries.get(meta.key)
            if text[0] == "+" and entry is None:
                self._adopt(meta)
            elif text[0] == "-" and entry is not None and entry.ready:
                self._forget(meta.key)

    def _resync(self) -> None:
        """Match the local index to the shared one: adopt what others stored (oldest first,
        so the policy sees them in store order) and forget what they removed. Only the keys
        travel, and the records of keys not known here: a 200 GiB store holds ~28k records
        of ~1.5 kB, too many to fetch and parse every `resync_s` on the engine's host."""
        started = time.monotonic()
        shared_keys = {key for key in map(_parse_key, self._client.hkeys(self._index_key))
                       if key is not None}
        with self._lock:
            unknown = [key for key in shared_keys if key not in self._entries]
        adopted: list[tuple[float, EntryMeta]] = []
        for first in range(0, len(unknown), RESYNC_BATCH):
            batch = unknown[first:first + RESYNC_BATCH]
            for raw in self._client.hmget(self._index_key, [k.hex() for k in batch]):
                if raw is None:
                    continue  # removed since the keys were read
                try:
                    record = json.loads(raw)
                    meta = self._meta_of(record)  # first: it checks the record's shape
                    adopted.append((float(record.get("stored_at", 0.0)), meta))
                except (ValueError, KeyError, TypeError, IndexError):
                    logger.warning("redis tier: ignoring a malformed index record %.80r", raw)
        with self._lock:
            for key, entry in list(self._entries.items()):
                if (entry.ready and key not in shared_keys
                        and self._known_since.get(key, started) < started):
                    self._forget(key)
            for _, meta in sorted(adopted, key=lambda item: item[0]):
                if meta.key not in self._entries:
                    self._adopt(meta)

    def _adopt(self, meta: EntryMeta) -> None:
        """Index an entry another replica published (its bytes already charged to the shared
        capacity, so nothing is evicted for it here); caller holds the lock."""
        entry = self._register(meta, None)
        entry.ready = True
        self._known_since[meta.key] = time.monotonic()
        self.policy.insert(meta.key)

    def _meta_of(self, record: dict) -> EntryMeta:
        if not isinstance(record, dict):
            raise ValueError("a record is a JSON object")
        hashes = tuple(BlockHash(bytes.fromhex(h)) for h in record["hashes"])
        meta = EntryMeta(hashes[-1], hashes, int(record["num_bytes"]))
        if meta.key.hex() != record["key"]:
            raise ValueError("record key does not match its last block")
        return meta

    # -- capacity, probe, shutdown -----------------------------------------------------------

    def check_integrity(self) -> None:
        if not self.broken:
            self._await_removals()
        super().check_integrity()

    def _check_capacity(self) -> None:
        """The shared capacity holds in the store; the local index may briefly count entries
        the others removed (their events in flight), so it is not checked against it."""
        if self.broken:
            return
        records = self._client.hgetall(self._index_key)
        charged = sum(int(json.loads(raw)["charged"]) for raw in records.values())
        used = int(self._client.get(self._used_key) or 0)
        assert used == charged, f"shared used {used} != the records' {charged}"
        assert used <= self.capacity_bytes, "shared capacity exceeded"

    def probe(self, payload: torch.Tensor, reads_at_once: int = 1) -> TierRate:
        """Latency (a GET of a missing key) and rate of reads of entries of `payload`'s size
        as `read` does them (GET, checks, copy out), `reads_at_once` at a time as a load
        reads its entries (twice as many values as threads, past the first wave), through
        scratch keys."""
        if self.broken:
            return TierRate(1.0, latency_s=1.0)  # unusable: never worth loading from
        key = BlockHash(bytes.fromhex(self.replica_id.ljust(32, "0")))
        meta = EntryMeta(key, (key,), payload.numel())
        data = payload.numpy().data
        blob = entry_codec.preamble(meta, self.layout.namespace, data) + data
        scratch = [f"{self._entry_prefix}probe:{self.replica_id}:{i}"
                   for i in range(2 * reads_at_once)]

        def read(name: str) -> None:
            value = self._get(name)
            if value is None:
                raise TierError("a probe value vanished")
            _payload_tensor(entry_codec.decode("probe", value, meta, self.layout.namespace))

        try:
            with ThreadPoolExecutor(reads_at_once, thread_name_prefix="kvtier-probe") as pool:
                for name in scratch:
                    # Expiring: a probe that dies before its clean-up leaves nothing for good.
                    self._client.set(name, blob, px=STAGED_TTL_MS)
                # Warm-up: each thread's connection opened, the first large reads done.
                list(pool.map(read, scratch))
                started = time.perf_counter()
                self._get(scratch[0] + ":missing")
                latency = time.perf_counter() - started
                started = time.perf_counter()
                list(pool.map(read, scratch))
                elapsed = time.perf_counter() - started
        except (redis.RedisError, TierError) as exc:
            logger.warning("redis tier probe failed: %s", exc)
            return TierRate(1.0, latency_s=1.0)
        finally:  # a probe that failed half way (a full server) takes its values too
            with contextlib.suppress(redis.RedisError):
                self._client.delete(*scratch)
        # As `CostModel.observe_load` reads a load: at most twice the naive rate.
        return TierRate(len(scratch) * payload.numel() / max(elapsed - latency, elapsed / 2),
                        latency_s=latency)

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.join(timeout=5.0)
        self._removals.shutdown(wait=True)
        if not self.broken:
            self._close_connections()

    def _close_connections(self) -> None:
        """Close the connections opened so far (a start may fail after some)."""
        for name in ("_bulk", "_pubsub", "_client"):
            connection = getattr(self, name, None)
            if connection is not None:
                with contextlib.suppress(redis.RedisError, OSError):
                    connection.close()
