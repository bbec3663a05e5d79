"""The tier stack under the device prefix cache: lookups, asynchronous loads and stores.

Called from the scheduler thread only; data moves in transfer threads, and their completions
come back through `poll()`, which the scheduler calls at the start of every step.

    lookup(request, after the device hit) -> LoadPlan (consecutive tier hits that pay off;
                                             their entries pinned: `release_plan` if unused)
    start_load(plan, destination blocks)  -> transfer thread: read entry, scatter into blocks
                                             (a small host-memory load on a CPU device: inline)
    poll()                                -> finished loads (their blocks are now valid KV)

Stores keep to the store policy and admission gates:
- lazy: a request's chunks become candidates when it frees its blocks; just before the device
  pool evicts a candidate's blocks (`store_lookahead`, the next blocks in eviction order), the
  whole chunk is copied down;
- write-through: each chunk is copied down as soon as its last block is computed;
- admission: chunks of prefixes seen fewer than `kv_store_min_hits` times (with `auto`: 2 while
  the workload shows no reuse, else 1), and chunks whose load would not beat recomputing them,
  are never stored.
Entries go to the first tier; the first tier's evictions are demoted to the next one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import queue
import time
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from kvtier.config import AUTO_MIN_REUSE_RATE, TierConfig
from kvtier.kv.block_pool import BlockPool
from kvtier.tiers.base import EntryMeta, StoreHandle, TierError, TierStore
from kvtier.tiers.chunks import Chunk, ReuseCounter, chunk_runs
from kvtier.tiers.cost import CostModel
from kvtier.tiers.records import LoadPlan, LoadResult, ManagerStats, Segment
from kvtier.tiers.transfer import GatheredBlocks, KVTransfer, LoadPart
from kvtier.types import BlockHash

logger = logging.getLogger(__name__)

REUSE_WINDOW_MIN_REQUESTS = 32
"""`kv_store_min_hits auto` judges reuse over at least this many requests (and at least the
device pool's blocks)."""
_MAX_INFLIGHT_STORES = 64
"""Bounds the device memory held by gathered-but-not-yet-copied chunks (CUDA)."""
INLINE_LOAD_S = 0.01
"""CPU device: a host-memory load predicted to take less than this runs in the scheduler step.
It is a memcpy either way; run in the background it costs the request one more step of TTFT
(and on a machine with few cores it competes with the forward anyway)."""
READ_AHEAD = 8
"""Entries of one load read at once from the tiers below host memory (disk, redis). A read
waits on a file or a socket, so several overlap (redis-py takes a pooled connection per
thread, and the disk tier's checksum releases the GIL), and later entries arrive while earlier
ones are copied into the device pool. A 64-entry load on an H200's host (16 cores,
`scripts/bench_tier_io.py`): disk 1.36 GB/s one at a time, 3.27 at 4, 4.30 at 8, 3.69 at
16; redis 0.65-0.87 at every setting there (one server thread), 0.35 -> 1.13 on a 2-core box."""


@dataclass
class _EventLoad:
    """A CUDA load enqueued on the load stream: timing events around its copies."""

    copy_started: torch.cuda.Event
    done: torch.cuda.Event
    result: LoadResult
    started: float
    """time.monotonic() when it was enqueued (its wall time runs until the host notices)."""
    reported_plan: LoadPlan | None
    """Same-step timing: the plan of a load already reported to the scheduler (its entries
    stay pinned until `done`); None while the request still waits for this event."""


class TierManager:
    def __init__(self, config: TierConfig, stores: list[TierStore], transfer: KVTransfer,
                 pool: BlockPool, block_size: int, cost: CostModel) -> None:
        if not stores:
            raise ValueError("a tier manager needs at least one store")
        self.config = config
        self.stores = stores
        self.transfer = transfer
        self.pool = pool
        self.block_size = block_size
        self.chunk_blocks = max(1, config.kv_tier_chunk_tokens // block_size)
        self.cost = cost
        self.stats = ManagerStats(hit_tokens={s.name: 0 for s in stores})
        self._stores_by_name = {store.name: store for store in stores}
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-store")
        self._loaders = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-load")
        """Loads never queue behind stores: a waiting request's TTFT depends on them."""
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-demote")
        self._closed = False
        self._read_ahead = READ_AHEAD
        self._readers = ThreadPoolExecutor(max_workers=self._read_ahead,
                                           thread_name_prefix="kvtier-read")
        self._loading: dict[str, tuple[LoadPlan, list[BlockHash]]] = {}
        self._finished_loads: list[LoadResult] = []
        self._loading_blocks: dict[BlockHash, str] = {}
        self._storing: set[BlockHash] = set()
        """Keys of the entries being copied down (done in poll)."""
        self._candidates: dict[BlockHash, Chunk] = {}
        self._inline = transfer.is_cuda
        """CUDA: memory-tier copies are enqueued here and tracked by events (see transfer)."""
        self._event_loads: list[_EventLoad] = []
        self._event_stores: list[tuple[torch.cuda.Event, StoreHandle, BlockHash]] = []
        # Chunks evicted now were noted about a device pool's worth of blocks ago.
        self._reuse = ReuseCounter(window_blocks=pool.num_blocks,
                                   min_notes=REUSE_WINDOW_MIN_REQUESTS)
        for upper, lower in zip(stores, stores[1:], strict=False):
            upper.on_evict = self._demoter(lower)

    # -- lookups and loads -------------------------------------------------------------------

    def is_loading(self, block_hash: BlockHash) -> bool:
        """Another request's in-flight load is bringing this block in (wait instead)."""
        return block_hash in self._loading_blocks

    def holds_block(self, block_hash: BlockHash) -> bool:
        """Whether some tier holds (or is storing) this block: a cheap hint, not a lookup."""
        return any(store.has_block(block_hash) for store in self.stores)

    def note_request(self, block_hashes: list[BlockHash]) -> None:
        """Count one more request containing each of these chunks (admission by reuse)."""
        self._reuse.note(self._chunks(block_hashes, 0, len(block_hashes)))
        self.stats.reuse_rate = self._reuse.reuse_rate
        self.stats.store_min_hits = self.min_hits

    def lookup(self, block_hashes: list[BlockHash], first_block: int,
               max_blocks: int) -> LoadPlan | None:
        """Consecutive tier hits from `first_block` (below `max_blocks`), as far as loading
        them saves the most time over recomputing them (none where nothing is saved, but for
        a retry's one segment), their entries pinned: the caller passes the plan to
        `start_load` or `release_plan`.
        Pinned here, not in `start_load`: allocating the request's blocks in between evicts
        device blocks, whose stores make room in the first tier, and without the pins a small
        tier evicted the very entries the plan names (on the card, 62 of 149 planned blocks
        of a cpu+disk run were then recomputed)."""
        hits: list[tuple[Segment, TierStore, int]] = []  # (segment, store, first block)
        index = first_block
        while index < max_blocks:
            found = self._locate(block_hashes[index])
            if found is None:
                break
            tier, meta, first = found
            count = 1
            while (index + count < max_blocks and first + count < meta.num_blocks
                   and meta.block_hashes[first + count] == block_hashes[index + count]):
                count += 1
            hits.append((Segment(tier, meta, first, count), self.stores[tier], index))
            index += count
        # The run is loaded as far as it saves the most time: later tokens attend more keys,
        # so a run's end can pay for its start, and only a prefix of it can be loaded.
        saved, best_saved, take = 0.0, 0.0, 0
        for k, (segment, store, start) in enumerate(hits, 1):
            num_tokens = segment.num_blocks * self.block_size
            saved += (self.cost.recompute_s(num_tokens, start * self.block_size)
                      - self.cost.load_s(store.name,
                                         segment.num_blocks * store.layout.block_bytes))
            if saved > best_saved:
                best_saved, take = saved, k
        # A load from below host memory runs in the background: the request waits at least
        # one more step for it, so it must save more than a step's fixed cost.
        if take and best_saved <= self.cost.step_overhead_s and any(
                store.name != "cpu" for _, store, _ in hits[:take]):
            take = 0
        retry = bool(hits) and not take
        # Only what is taken is pinned; an entry evicted since `_locate` (by a transfer
        # thread's store) ends the plan there.
        segments: list[Segment] = []
        for segment, store, _ in hits[:max(take, int(retry))]:
            if not store.pin(segment.meta.key):
                break
            segments.append(segment)
        # A retry is granted only to a load that can run (its entry pinned): one spent on an
        # entry gone since `_locate` would put off the tier's next measurement.
        if retry and segments and not self.cost.grant_retry(hits[0][1].name):
            hits[0][1].unpin(segments.pop().meta.key)
            self.stats.num_rejected_cost += 1
        return LoadPlan(tuple(segments)) if segments else None

    def release_plan(self, plan: LoadPlan) -> None:
        """A plan from `lookup` that will not be loaded: unpin its entries."""
        self._release_entries(plan)

    def _locate(self, block_hash: BlockHash) -> tuple[int, EntryMeta, int] | None:
        for tier, store in enumerate(self.stores):
            found = store.locate(block_hash)
            if found is not None:
                return tier, found[0], found[1]
        return None

    def start_load(self, request_id: str, plan: LoadPlan, block_ids: list[int],
                   block_hashes: list[BlockHash]) -> bool:
        """Begin loading the plan into `block_ids` (already allocated to the request).
        `block_hashes` are the hashes those blocks will hold. Returns True when the request
        may run now (`poll` returns its result at once): a small host-memory load on a CPU
        device that already ran, or on CUDA with `same-step` timing, a copy that the device
        orders before every later forward pass. The plan's entries (pinned by `lookup`) are
        unpinned when the load no longer reads them."""
        hashes = block_hashes[:plan.num_blocks]
        self._loading[request_id] = (plan, hashes)
        for block_hash in hashes:
            self._loading_blocks[block_hash] = request_id
        host_only = all(self.stores[s.tier].name == "cpu" for s in plan.segments)
        if self._inline and host_only:
            return self._start_event_load(request_id, plan, block_ids)
        if host_only and self._predicted_load_s(plan) < INLINE_LOAD_S:
            self._run_load(request_id, plan, block_ids)
            return True
        self._loaders.submit(self._run_load, request_id, plan, block_ids)
        return False

    def _predicted_load_s(self, plan: LoadPlan) -> float:
        block_bytes = self.stores[0].layout.block_bytes
        return sum(self.cost.load_s(self.stores[s.tier].name, s.num_blocks * block_bytes)
                   for s in plan.segments)

    def _start_event_load(self, request_id: str, plan: LoadPlan, block_ids: list[int]) -> bool:
        """CUDA + host-memory tier: enqueue every copy now; `poll` sees the event complete.
        With `same-step` timing the compute stream waits for the copy, and the request is
        reported loaded at once; its entries stay pinned until the copy's event fires."""
        started = time.monotonic()
        copy_started = self.transfer.load_event()
        done, per_tier = 0, {s.name: 0 for s in self.stores}
        parts: list[LoadPart] = []
        for segment in plan.segments:
            store = self.stores[segment.tier]
            try:
                payload = store.read(segment.meta)
            except TierError as exc:
                logger.warning("load for %s stopped after %d blocks: %s", request_id, done, exc)
                break
            parts.append(LoadPart(payload, segment.meta.num_blocks, segment.first,
                                  segment.num_blocks))
            done += segment.num_blocks
            per_tier[store.name] += segment.num_blocks
        self.transfer.copy_in_parts(parts, self.transfer.load_index(block_ids[:done]))
        result = LoadResult(request_id, done, per_tier, 0.0)
        copied = self.transfer.load_event()
        same_step = self.config.kv_load_timing == "same-step"
        if same_step:
            self.transfer.order_compute_after(copied)
            plan = self._report_load(result)
        self._event_loads.append(
            _EventLoad(copy_started, copied, result, started, plan if same_step else None))
        return same_step

    def _run_load(self, request_id: str, plan: LoadPlan, block_ids: list[int]) -> None:
        started = time.monotonic()
        done, per_tier, offset = 0, {s.name: 0 for s in self.stores}, 0
        reads = self._reads(plan)
        try:
            index = self.transfer.load_index(block_ids[:plan.num_blocks])
            for segment in plan.segments:
                store = self.stores[segment.tier]
                payload = next(reads)
                self.transfer.copy_in(payload, segment.meta.num_blocks, segment.first,
                                      index[offset:offset + segment.num_blocks])
                offset += segment.num_blocks
                done += segment.num_blocks
                per_tier[store.name] += segment.num_blocks
        except TierError as exc:
            logger.warning("load for %s stopped after %d blocks: %s", request_id, done, exc)
        except Exception:  # never lose a request to an unexpected transfer bug
            logger.exception("load for %s failed", request_id)
        finally:
            reads.close()  # reads still in flight finish before the plan's entries are unpinned
        try:
            self.transfer.wait_loads()
        except Exception:  # a failed device copy: report nothing loaded, recompute all
            logger.exception("load for %s failed on the device", request_id)
            done, per_tier = 0, {s.name: 0 for s in self.stores}
        elapsed = time.monotonic() - started
        for tier, blocks in per_tier.items():  # one observation per tier used
            if blocks and blocks == done:
                self.cost.observe_load(tier, blocks * self.stores[0].layout.block_bytes, elapsed)
        self._done.put(("load", LoadResult(request_id, done, per_tier, elapsed)))

    def _reads(self, plan: LoadPlan) -> Generator[torch.Tensor, None, None]:
        """The plan's payloads in order. Where a segment lies below host memory, up to
        READ_AHEAD reads run at once in the reader threads. A read's TierError is raised when
        its payload is due; closing the generator cancels the reads not started and waits for
        those running."""
        stores = [self.stores[segment.tier] for segment in plan.segments]
        if all(store.name == "cpu" for store in stores):  # views of host memory: nothing to wait on
            for store, segment in zip(stores, plan.segments, strict=True):
                yield store.read(segment.meta)
            return
        pending: deque[Future] = deque()
        submitted = 0
        try:
            while pending or submitted < len(stores):
                while submitted < len(stores) and len(pending) < self._read_ahead:
                    pending.append(self._readers.submit(stores[submitted].read,
                                                        plan.segments[submitted].meta))
                    submitted += 1
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            wait(pending)

    # -- completions -------------------------------------------------------------------------

    def poll(self) -> list[LoadResult]:
        """Finish completed transfers (unpin what they held); return the finished loads."""
        self._absorb()
        results, self._finished_loads = self._finished_loads, []
        return results

    def wait_for_transfer(self, timeout_s: float) -> None:
        """Block (without holding the GIL) until a load or store finishes or `timeout_s`
        passes. For a caller with nothing else to do (every request is waiting for a load):
        spinning would starve the transfer threads of the GIL and delay the very transfer it
        waits for."""
        if not self.has_inflight_transfers or self._finished_loads:
            return
        if self._event_loads or self._event_stores:
            # A host-memory copy: milliseconds.
            (self._event_loads[0].done if self._event_loads
             else self._event_stores[0][0]).synchronize()
            self._check_events()
            return
        try:
            item = self._done.get(timeout=timeout_s)
        except queue.Empty:
            return
        self._handle(*item)

    def _absorb(self) -> None:
        self._check_events()
        while True:
            try:
                kind, value = self._done.get_nowait()
            except queue.Empty:
                return
            self._handle(kind, value)

    def _check_events(self) -> None:
        """Complete event-tracked copies whose events have fired (in order of submission)."""
        while self._event_loads and self._event_loads[0].done.query():
            load = self._event_loads.pop(0)
            result = load.result
            result.seconds = time.monotonic() - load.started
            copy_s = load.copy_started.elapsed_time(load.done) / 1e3
            self.stats.load_copy_seconds += copy_s
            num_bytes = result.num_loaded_blocks * self.stores[0].layout.block_bytes
            tiers_used = [t for t, blocks in result.hit_blocks_per_tier.items() if blocks]
            if len(tiers_used) == 1:  # one observation, for the tier that did all the copying
                self.cost.observe_load(tiers_used[0], num_bytes, copy_s)
            if load.reported_plan is None:
                self._handle("load", result)
            else:  # the request already runs; the copy no longer reads the entries
                self.stats.load_seconds += result.seconds
                self._release_entries(load.reported_plan)
        while self._event_stores and self._event_stores[0][0].query():
            _, handle, key = self._event_stores.pop(0)
            self.stores[0].complete_store(handle, True)
            self._handle("store", key)

    def _handle(self, kind: str, value: object) -> None:
        if kind == "store":
            self._storing.discard(value)  # type: ignore[arg-type]
            return
        assert isinstance(value, LoadResult)
        self.stats.load_seconds += value.seconds
        self._release_entries(self._report_load(value))

    def _report_load(self, result: LoadResult) -> LoadPlan:
        """The request's blocks are loaded (or ordered before any later forward pass): hand
        the result to the next `poll`. Returns the plan, whose entries the caller unpins."""
        plan, hashes = self._loading.pop(result.request_id)
        for block_hash in hashes:
            self._loading_blocks.pop(block_hash, None)
        self.stats.num_loads += 1
        for name, blocks in result.hit_blocks_per_tier.items():
            self.stats.hit_tokens[name] += blocks * self.block_size
            self._stores_by_name[name].stats.num_hit_blocks += blocks
        self._finished_loads.append(result)
        return plan

    def _release_entries(self, plan: LoadPlan) -> None:
        for segment in plan.segments:
            self.stores[segment.tier].unpin(segment.meta.key)

    def clear_stores(self) -> int:
        """Drop what each tier holds; returns the entries dropped. Only once `wait_idle` has
        returned with no request running: a store in flight would land after the clear."""
        return sum(store.clear() for store in self.stores)

    @property
    def has_inflight_transfers(self) -> bool:
        return bool(self._loading or self._storing or self._event_loads)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until every submitted transfer has finished (tests, shutdown); finished
        loads stay queued for the next `poll`."""
        deadline = time.monotonic() + timeout
        self._absorb()
        while self.has_inflight_transfers and time.monotonic() < deadline:
            time.sleep(0.001)
            self._absorb()
        # Demotions the stores above started (an upper tier's evictions, written below in
        # `_io`): a reset's `clear_stores` skips an entry still being written, which would
        # land after it. The one worker runs them in order, so a no-op queued last waits
        # for all of them.
        if not self._closed:  # closing waited for them
            with contextlib.suppress(concurrent.futures.TimeoutError):
                self._io.submit(lambda: None).result(max(0.0, deadline - time.monotonic()))

    # -- stores ------------------------------------------------------------------------------

    def _chunks(self, block_hashes: list[BlockHash], start: int, end: int) -> list[Chunk]:
        return chunk_runs(block_hashes, start, end, self.chunk_blocks)

    @property
    def min_hits(self) -> int:
        """Requests that must have contained a chunk before it is stored (now)."""
        wanted = self.config.kv_store_min_hits
        if wanted != "auto":
            return int(wanted)
        reuse = self._reuse
        return 2 if reuse.window_full and reuse.reuse_rate < AUTO_MIN_REUSE_RATE else 1

    def _admit(self, chunk: Chunk) -> bool:
        if self.holds_block(chunk.key) or chunk.key in self._storing:
            return False
        if self._reuse.count(chunk) < self.min_hits:
            self.stats.num_rejected_min_hits += 1
            return False
        store = self.stores[0]
        # Judged as part of its prompt, which a later load brings in whole: every chunk of
        # a prompt is admitted or none (a chunk alone, early in a long prompt, would not
        # pay, and without it the chunks after it could not be loaded).
        prompt_blocks = max(chunk.prefix_blocks, len(chunk.block_hashes))
        num_bytes = prompt_blocks * store.layout.block_bytes
        # The retry matters here too: a tier refused every store is never loaded from, so
        # a pessimistic first estimate would otherwise never be measured again.
        if not (self.cost.load_pays(store.name, num_bytes, prompt_blocks * self.block_size)
                or self.cost.grant_retry(store.name)):
            self.stats.num_rejected_cost += 1
            return False
        return True

    @property
    def stores_on_compute(self) -> bool:
        """Write-through: blocks go down as they are computed (`on_blocks_computed`); the lazy
        policy stores only what is about to be evicted, so the scheduler skips the call (and
        the block hashes it needs) for every request of every step."""
        return self.config.kv_store_policy == "write-through"

    @property
    def stores_overlap_compute(self) -> bool:
        """Whether a store's host work (the gather's launch, the copy's enqueue) can run while
        the device computes a step: on CUDA; on the CPU the forward and the copies share the
        cores."""
        return self.transfer.is_cuda

    def on_blocks_computed(self, block_hashes: list[BlockHash], num_computed_blocks: int,
                           num_stored_blocks: int) -> int:
        """Write-through: store chunks completed since `num_stored_blocks`; returns the new
        count of blocks handled."""
        if not self.stores_on_compute:
            return num_computed_blocks
        full_end = num_computed_blocks - num_computed_blocks % self.chunk_blocks
        if full_end <= num_stored_blocks:
            return num_stored_blocks
        self._store_chunks(self._chunks(block_hashes, num_stored_blocks, full_end))
        return full_end

    def on_request_freed(self, block_hashes: list[BlockHash], num_computed_blocks: int) -> None:
        """A request is freeing its blocks: its chunks become lazy candidates; write-through
        stores its trailing partial chunk now."""
        if num_computed_blocks == 0:
            return
        chunks = self._chunks(block_hashes, 0, num_computed_blocks)
        if self.stores_on_compute:
            if len(chunks[-1].block_hashes) < self.chunk_blocks:
                self._store_chunks(chunks[-1:])
            return
        # Chunks that would not be admitted now are no candidates: the lookahead then skips
        # a workload without reuse entirely. One that comes back is freed again, and then is.
        min_hits = self.min_hits
        for chunk in chunks:
            if min_hits > 1 and self._reuse.count(chunk) < min_hits:
                if not self._holds_chunk(chunk):  # stored while it took fewer hits
                    self.stats.num_rejected_min_hits += 1
                continue
            for block_hash in chunk.block_hashes:
                self._candidates[block_hash] = chunk

    def on_evict(self, evicted: list[tuple[BlockHash, int]], reused: bool = True) -> None:
        """BlockPool listener: these device blocks are about to be reused (`reused`), or are
        dropped by a prefix-cache reset. Their data stays intact until the next forward pass,
        so lazy candidates among blocks about to be reused are copied down now: those the
        lookahead did not reach (a step that allocates more than its window, several misses
        and loads admitted together) would otherwise be lost, and their prefix recomputed."""
        rescued: list[Chunk] = []
        candidates = self._candidates
        # The pool evicts several times a step under pressure: a workload without reuse (no
        # candidates) skips the walk.
        for block_hash, _ in evicted if candidates else ():
            chunk = candidates.pop(block_hash, None)
            if chunk is not None:
                for other in chunk.block_hashes:
                    candidates.pop(other, None)
                rescued.append(chunk)
        saved: set[BlockHash] = set()
        if rescued and reused and self.config.kv_store_policy == "lazy":
            # A chunk freed again after it was stored (a shared prefix) is a candidate too.
            held = {c.key for c in rescued if self._holds_chunk(c)}
            room = max(0, _MAX_INFLIGHT_STORES - len(self._storing))
            missing = [c for c in rescued if c.key not in held][:room]
            try:
                self._store_chunks(missing)
            except torch.OutOfMemoryError:
                # The pool is mid-eviction: it must not fail. These prefixes are recomputed.
                logger.warning("no memory to copy %d chunks down as they were evicted",
                               len(missing))
            for chunk in rescued:
                if self._holds_chunk(chunk):
                    if chunk.key not in held:
                        self.stats.num_stores_at_eviction += 1
                    saved.update(chunk.block_hashes)
        unsaved = [block_hash for block_hash, _ in evicted if block_hash not in saved]
        for store in self.stores:  # a batch per tier: the pool evicts every step under pressure
            unsaved = store.missing_blocks(unsaved)
        self.stats.num_evicted_unsaved_blocks += len(unsaved)

    def _holds_chunk(self, chunk: Chunk) -> bool:
        """Whether the first tier has the chunk or is storing it."""
        return chunk.key in self._storing or self.stores[0].has_block(chunk.key)

    def store_lookahead(self, num_blocks: int) -> None:
        """Lazy policy: copy down candidates among the next `num_blocks` to be evicted."""
        candidates = self._candidates
        if self.config.kv_store_policy != "lazy" or not candidates:
            return
        # Runs every step: filter in one comprehension, then loop over the few candidates.
        upcoming = self.pool.next_evictions(num_blocks, among=candidates)
        room = _MAX_INFLIGHT_STORES - len(self._storing)
        chunks: list[Chunk] = []
        for block_hash in upcoming:
            chunk = candidates.get(block_hash)
            if chunk is None:
                continue  # taken just now, with an earlier block of its chunk
            if len(chunks) >= room:
                break
            for other in chunk.block_hashes:
                candidates.pop(other, None)
            chunks.append(chunk)
        self._store_chunks(chunks)

    def flush_candidates(self) -> None:
        """Store every lazy candidate still on the device (graceful shutdown: a disk tier
        then keeps what the device held; a prefix-cache reset: the tiers keep it)."""
        self._store_chunks(list({id(c): c for c in self._candidates.values()}.values()))
        self._candidates.clear()

    def _store_chunks(self, chunks: list[Chunk]) -> None:
        """Copy admitted chunks, whose blocks are all still on the device, down to the first
        tier: one gather for all of them (on CUDA one index upload, and one event), which
        captures the blocks before any later forward pass can overwrite them, so blocks
        being evicted can go to their new owners at once."""
        ready: list[tuple[Chunk, list[int]]] = []
        for chunk in chunks:
            if not self._admit(chunk):
                continue
            block_ids = [self.pool.get_cached_block(h) for h in chunk.block_hashes]
            if any(b is None for b in block_ids):
                continue  # part of the chunk already left the device
            ready.append((chunk, [b for b in block_ids if b is not None]))
        if not ready:
            return
        gathered_chunks = self.transfer.gather([ids for _, ids in ready])
        for (chunk, ids), gathered in zip(ready, gathered_chunks, strict=True):
            self._start_store(chunk, ids, gathered)

    def _start_store(self, chunk: Chunk, ids: list[int], gathered: GatheredBlocks) -> None:
        self._storing.add(chunk.key)
        self.stats.num_stores_started += 1
        meta = EntryMeta(chunk.key, chunk.block_hashes,
                         len(ids) * self.stores[0].layout.block_bytes)
        if self._inline and self.stores[0].name == "cpu":
            handle = self.stores[0].prepare_store(meta)
            if handle is None:
                self._handle("store", chunk.key)
                return
            event = self.transfer.copy_out_async(gathered, handle.buffer)
            self._event_stores.append((event, handle, chunk.key))
            return
        self._workers.submit(self._run_store, meta, gathered)

    def _run_store(self, meta: EntryMeta, gathered: object) -> None:
        store = self.stores[0]
        try:
            handle = store.prepare_store(meta)
            if handle is not None:
                ok = True
                try:
                    self.transfer.copy_out(gathered, handle.buffer)  # type: ignore[arg-type]
                except Exception:
                    logger.exception("store copy failed")
                    ok = False
                store.complete_store(handle, ok)
        except Exception:
            logger.exception("store of %s failed", meta.key.hex())
        self._done.put(("store", meta.key))

    def write_down(self) -> int:
        """Copy every entry of each tier that the tier below lacks into it, oldest first, so
        the newest survive where the lower tier is smaller (graceful shutdown: a disk tier
        under a host-memory one then keeps what both held). Returns the entries copied.

        Only the newest entries that fit in the lower tier are copied: older ones would only
        be evicted by the newer. So no copy evicts another, and the copies and the writes
        (files, the network) run READ_AHEAD at a time in the reader threads, as loads' reads
        do; room is taken in order, here, from what the lower tier held before."""
        copied = 0
        for upper, lower in itertools.pairwise(self.stores):
            missing = [meta for meta in upper.ready_entries() if not lower.has_block(meta.key)]
            room, newest = lower.capacity_bytes, 0
            for meta in reversed(missing):
                room -= lower.charged_bytes(meta)
                if room < 0:
                    break
                newest += 1
            writes: deque[Future] = deque()
            errors = lower.stats.num_errors
            for meta in missing[len(missing) - newest:]:
                if lower.stats.num_errors > errors:
                    # A write failed: a Redis server that stops answering costs each write
                    # its timeouts (~10 s), so copying on would hold the shutdown for many
                    # minutes, only to fail the same way.
                    logger.warning("tier %s: a write failed; not copying the rest into it",
                                   lower.name)
                    break
                handle = lower.prepare_store(meta)
                if handle is None:
                    continue
                if len(writes) >= self._read_ahead:
                    copied += writes.popleft().result()
                writes.append(self._readers.submit(_copy_down, upper, lower, handle))
            copied += sum(write.result() for write in writes)  # before the next pair reads
        return copied

    def _demoter(self, lower: TierStore):  # noqa: ANN202 - closure type
        def demote(meta: EntryMeta, payload) -> None:  # noqa: ANN001
            handle = _staged_copy(lower, meta, payload)
            if handle is not None:
                self._io.submit(lower.complete_store, handle, True)
        return demote

    def close(self) -> None:
        self._closed = True
        self._loaders.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._workers.shutdown(wait=True)
        self._io.shutdown(wait=True)
        for store in self.stores:
            store.close()


def _copy_down(upper: TierStore, lower: TierStore, handle: StoreHandle) -> int:
    """Fill and complete a lower tier's new entry from the upper tier's; 1 where it was
    copied, 0 where the upper entry went meanwhile (the lower one is then given up) or the
    lower tier's write failed."""
    payload = upper.payload_copy(handle.meta.key)
    if payload is not None:
        handle.buffer.copy_(payload)
    lower.complete_store(handle, payload is not None)
    return int(payload is not None and lower.has(handle.meta.key))


def _staged_copy(store: TierStore, meta: EntryMeta,
                 payload: torch.Tensor) -> StoreHandle | None:
    """The payload copied into a store's new entry, ready to complete; None where the store
    already holds it or has no room."""
    if store.has_block(meta.key):
        return None
    handle = store.prepare_store(meta)
    if handle is not None:
        handle.buffer.copy_(payload)
    return handle
