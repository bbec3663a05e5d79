"""Continuous batching with chunked prefill, prefix-cache reuse and preemption by recompute.

Each `schedule()` fills one step's token budget in priority order:

0. loads from the KV tiers that finished since the last step turn their requests RUNNING;
1. running requests, oldest first: one token for a decode, the next chunk for a prefill;
   when blocks run out, the newest running request is preempted (its blocks freed, its
   progress reset to zero; the prefix cache usually gives most of it back on resumption);
2. waiting requests, FCFS, each starting after its longest cached prefix, while the budget,
   `max_num_seqs` and free blocks allow (not in a step that had to preempt). A request whose
   next uncached block another request is computing (a prefix two waiting requests share,
   before either has run) is passed over until that block is cached, so the prefix is
   computed once and the second request starts after it. With `short_prefill_first_tokens`,
   a step that prefills a short remainder (a cache hit's suffix) holds waiting requests with
   long prefills for one prefill step, so the hit's first token does not wait for them. A
   step skips admission when the last attempt ran out of blocks and nothing since could
   change that. When the KV tiers hold more of the prefix and loading it pays, the request
   instead gets blocks for it and waits LOADING (off the budget) while the transfer runs and
   the batch keeps stepping (a load that finished inline, see `tiers.manager.INLINE_LOAD_S`,
   is scheduled at once).

`update_from_output()` then advances computed-token counts, registers newly full blocks in the
prefix cache, appends sampled tokens and finishes requests on token-level stop conditions.
No torch here: the runner receives a `SchedulerOutput` of ids and counts.

With async scheduling `schedule()` runs again before the last step's results are applied: a
request's tokens of that step count as in flight, a decode of its still unknown sampled token
gets `PENDING_TOKEN_ID`, and a request that token ends by length is not scheduled again. A
request preempted while its step runs keeps the token that step samples.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from kvtier.config import SchedulerConfig
from kvtier.kv.manager import KVCacheManager
from kvtier.request import Request, RequestStatus
from kvtier.tiers.manager import TierManager
from kvtier.types import (
    PENDING_TOKEN_ID,
    BlockHash,
    FinishReason,
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from kvtier.utils.math import cdiv

LPM_WINDOW = 128
"""Waiting requests the lpm policy ranks per admission (bounds the per-step cost)."""
LPM_MAX_WAIT_S = 5.0
"""Under lpm, a request waiting longer than this is admitted next regardless of its prefix."""


@dataclass(frozen=True)
class _AdmissionState:
    """What decides whether a waiting request can get its blocks. Admission that ran out of
    blocks at one state runs out again at a later one with no more free blocks, the same
    cached blocks (none registered, none evicted: the same hits, so the same ranking and the
    same needs), no new request, no finished tier load, the same order policy and no long
    prefill held since (short prefills first): the step then skips it. Under KV pressure
    most steps would otherwise rank the queue, look up the tiers and fail again: ~1 ms of
    host time each on workload P, with the device idle."""

    free_blocks: int
    num_cached_total: int
    num_evictions: int
    num_arrivals: int
    num_loads_finished: int
    fcfs_order: bool
    """The admission order fell back to arrival order (lpm's aged or preempted head)."""
    num_long_prefills_held: int
    """Holding a long prefill (short prefills first) changes the order of the next attempt."""

    def still_fails(self, now: _AdmissionState) -> bool:
        return (now.free_blocks <= self.free_blocks
                and now.num_cached_total == self.num_cached_total
                and now.num_evictions == self.num_evictions
                and now.num_arrivals == self.num_arrivals
                and now.num_loads_finished == self.num_loads_finished
                and now.fcfs_order == self.fcfs_order
                and now.num_long_prefills_held == self.num_long_prefills_held)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager,
                 tiers: TierManager | None = None) -> None:
        self.config = config
        self.kv = kv_manager
        self.tiers = tiers
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}
        self._freed_since_last_step: list[str] = []
        self._finished_in_flight: dict[str, Request] = {}
        """Finished requests (aborted, stopped) still in a launched step (async scheduling):
        that step's results are theirs, so their ids stay in use until it is applied."""
        self.num_preemptions = 0
        self.num_deferred_shared_prefixes = 0
        """Admissions passed over because another request was computing their next block."""
        self._num_arrivals = 0
        self._num_loads_finished = 0
        self._failed_admission: _AdmissionState | None = None
        self.num_skipped_admissions = 0
        """Steps that skipped admission: the last attempt ran out of blocks, nothing since
        could let a waiting request in."""
        self.num_long_prefills_held = 0
        """Long prefills held for one prefill step behind short ones (short_prefill_first)."""
        self.separate_prefill_steps = False
        """Set by the engine when decode-only steps are much cheaper (CUDA graphs): steps then
        carry either prefill chunks or decodes, alternating while both are pending."""
        self._last_step_prefilled = False
        self._stored_ahead = False
        """`store_ahead` ran since the last `schedule`: its window covered that step."""
        self.lookahead_after_store_ahead = False
        """Also walk the window in `schedule` when `store_ahead` already did (the earlier
        behaviour, kept for A/B runs: `scripts/s_tier_cost_gpu.py`)."""

    # -- request lifecycle -------------------------------------------------------------------

    def request_id_in_use(self, request_id: str) -> bool:
        """A live request has it, or an aborted one whose tier load has yet to report (its
        blocks, found by id, are freed then: a new request with the id would lose its own),
        or a finished one with a step in flight (`_finished_in_flight`)."""
        return (request_id in self.requests or request_id in self.loading
                or request_id in self._finished_in_flight)

    def add_request(self, request: Request) -> None:
        if self.request_id_in_use(request.request_id):
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self._num_arrivals += 1

    def finish_request(self, request_id: str, reason: FinishReason,
                       stop_reason: str | int | None = None) -> Request | None:
        """Finish a live request (abort, stop string); frees its blocks at once."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        request.stop_reason = stop_reason
        if request.status is RequestStatus.LOADING:
            # A transfer is still writing its blocks: they are freed when it reports done.
            self._finish(request, reason, free_blocks=False)
            return request
        if request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
            # The queue changed: a failed admission says nothing of the requests behind it.
            self._failed_admission = None
        else:
            self.running.remove(request)
        self._finish(request, reason)
        return request

    def _finish(self, request: Request, reason: FinishReason, free_blocks: bool = True) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.metrics.finished_time = time.monotonic()
        if free_blocks:
            self._free_blocks(request)
        if request.num_inflight_tokens:
            # A new request reusing the id would otherwise be given this one's results.
            self._finished_in_flight[request.request_id] = request
        del self.requests[request.request_id]
        self._freed_since_last_step.append(request.request_id)

    def _free_blocks(self, request: Request) -> None:
        if self.tiers is not None and self.kv.enable_caching:
            self.tiers.on_request_freed(self.kv.block_hashes(request),
                                        request.num_computed_tokens // self.kv.block_size)
        self.kv.free(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self.loading)

    def has_tokens_in_flight(self) -> bool:
        """Whether a launched step's results are still to be applied (async scheduling)."""
        return any(r.num_inflight_tokens for r in self.running) or any(
            r.num_inflight_tokens for r in self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- scheduling --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        if self.tiers is not None:
            self._finish_loads()
        running_prefill = any(r.num_unscheduled_tokens > 1 for r in self.running)
        kinds = self._step_kinds(running_prefill)
        if self.tiers is not None and (not self._stored_ahead
                                       or self.lookahead_after_store_ahead):
            # Blocks the step may evict: copy down lazy-store candidates among them first. A
            # step without prefill work takes at most a block per running request (most steps
            # under KV pressure), so it looks ~40 blocks ahead instead of ~600.
            # Where `store_ahead` ran after the last launch (CUDA), it looked over the most
            # this step can allocate while the device worked; only blocks freed since (tail of
            # the eviction order) can be new, and a candidate among those that this step
            # evicts is copied down at its eviction. Walking the window again here, between
            # steps, cost workload S ~0.1 ms a step for nothing.
            self.tiers.store_lookahead(self._lazy_store_window(
                self._may_prefill(kinds, budget, running_prefill)))
        self._stored_ahead = False
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        budget = self._schedule_running(budget, kinds, scheduled, preempted)
        if not preempted and "prefill" in kinds:
            budget = self._admit_waiting(budget, scheduled)
        if not scheduled and kinds == ("prefill",):  # nothing could be admitted after all
            budget = self._schedule_running(budget, ("decode",), scheduled, preempted)
        self._last_step_prefilled = any(not s.sample or len(s.token_ids) > 1
                                        for s in scheduled)
        # Decodes first: the runner batches single-token queries together.
        scheduled.sort(key=lambda s: len(s.token_ids) != 1 or not s.sample)
        finished, self._freed_since_last_step = self._freed_since_last_step, []
        return SchedulerOutput(
            requests=scheduled,
            num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
            preempted_request_ids=preempted,
            finished_request_ids=finished,
        )

    def store_ahead(self) -> None:
        """Lazy tier stores for the next step, once this step is launched: the device runs the
        step meanwhile, so copying down the candidates the next step may evict costs no time
        between steps (a missed prompt under KV pressure evicts ~17 chunks' worth of blocks).
        The window is the most a step can allocate, so `schedule` does not look again (what
        is freed meanwhile and evicted next is copied down at its eviction). Only where the
        device runs the step without the host (CUDA): on the CPU it would only widen the
        window."""
        if self.tiers is None or not self.tiers.stores_overlap_compute:
            return
        self.tiers.store_lookahead(self._lazy_store_window(may_prefill=True))
        self._stored_ahead = True

    def _lazy_store_window(self, may_prefill: bool) -> int:
        """Blocks a step may allocate, plus a chunk: a block per running request, and the
        token budget's worth when it may take prompt tokens."""
        assert self.tiers is not None
        prefill_blocks = (self.config.max_num_batched_tokens // self.kv.block_size
                          if may_prefill else 0)
        return len(self.running) + prefill_blocks + self.tiers.chunk_blocks

    def _step_kinds(self, running_prefill: bool) -> tuple[str, ...]:
        """Which work this step takes: both (mixed steps), or prefill or decode alone.
        `running_prefill`: a running request still has prompt tokens to compute."""
        if not self.separate_prefill_steps:
            return ("decode", "prefill")
        has_decodes = any(r.num_unscheduled_tokens == 1 for r in self.running)
        has_prefills = bool(self.waiting) or running_prefill
        if has_prefills and not (has_decodes and self._last_step_prefilled):
            return ("prefill",)
        return ("decode",)

    def _may_prefill(self, kinds: tuple[str, ...], budget: int, running_prefill: bool) -> bool:
        """Whether this step can take prompt tokens: a running prefill to continue, or a
        waiting request that admission would let in."""
        if "prefill" not in kinds:
            return False
        if running_prefill:
            return True
        return bool(self.waiting) and not self._admission_blocked(budget)

    def _schedule_running(self, budget: int, kinds: tuple[str, ...],
                          scheduled: list[ScheduledRequest], preempted: list[str]) -> int:
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            remaining = request.num_unscheduled_tokens
            if remaining <= 0 or self._ends_before_next_token(request):
                continue
            if ("decode" if remaining == 1 else "prefill") not in kinds:
                continue
            num_new = self._chunk(remaining, budget)
            # In-flight tokens hold their slots already: allocate past them.
            if not self._allocate_or_preempt(request, request.num_inflight_tokens + num_new,
                                             preempted):
                continue
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        return budget

    @staticmethod
    def _ends_before_next_token(request: Request) -> bool:
        """Whether a pending token will end the request by length (async scheduling): no
        step may compute past it. Stop tokens and strings are only known once read, so a
        request they end may have one more step in flight, whose token is dropped."""
        if not request.num_pending_outputs:
            return False
        num_outputs = request.num_output_tokens + request.num_pending_outputs
        return (num_outputs >= request.sampling_params.max_tokens
                or request.num_tokens + request.num_pending_outputs >= request.max_model_len)

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens a request computes this step: the rest of its prompt (or its one decode
        token), capped by `long_prefill_token_threshold` and the step's budget."""
        cap = self.config.long_prefill_token_threshold
        return min(cap if 0 < cap < remaining else remaining, budget)

    def _allocate_or_preempt(self, request: Request, num_new: int,
                             preempted: list[str]) -> bool:
        """Allocate for `request`, preempting the newest running requests until it fits."""
        while not self.kv.allocate_slots(request, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._free_blocks(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admission_order(self, arrival_order: bool) -> list[Request]:
        """The waiting queue as it is (`arrival_order`: FCFS, or lpm with a preempted or
        long-waiting head), else lpm's: the first LPM_WINDOW waiting requests ranked by how
        much of their prefix the device holds (ties keep arrival order), then the rest."""
        waiting = list(self.waiting)
        if len(waiting) == 1 or arrival_order:
            return waiting
        window = waiting[:LPM_WINDOW]
        hits = {id(r): self.kv.estimate_cached_blocks(r) for r in window}
        window.sort(key=lambda r: -hits[id(r)])  # stable: ties keep arrival order
        return window + waiting[LPM_WINDOW:]

    def _arrival_order_first(self) -> bool:
        """Whether admission takes the waiting queue in arrival order: FCFS, or lpm with a
        preempted or long-waiting head."""
        head = self.waiting[0]
        return (self.config.scheduling_policy == "fcfs"
                or head.status is RequestStatus.PREEMPTED
                or time.monotonic() - head.arrival_time > LPM_MAX_WAIT_S)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        # Checked before ranking too: under KV pressure most steps admit nothing, and LPM's
        # ranking hashes every request in its window.
        if not self.waiting or self._admission_blocked(budget):
            return budget
        state = self._admission_state()
        if self._failed_admission is not None and self._failed_admission.still_fails(state):
            self.num_skipped_admissions += 1
            return budget
        self._failed_admission = None
        being_computed = self._blocks_being_computed()
        short = self.config.short_prefill_first_tokens
        long_ones: list[Request] = []
        first_admitted = len(scheduled)
        for request in self._admission_order(state.fcfs_order):
            if short and not request.short_prefill_waited and self._is_long(request, short):
                long_ones.append(request)  # admitted below, unless short work takes the step
                continue
            budget, stopped = self._admit_one(request, budget, scheduled, being_computed)
            if stopped:
                # Admission stops here, as it would without the option: the long requests
                # set aside so far (all ahead of this one) are still tried or held below.
                break
        if not long_ones:
            return budget
        # Short work: what this loop admitted (not running requests' chunks).
        if any(len(s.token_ids) <= short for s in scheduled[first_admitted:]):
            for request in long_ones:  # one prefill step later, whatever waits then
                request.short_prefill_waited = True
            self.num_long_prefills_held += len(long_ones)
            return budget
        for request in long_ones:  # no short work: as without the option
            budget, stopped = self._admit_one(request, budget, scheduled, being_computed)
            if stopped:
                break
        return budget

    def _admit_one(self, request: Request, budget: int, scheduled: list[ScheduledRequest],
                   being_computed: set[BlockHash]) -> tuple[int, bool]:
        """Admit one waiting request if it fits (or start its tier load); returns the budget
        left and whether admission stops for this step."""
        if self._admission_blocked(budget):
            return budget, True
        if request.num_inflight_tokens:
            return budget, False  # preempted while its last step runs: resumed after it
        hit_blocks, num_hit_tokens = self.kv.get_computed_blocks(request)
        # A request scoring its prompt takes no cache hit, so it has nothing to wait for.
        if being_computed and request.sampling_params.prompt_logprobs is None and \
                self._next_block_being_computed(request, len(hit_blocks), being_computed):
            self.num_deferred_shared_prefixes += 1
            return budget, False
        if (self.tiers is not None and self.kv.enable_caching
                and request.sampling_params.prompt_logprobs is None):
            started = self._try_tier_load(request, hit_blocks)
            if started is None:
                return budget, True  # its next blocks are being loaded for another request
            if started:
                if request.status is RequestStatus.RUNNING:  # loaded inline: go on now
                    budget = self._schedule_loaded(request, budget, scheduled)
                return budget, False
        num_new = self._chunk(request.num_tokens - num_hit_tokens, budget)
        if not self.kv.allocate_slots(request, num_new, hit_blocks):
            # Taken now, after whatever this attempt admitted or started loading: what those
            # change (fewer free blocks, blocks cached or loads finished later) keeps or ends
            # the skip correctly.
            self._failed_admission = self._admission_state()
            return budget, True
        self.waiting.remove(request)
        self._start(request, num_hit_tokens, RequestStatus.RUNNING)
        self.running.append(request)
        scheduled.append(self._scheduled(request, num_new))
        budget -= num_new
        if self.kv.enable_caching:
            being_computed.update(self._uncomputed_prompt_hashes(request))
        return budget, False

    def _is_long(self, request: Request, short: int) -> bool:
        """Whether the request has more than `short` prompt tokens to compute beyond what the
        device cache and the tiers hold. An estimate, cheap enough for every waiting request
        of every prefill step: the device's share by binary search, and the tiers' by whether
        they hold the block that would leave at most `short` tokens."""
        block_size = self.kv.block_size
        if request.num_tokens - self.kv.estimate_cached_blocks(request) * block_size <= short:
            return False
        if self.tiers is None or not self.kv.enable_caching:
            return True
        hashes = self.kv.block_hashes(request)
        last_needed = min(cdiv(request.num_tokens - short, block_size), len(hashes)) - 1
        return last_needed < 0 or not self.tiers.holds_block(hashes[last_needed])

    def _admission_state(self) -> _AdmissionState:
        return _AdmissionState(self.kv.num_free_blocks, self.kv.pool.num_cached_total,
                               self.kv.pool.num_evictions,
                               self._num_arrivals, self._num_loads_finished,
                               self._arrival_order_first(), self.num_long_prefills_held)

    def _uncomputed_prompt_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the full prompt blocks the request holds but has not computed yet."""
        first = request.num_computed_tokens // self.kv.block_size
        last = request.num_prompt_tokens // self.kv.block_size
        return self.kv.block_hashes(request)[first:last] if first < last else []

    def _blocks_being_computed(self) -> set[BlockHash]:
        """Full prompt blocks that running prefills will compute (this step or later ones)."""
        if not self.kv.enable_caching:
            return set()
        being_computed: set[BlockHash] = set()
        for request in self.running:
            if request.num_computed_tokens < request.num_prompt_tokens:
                being_computed.update(self._uncomputed_prompt_hashes(request))
        return being_computed

    def _next_block_being_computed(self, request: Request, num_hit_blocks: int,
                                   being_computed: set[BlockHash]) -> bool:
        """Whether the request's first block beyond its cache hit is another request's work
        in progress: admitting it now would compute the same prefix twice."""
        if num_hit_blocks >= (request.num_tokens - 1) // self.kv.block_size:
            return False  # nothing left to share: its last blocks are its own
        return self.kv.block_hashes(request)[num_hit_blocks] in being_computed

    def _admission_blocked(self, budget: int) -> bool:
        if budget <= 0 or len(self.running) + len(self.loading) >= self.config.max_num_seqs:
            return True
        # Keep room for running requests to grow instead of preempting them.
        return bool(self.running) and self.kv.num_free_blocks < self._watermark_blocks()

    def _schedule_loaded(self, request: Request, budget: int,
                         scheduled: list[ScheduledRequest]) -> int:
        """Schedule the rest of the prompt of a request whose tier load finished inline."""
        num_new = self._chunk(request.num_tokens - request.num_computed_tokens, budget)
        if num_new > 0 and self.kv.allocate_slots(request, num_new):
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        return budget  # otherwise it waits in `running` for the next step

    def _watermark_blocks(self) -> int:
        """Free blocks kept back from new requests: one decode block per running request."""
        return len(self.running)

    def _start(self, request: Request, num_hit_tokens: int, status: RequestStatus) -> None:
        request.num_computed_tokens = num_hit_tokens
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = time.monotonic()
        if request.num_output_tokens == 0:
            # The admission that yields the first token is the one its counts describe; an
            # earlier one (preempted before that token) is forgotten, not added to.
            request.metrics.num_cached_tokens = num_hit_tokens
            request.metrics.num_tier_hit_tokens = {"device": num_hit_tokens}
        request.status = status

    def _try_tier_load(self, request: Request, hit_blocks: list[int]) -> bool | None:
        """Start loading the prefix beyond the device hit from the tiers if that pays.
        True: started (request now LOADING); False: nothing to load; None: must wait."""
        assert self.tiers is not None
        hashes = self.kv.block_hashes(request)
        if not request.tier_noted:
            request.tier_noted = True
            self.tiers.note_request(hashes)
        first = len(hit_blocks)
        max_blocks = (request.num_tokens - 1) // self.kv.block_size
        if first >= max_blocks:
            return False
        if self.tiers.is_loading(hashes[first]):
            return None
        plan = self.tiers.lookup(hashes, first, max_blocks)
        if plan is None:
            return False
        if not self.kv.allocate_slots(request, plan.num_blocks * self.kv.block_size, hit_blocks):
            self.tiers.release_plan(plan)
            return False
        self.waiting.remove(request)
        self._start(request, len(hit_blocks) * self.kv.block_size, RequestStatus.LOADING)
        self.loading[request.request_id] = request
        table = self.kv.block_table(request.request_id)
        if self.tiers.start_load(request.request_id, plan, table[first:first + plan.num_blocks],
                                 hashes[first:]):
            self._finish_loads()
        return True

    def _finish_loads(self) -> None:
        assert self.tiers is not None
        for result in self.tiers.poll():
            request = self.loading.pop(result.request_id)
            self._num_loads_finished += 1
            if request.is_finished:  # aborted while its blocks were being written
                self.kv.free(request)
                continue
            loaded = result.num_loaded_blocks * self.kv.block_size
            request.num_computed_tokens += loaded
            self.kv.cache_computed_blocks(request)
            if request.num_output_tokens == 0:  # see _start
                request.metrics.num_cached_tokens += loaded
                for tier, blocks in result.hit_blocks_per_tier.items():
                    request.metrics.num_tier_hit_tokens[tier] = blocks * self.kv.block_size
            request.status = RequestStatus.RUNNING
            self.running.append(request)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        """The request's share of the step; counts its tokens in flight until the step's
        results are applied (`update_from_output`)."""
        start = request.num_computed_tokens + request.num_inflight_tokens
        token_ids = request.all_token_ids[start:start + num_new]
        if len(token_ids) < num_new:  # async scheduling: a decode of the pending token
            assert num_new == 1 and request.num_pending_outputs == 1, "one pending decode"
            token_ids = [PENDING_TOKEN_ID]
        targets, first_row = ((), 0)
        if request.sampling_params.prompt_logprobs is not None:
            targets, first_row = self._prompt_logprob_targets(request, start, num_new)
        num_outputs = request.num_output_tokens + request.num_pending_outputs
        sample = start + num_new == request.num_tokens + request.num_pending_outputs
        scheduled = ScheduledRequest(
            request_id=request.request_id,
            token_ids=token_ids,
            num_computed_tokens=start,
            block_ids=self.kv.block_table(request.request_id),
            sample=sample,
            sampling_params=request.sampling_params,
            num_output_tokens=num_outputs,
            penalty_context=((request.prompt_token_ids, request.output_token_ids)
                             if request.sampling_params.needs_token_context else None),
            suppressed_token_ids=(self._suppressed(request, num_outputs)
                                  if request.sampling_params.min_tokens else ()),
            prompt_logprob_targets=targets,
            prompt_logprob_first_row=first_row,
        )
        request.num_inflight_tokens += num_new
        request.num_pending_outputs += sample
        return scheduled

    @staticmethod
    def _prompt_logprob_targets(request: Request, start: int,
                                num_new: int) -> tuple[tuple[int, ...], int]:
        """The prompt tokens a chunk [start, start + num_new) scores, and the chunk row that
        predicts the first: position p's token is predicted by the row before it, the last
        prompt token's row predicts the first output. Positions scored before a preemption
        are not scored again."""
        first = max(start + 1, len(request.prompt_logprobs) + 1)
        last = min(start + num_new, request.num_prompt_tokens - 1)
        if first > last:
            return (), 0
        return tuple(request.prompt_token_ids[first:last + 1]), first - 1 - start

    @staticmethod
    def _suppressed(request: Request, num_outputs: int) -> tuple[int, ...]:
        """What the next token cannot be while the output (`num_outputs` tokens, pending
        ones included) is shorter than min_tokens: EOS (with ignore_eos too, as vLLM masks
        it) and the stop token ids."""
        params = request.sampling_params
        if num_outputs >= params.min_tokens:
            return ()
        return tuple(sorted({*request.eos_token_ids, *params.stop_token_ids}))

    # -- results -----------------------------------------------------------------------------

    def update_from_output(self, output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[Request]:
        """Apply a step's results; returns the requests that got a new token (some finished)."""
        now = time.monotonic()
        updated: list[Request] = []
        # Write-through stores: decided once per step, not per request (a busy step is
        # hundreds of rows, and this loop is on the host's path to the next launch).
        tiers = (self.tiers if self.tiers is not None and self.tiers.stores_on_compute
                 and self.kv.enable_caching else None)
        for scheduled in output.requests:
            finished = self._finished_in_flight.get(scheduled.request_id)
            if finished is not None:  # finished (or aborted) since the step was scheduled
                finished.num_inflight_tokens -= len(scheduled.token_ids)
                finished.num_pending_outputs -= scheduled.sample
                if not finished.num_inflight_tokens:
                    del self._finished_in_flight[scheduled.request_id]
                continue
            request = self.requests.get(scheduled.request_id)
            if request is None:  # gone with nothing of it left in flight
                continue
            request.num_inflight_tokens -= len(scheduled.token_ids)
            request.num_pending_outputs -= scheduled.sample
            if request.status is not RequestStatus.RUNNING:
                # Preempted while the step ran (async scheduling): its KV is gone and is
                # recomputed on resumption, but its sampled token is kept, so that a seeded
                # request's stream does not depend on when it was preempted.
                if scheduled.sample:
                    reason = self._append_sampled(request, runner_output, now)
                    if reason is not None:
                        self.waiting.remove(request)
                        self._finish(request, reason, free_blocks=False)  # freed already
                    updated.append(request)
                continue
            request.num_computed_tokens += len(scheduled.token_ids)
            self.kv.cache_computed_blocks(request)
            if scheduled.prompt_logprob_targets:
                request.prompt_logprobs.extend(runner_output.prompt_logprobs[request.request_id])
            if tiers is not None:
                request.num_tier_handled_blocks = tiers.on_blocks_computed(
                    self.kv.block_hashes(request),
                    request.num_computed_tokens // self.kv.block_size,
                    request.num_tier_handled_blocks)
            if not scheduled.sample:
                continue
            reason = self._append_sampled(request, runner_output, now)
            if reason is not None:
                self.running.remove(request)
                self._finish(request, reason)
            updated.append(request)
        return updated

    @staticmethod
    def _append_sampled(request: Request, runner_output: ModelRunnerOutput,
                        now: float) -> FinishReason | None:
        """Append the step's sampled token (and logprobs); the token-level stop condition
        that now ends the request, if any."""
        request.append_output_token(runner_output.sampled_token_ids[request.request_id])
        if request.sampling_params.logprobs is not None:
            request.output_logprobs.append(runner_output.logprobs[request.request_id])
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        return request.check_stop_token()
