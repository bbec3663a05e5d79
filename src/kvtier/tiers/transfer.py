"""Moving KV blocks between the device cache and host buffers (the only torch code in tiers).

One copy per entry, never one per layer per block: the entry's blocks of every layer are
gathered into one contiguous buffer (layout (layers, 2, blocks, block_size, kv_heads, dim)) and
moved in one copy.

On CUDA everything is enqueued from the scheduler thread and tracked with events (no transfer
thread: a thread would wait on the GIL behind the busy scheduler for milliseconds per copy):
- store: the gathers of a step's chunks are enqueued on the *compute* stream (one index upload,
  one event), so they are ordered before any later forward pass that could overwrite those
  blocks; each device->host copy then runs on the store stream after that event. No block
  stays pinned.
- load: the chunks' host->device copies run on the load stream and their scatters into the
  paged cache on a scatter stream, a group of chunks after its copies' event, so the copy
  engine moves the next group while the SMs scatter this one (on one stream it idled during
  every scatter: ~20% of a long load). The request runs once the load's event completed, or
  at once with its forward ordered after that event (`same-step`). (Disk reads still go
  through a transfer thread.)
On the CPU the copies are plain tensor copies in the transfer thread (torch releases the GIL);
the blocks involved stay pinned in the block pool until the copy ends.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kvtier.utils.device import upload_ids


@dataclass(frozen=True)
class LoadPart:
    """Blocks first..first+count-1 of an entry's host payload (of entry_blocks blocks)."""

    payload: torch.Tensor
    entry_blocks: int
    first: int
    count: int


LOAD_GROUP_PARTS = 4
"""`copy_in_parts` scatters a load's parts in groups of this many, each group after its
copies' event: the copy engine moves the next group while the SMs scatter this one, and the
host records one event per group instead of one per chunk."""


@dataclass
class GatheredBlocks:
    """Blocks captured for a store: their copy (on CUDA a device tensor, with the event after
    the gather that made it), read by the copy to the tier."""

    block_ids: list[int]
    data: torch.Tensor | None = None
    event: torch.cuda.Event | None = None


class KVTransfer:
    def __init__(self, kv_cache: torch.Tensor) -> None:
        """kv_cache: (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)."""
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.is_cuda = self.device.type == "cuda"
        self.block_shape = kv_cache.shape[3:]
        if self.is_cuda:
            self.store_stream = torch.cuda.Stream(self.device)
            self.load_stream = torch.cuda.Stream(self.device)
            self.scatter_stream = torch.cuda.Stream(self.device)

    def entry_view(self, payload: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """A uint8 payload seen as (layers, 2, num_blocks, block_size, kv_heads, dim)."""
        shape = (self.kv_cache.shape[0], 2, num_blocks, *self.block_shape)
        return payload.view(self.kv_cache.dtype).view(shape)

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.int64, device=self.device)

    def _upload_index(self, block_ids: list[int]) -> torch.Tensor:
        """Block ids on the device, uploaded from pinned memory without blocking the host
        (a pageable upload would wait for the compute stream to drain)."""
        return upload_ids(block_ids, self.device)

    # -- store: device -> host ---------------------------------------------------------------

    def gather(self, chunks: list[list[int]]) -> list[GatheredBlocks]:
        """Scheduler thread, before the next forward pass that may overwrite the blocks:
        capture the blocks of several chunks, so that the blocks are free to be reused at
        once (nothing stays pinned while a store copies). On CUDA one index upload serves
        them all, each chunk is one `index_select` on the compute stream, and one event
        follows the last. On the CPU each chunk is copied here. Letting a transfer thread
        read the blocks later instead pinned them for a step or more, just when admission
        needed them (the lookahead picks the blocks about to be evicted): make run's
        ShareGPT took 12% more steps with the tier, in smaller prompt steps."""
        if not self.is_cuda:
            return [GatheredBlocks(block_ids, self.kv_cache.index_select(
                2, self._index(block_ids))) for block_ids in chunks]
        index = self._upload_index([b for block_ids in chunks for b in block_ids])
        event = torch.cuda.Event()  # recorded after the last gather
        gathered, start = [], 0
        for block_ids in chunks:
            data = self.kv_cache.index_select(2, index[start:start + len(block_ids)])
            gathered.append(GatheredBlocks(block_ids, data, event))
            start += len(block_ids)
        event.record()
        return gathered

    def copy_out(self, gathered: GatheredBlocks, payload: torch.Tensor) -> None:
        """Transfer thread: write the gathered blocks into a host payload buffer; blocks until
        the copy is done."""
        dest = self.entry_view(payload, len(gathered.block_ids))
        assert gathered.data is not None
        if not self.is_cuda:
            dest.copy_(gathered.data)
            gathered.data = None
            return
        assert gathered.event is not None
        with torch.cuda.stream(self.store_stream):
            self.store_stream.wait_event(gathered.event)
            dest.copy_(gathered.data, non_blocking=True)
            gathered.data.record_stream(self.store_stream)
        self.store_stream.synchronize()
        gathered.data = None

    def copy_out_async(self, gathered: GatheredBlocks, payload: torch.Tensor) -> torch.cuda.Event:
        """CUDA, scheduler thread: enqueue the device->host copy of gathered blocks into a
        pinned payload on the store stream; returns the event that marks it done."""
        assert gathered.data is not None and gathered.event is not None
        dest = self.entry_view(payload, len(gathered.block_ids))
        with torch.cuda.stream(self.store_stream):
            self.store_stream.wait_event(gathered.event)
            dest.copy_(gathered.data, non_blocking=True)
            gathered.data.record_stream(self.store_stream)
            done = torch.cuda.Event()
            done.record()
        gathered.data = None
        return done

    def load_event(self) -> torch.cuda.Event:
        """CUDA: a timing event after everything enqueued for loads so far (copies and
        scatters). One before a load's copies and one after give the copy's own time: the host
        notices the completion only at its next step, which can be tens of milliseconds later."""
        event = torch.cuda.Event(enable_timing=True)
        self.scatter_stream.wait_stream(self.load_stream)  # a load ends with its last scatter
        event.record(self.scatter_stream)
        return event

    def order_compute_after(self, event: torch.cuda.Event) -> None:
        """CUDA: work enqueued on the compute stream from now on waits for `event` (a load's
        copies), without blocking the host."""
        torch.cuda.current_stream(self.device).wait_event(event)

    # -- load: host -> device ----------------------------------------------------------------

    def load_index(self, block_ids: list[int]) -> torch.Tensor:
        """Destination block ids of a whole load, uploaded once (on the load stream)."""
        if not self.is_cuda:
            return self._index(block_ids)
        with torch.cuda.stream(self.load_stream):
            return self._upload_index(block_ids)

    def copy_in(self, payload: torch.Tensor, entry_blocks: int, first: int,
                index: torch.Tensor) -> None:
        """Transfer thread: scatter blocks first..first+len(index)-1 of an entry's payload
        into the device blocks `index` (from `load_index`). On CUDA the copy and scatter are only
        enqueued (the payload must stay valid until `wait_loads`); on the CPU they are done on
        return."""
        count = index.numel()
        if not self.is_cuda:  # straight from the payload: no staging copy
            source = self.entry_view(payload, entry_blocks)[:, :, first:first + count]
            self.kv_cache.index_copy_(2, index, source)
            return
        self.copy_in_parts([LoadPart(payload, entry_blocks, first, count)], index)

    def copy_in_parts(self, parts: list[LoadPart], index: torch.Tensor) -> None:
        """Scheduler thread: enqueue a whole load into the device blocks `index` (from
        `load_index`, in the parts' order). Every payload is copied into one staging buffer
        on the load stream; the scatter stream scatters them group by group (`_scatter`). A
        long load is ~64 chunks, so the host work per chunk is kept to one copy, and a group
        of whole chunks is one scatter call: with a stream switch, an allocation and an event
        per chunk, a slow host fell behind the copy engine (16,384 tokens at 35 instead of
        55 GB/s). On the CPU the same steps run synchronously (tests)."""
        if not parts:
            return
        cuda = self.is_cuda
        if cuda:
            # Only the scatters wait for the compute stream's pending work: gathers there
            # (stores of blocks evicted for this load among them) and any forward pass still
            # reading the blocks read them before they are overwritten. The copies into the
            # staging buffer touch nothing else, so they overlap the forward pass in flight
            # (the cost model times them as the tier's load, not as that pass).
            compute_done = torch.cuda.Event()
            compute_done.record(torch.cuda.current_stream(self.device))
            self.scatter_stream.wait_event(compute_done)
        with torch.cuda.stream(self.load_stream) if cuda else contextlib.nullcontext():
            staged = torch.empty(sum(p.payload.numel() for p in parts), dtype=torch.uint8,
                                 device=self.device)
            offset, block = 0, 0
            for start in range(0, len(parts), LOAD_GROUP_PARTS):
                group = parts[start:start + LOAD_GROUP_PARTS]
                group_offset, group_block = offset, block
                for part in group:
                    end = offset + part.payload.numel()
                    staged[offset:end].copy_(part.payload, non_blocking=True)
                    offset, block = end, block + part.count
                if cuda:
                    copied = torch.cuda.Event()
                    copied.record()
                    self.scatter_stream.wait_event(copied)
                with torch.cuda.stream(self.scatter_stream) if cuda else contextlib.nullcontext():
                    self._scatter(group, staged[group_offset:offset], index[group_block:block])
        if cuda:  # both were allocated on the load stream: keep them for the scatters
            staged.record_stream(self.scatter_stream)
            index.record_stream(self.scatter_stream)

    def _scatter(self, parts: list[LoadPart], staged: torch.Tensor,
                 index: torch.Tensor) -> None:
        """Write staged parts (their payloads back to back) into the device blocks `index`.
        Whole entries of one size (a load of full chunks) go in one indexed write: host work
        per call is what bounds a load of many small parts, not the device."""
        nb = parts[0].entry_blocks
        if all(p.first == 0 and p.count == nb == p.entry_blocks for p in parts):
            shape = (len(parts), self.kv_cache.shape[0], 2, nb, *self.block_shape)
            source = staged.view(self.kv_cache.dtype).view(shape).movedim(0, 2)
            self.kv_cache[:, :, index.view(len(parts), nb)] = source
            return
        offset, block = 0, 0
        for part in parts:
            end = offset + part.payload.numel()
            source = self.entry_view(staged[offset:end], part.entry_blocks)
            self.kv_cache.index_copy_(2, index[block:block + part.count],
                                      source[:, :, part.first:part.first + part.count])
            offset, block = end, block + part.count

    def wait_loads(self) -> None:
        """Transfer thread: block until every enqueued `copy_in` has landed."""
        if self.is_cuda:
            self.load_stream.synchronize()
            self.scatter_stream.synchronize()
