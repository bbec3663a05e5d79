"""Scheduler: token budgets, chunked prefill, prefix reuse and preemption, without a model.

The 'model' here is a deterministic function of the token sequence, so any schedule must
produce the same tokens; what these tests check is the bookkeeping around it.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from kvtier.config import SchedulerConfig
from kvtier.kv import BlockPool, KVCacheManager, root_block_hash
from kvtier.request import Request
from kvtier.scheduler import Scheduler
from kvtier.scheduler import scheduler as scheduler_module
from kvtier.tiers.records import LoadResult
from kvtier.types import (
    PENDING_TOKEN_ID,
    FinishReason,
    ModelRunnerOutput,
    SamplingParams,
    SchedulerOutput,
)

BLOCK = 4


def make_scheduler(num_blocks: int = 64, budget: int = 64, max_seqs: int = 8,
                   caching: bool = True) -> Scheduler:
    pool = BlockPool(num_blocks, enable_caching=caching)
    kv = KVCacheManager(pool, BLOCK, root_block_hash("m"))
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs), kv)


def make_request(rid: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                               ignore_eos=True))


def next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 1000


def run_step(scheduler: Scheduler) -> SchedulerOutput:
    out = scheduler.schedule()
    sampled = {}
    for s in out.requests:
        if s.sample:
            request = scheduler.requests[s.request_id]
            sampled[s.request_id] = next_token(request.all_token_ids)
    scheduler.update_from_output(out, ModelRunnerOutput(sampled))
    scheduler.kv.pool.check_integrity()
    return out


def run_to_end(scheduler: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    steps = []
    while scheduler.has_unfinished_requests():
        steps.append(run_step(scheduler))
        assert len(steps) < max_steps, "scheduler made no progress"
    return steps


def test_prefill_is_chunked_to_the_budget_and_samples_only_at_the_end() -> None:
    scheduler = make_scheduler(budget=16)
    request = make_request("a", list(range(1, 41)), max_tokens=2)
    scheduler.add_request(request)
    chunks = [[(len(s.token_ids), s.sample) for s in step.requests] for step in
              run_to_end(scheduler)]
    assert chunks == [[(16, False)], [(16, False)], [(8, True)], [(1, True)]]
    assert request.num_output_tokens == 2 and request.finish_reason is FinishReason.LENGTH


def test_long_prefill_threshold_caps_each_chunk_and_lets_short_prompts_in() -> None:
    """A 40-token prompt prefills 12 tokens a step although the budget is 64; a 5-token prompt
    admitted beside it runs whole in the first step. The tokens match an uncapped run."""
    def run(threshold: int) -> tuple[list[list[tuple[str, int]]], list[list[int]]]:
        pool = BlockPool(64, enable_caching=True)
        kv = KVCacheManager(pool, BLOCK, root_block_hash("m"))
        scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64,
                                              long_prefill_token_threshold=threshold), kv)
        requests = [make_request("a", list(range(1, 41)), max_tokens=3),
                    make_request("b", [7, 8, 9, 10, 11], max_tokens=3)]
        for request in requests:
            scheduler.add_request(request)
        steps = [[(s.request_id, len(s.token_ids)) for s in step.requests]
                 for step in run_to_end(scheduler)]
        return steps, [r.output_token_ids for r in requests]

    capped, capped_tokens = run(12)
    assert capped[0] == [("a", 12), ("b", 5)]
    assert [n for step in capped for rid, n in step if rid == "a" and n > 1] == [12, 12, 12, 4]
    uncapped, tokens = run(0)
    assert uncapped[0] == [("a", 40), ("b", 5)]
    assert capped_tokens == tokens


def test_long_prefill_threshold_is_validated() -> None:
    with pytest.raises(ValueError, match="long_prefill_token_threshold -1 must be >= 0"):
        SchedulerConfig(long_prefill_token_threshold=-1)


def test_decodes_come_first_and_share_the_budget_with_new_prefills() -> None:
    scheduler = make_scheduler(budget=10)
    scheduler.add_request(make_request("a", [1, 2, 3], max_tokens=5))
    run_step(scheduler)  # a: prefill, samples its first token
    scheduler.add_request(make_request("b", list(range(20))))
    step = run_step(scheduler)
    assert [(s.request_id, len(s.token_ids)) for s in step.requests] == [("a", 1), ("b", 9)]
    assert step.num_scheduled_tokens == 10


def test_max_num_seqs_limits_running_requests() -> None:
    scheduler = make_scheduler(max_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(str(i), [i + 1] * 5))
    run_step(scheduler)
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1


def test_second_request_reuses_the_cached_prefix() -> None:
    scheduler = make_scheduler()
    prefix = list(range(100, 132))  # 8 full blocks
    scheduler.add_request(make_request("a", prefix + [1, 2], max_tokens=1))
    run_to_end(scheduler)
    b = make_request("b", prefix + [3, 4, 5], max_tokens=1)
    scheduler.add_request(b)
    first = run_step(scheduler).requests[0]
    assert first.num_computed_tokens == 32 and len(first.token_ids) == 3
    assert b.metrics.num_cached_tokens == 32


@pytest.mark.parametrize("threshold", [0, 12])
def test_a_prefix_two_waiting_requests_share_is_computed_once(threshold: int) -> None:
    """b and c arrive with a's uncached 8-block prefix: they wait while a computes it (in one
    step, or capped to 12-token chunks over several with room left in each step), then start
    after it; d, with another prefix, is admitted beside a at once. The tokens are those of a
    run where the requests arrive one by one."""
    prefix = list(range(100, 132))
    prompts = {"a": prefix + [1, 2], "b": prefix + [3, 4, 5], "d": list(range(500, 520)),
               "c": prefix + [6]}

    def run(together: bool) -> tuple[Scheduler, list[SchedulerOutput], dict[str, list[int]]]:
        pool = BlockPool(64, enable_caching=True)
        kv = KVCacheManager(pool, BLOCK, root_block_hash("m"))
        scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64,
                                              long_prefill_token_threshold=threshold), kv)
        requests = {rid: make_request(rid, prompt, max_tokens=2)
                    for rid, prompt in prompts.items()}
        steps = []
        for request in requests.values():
            scheduler.add_request(request)
            if not together:
                steps += run_to_end(scheduler)
        steps += run_to_end(scheduler)
        return scheduler, steps, {rid: r.output_token_ids for rid, r in requests.items()}

    scheduler, steps, tokens = run(together=True)
    a_prefix_steps = [step for step in steps if any(
        s.request_id == "a" and s.num_computed_tokens < 32 for s in step.requests)]
    assert len(a_prefix_steps) == (3 if threshold else 1)
    for step in a_prefix_steps:  # b and c wait while a computes the prefix; d does not
        assert {s.request_id for s in step.requests} & {"b", "c"} == set()
    assert "d" in {s.request_id for s in steps[0].requests}
    first_chunks = {}
    for step in steps:
        for s in step.requests:
            first_chunks.setdefault(s.request_id, s)
    assert (first_chunks["b"].num_computed_tokens, len(first_chunks["b"].token_ids)) == (32, 3)
    assert (first_chunks["c"].num_computed_tokens, len(first_chunks["c"].token_ids)) == (32, 1)
    computed = sum(len(s.token_ids) for step in steps for s in step.requests
                   if s.num_computed_tokens < len(prompts[s.request_id]))
    assert computed == 34 + 3 + 20 + 1  # the prefix once, each suffix once
    assert scheduler.num_deferred_shared_prefixes >= 2
    assert tokens == run(together=False)[2]


def test_a_request_is_not_held_back_by_its_own_shared_last_block() -> None:
    """Two identical prompts of whole blocks: the second's only uncached work is its last
    token (a fully cached prompt still computes its last block), which sharing cannot save;
    once a's blocks are cached it hits them, and it is never passed over forever."""
    scheduler = make_scheduler(budget=64)
    prompt = list(range(16))
    a, b = make_request("a", prompt, max_tokens=1), make_request("b", prompt, max_tokens=1)
    scheduler.add_request(a)
    scheduler.add_request(b)
    steps = run_to_end(scheduler)
    assert a.finish_reason is FinishReason.LENGTH and b.finish_reason is FinishReason.LENGTH
    assert len(steps) <= 2 and b.metrics.num_cached_tokens == 12


def test_fully_cached_prompt_still_computes_its_last_block() -> None:
    scheduler = make_scheduler()
    prompt = list(range(16))
    scheduler.add_request(make_request("a", prompt, max_tokens=1))
    run_to_end(scheduler)
    scheduler.add_request(make_request("b", prompt, max_tokens=1))
    step = run_step(scheduler)
    assert step.requests[0].num_computed_tokens == 12 and step.requests[0].sample


def test_preemption_under_a_tiny_pool_finishes_everything_with_the_same_tokens() -> None:
    prompts = {str(i): [i + 1] * 6 + list(range(i, i + 5)) for i in range(6)}

    def outputs(num_blocks: int) -> tuple[dict[str, list[int]], int]:
        scheduler = make_scheduler(num_blocks=num_blocks, budget=32)
        requests = [make_request(rid, p, max_tokens=12) for rid, p in prompts.items()]
        for request in requests:
            scheduler.add_request(request)
        run_to_end(scheduler)
        pool = scheduler.kv.pool
        assert pool.num_free_blocks == pool.num_blocks, "blocks leaked"
        return {r.request_id: r.output_token_ids for r in requests}, scheduler.num_preemptions

    roomy, roomy_preemptions = outputs(num_blocks=64)
    tight, tight_preemptions = outputs(num_blocks=8)
    assert roomy_preemptions == 0 and tight_preemptions > 0
    assert tight == roomy


def test_finish_request_frees_blocks_of_waiting_and_running_requests() -> None:
    scheduler = make_scheduler(max_seqs=1)
    scheduler.add_request(make_request("run", [1] * 9, max_tokens=50))
    scheduler.add_request(make_request("wait", [2] * 9, max_tokens=50))
    run_step(scheduler)
    assert scheduler.finish_request("run", FinishReason.ABORT) is not None
    assert scheduler.finish_request("wait", FinishReason.ABORT) is not None
    assert scheduler.finish_request("wait", FinishReason.ABORT) is None
    assert not scheduler.has_unfinished_requests()
    pool = scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert scheduler.schedule().finished_request_ids == ["run", "wait"]


def test_separate_prefill_steps_alternate_with_decodes_and_keep_the_tokens() -> None:
    prompts = {str(i): list(range(10 * i + 1, 10 * i + 30)) for i in range(6)}

    def run(separate: bool) -> tuple[dict[str, list[int]], list[set[str]]]:
        scheduler = make_scheduler(num_blocks=64, budget=32)
        scheduler.separate_prefill_steps = separate
        requests = [make_request(rid, p, max_tokens=5) for rid, p in prompts.items()]
        for request in requests:
            scheduler.add_request(request)
        kinds = []
        for step in run_to_end(scheduler):
            kinds.append({"decode" if len(s.token_ids) == 1 and s.sample else "prefill"
                          for s in step.requests})
        return {r.request_id: r.output_token_ids for r in requests}, kinds

    mixed_tokens, mixed_kinds = run(separate=False)
    tokens, kinds = run(separate=True)
    assert tokens == mixed_tokens
    assert any(len(k) == 2 for k in mixed_kinds)  # the default mixes decodes and prefills
    assert all(len(k) == 1 for k in kinds)  # separate: each step is one or the other
    pairs = list(zip(kinds, kinds[1:], strict=False))
    decodes_waiting = [i for i, (a, b) in enumerate(pairs) if a == b == {"prefill"}]
    for i in decodes_waiting:  # back-to-back prefills only before any request decodes
        assert all(k == {"prefill"} for k in kinds[:i + 1])


def test_lpm_admits_the_request_sharing_the_cached_prefix_first_but_ages_others() -> None:
    def scheduler_with_cached_prefix() -> tuple[Scheduler, list[int]]:
        pool = BlockPool(64)
        kv = KVCacheManager(pool, BLOCK, root_block_hash("m"))
        config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=1,
                                 scheduling_policy="lpm")
        scheduler = Scheduler(config, kv)
        shared = list(range(500, 532))
        scheduler.add_request(make_request("warm", shared + [1], max_tokens=1))
        run_to_end(scheduler)
        return scheduler, shared

    scheduler, shared = scheduler_with_cached_prefix()
    scheduler.add_request(make_request("cold", list(range(900, 940))))
    scheduler.add_request(make_request("hot", shared + [2, 3]))
    first = run_step(scheduler).requests[0]
    assert first.request_id == "hot" and first.num_computed_tokens == 32

    scheduler, shared = scheduler_with_cached_prefix()
    cold = make_request("cold", list(range(900, 940)))
    cold.arrival_time -= 60  # has waited far longer than the lpm limit
    scheduler.add_request(cold)
    scheduler.add_request(make_request("hot", shared + [2, 3]))
    assert run_step(scheduler).requests[0].request_id == "cold"


@pytest.mark.parametrize("separate", [False, True])
def test_short_prefill_first_holds_a_long_prefill_back_for_one_step(separate: bool) -> None:
    """With short_prefill_first_tokens=8, a cache hit with 3 tokens left to compute gets its
    own prefill step instead of sharing one with a 40-token miss that arrived first; the miss
    runs in the next prefill step even though another short request waits then (it is held
    once). Tokens equal those of the run with the option off, where both share step one."""
    shared = list(range(500, 532))

    def run(short: int) -> tuple[list[set[str]], dict[str, list[int]], int]:
        pool = BlockPool(64)
        kv = KVCacheManager(pool, BLOCK, root_block_hash("m"))
        scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64,
                                              short_prefill_first_tokens=short), kv)
        scheduler.separate_prefill_steps = separate
        scheduler.add_request(make_request("warm", shared + [1], max_tokens=1))
        run_to_end(scheduler)
        requests = [make_request("miss", list(range(900, 940)), max_tokens=3),
                    make_request("hit", shared + [2, 3], max_tokens=3)]
        for request in requests:
            scheduler.add_request(request)
        prefills: list[set[str]] = []
        for step in range(20):
            if step == 1:
                requests.append(make_request("hit2", shared + [4, 5], max_tokens=3))
                scheduler.add_request(requests[-1])
            out = run_step(scheduler)
            prefilled = {s.request_id for s in out.requests if len(s.token_ids) > 1}
            if prefilled:
                prefills.append(prefilled)
        assert not scheduler.has_unfinished_requests()
        return (prefills, {r.request_id: r.output_token_ids for r in requests},
                scheduler.num_long_prefills_held)

    off_prefills, off_tokens, off_held = run(0)
    prefills, tokens, held = run(8)
    assert off_prefills[0] == {"miss", "hit"} and off_held == 0
    assert prefills[:2] == [{"hit"}, {"miss", "hit2"}] and held == 1
    assert tokens == off_tokens


def test_short_prefill_first_tokens_is_validated() -> None:
    with pytest.raises(ValueError, match="short_prefill_first_tokens -1 must be >= 0"):
        SchedulerConfig(short_prefill_first_tokens=-1)


@pytest.mark.parametrize("short", [0, 12])
@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
@pytest.mark.parametrize("separate", [False, True])
def test_skipped_admissions_change_no_decision(policy: str, separate: bool, short: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Under KV pressure (a 40-block pool, prompts of 9-39 tokens over 6 shared prefixes,
    25-40 output tokens, arriving in waves; dozens of preemptions), a step skips admission
    when the last attempt ran out of blocks and nothing since could let a request in. Every
    step then schedules exactly what it schedules when every step tries again, and the tokens
    are the same; with short prefills first too (long ones held a step behind short ones)."""
    rng = random.Random(7)
    prefixes = [[rng.randrange(1, 900) for _ in range(rng.choice([8, 16, 24]))]
                for _ in range(6)]
    prompts = [rng.choice(prefixes) + [rng.randrange(1, 900) for _ in range(rng.randrange(1, 16))]
               for _ in range(40)]

    def run(skipping: bool) -> tuple[list[list[tuple[str, int, int]]], list[list[int]], int]:
        if not skipping:
            monkeypatch.setattr(scheduler_module._AdmissionState, "still_fails",
                                lambda self, now: False)
        pool = BlockPool(40)
        kv = KVCacheManager(pool, BLOCK, root_block_hash("m"))
        scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8,
                                              scheduling_policy=policy,
                                              short_prefill_first_tokens=short), kv)
        scheduler.separate_prefill_steps = separate
        requests = [make_request(str(i), p, max_tokens=n)
                    for i, (p, n) in enumerate(zip(prompts, [30, 40, 25, 35] * 10, strict=True))]
        steps = []
        for wave in range(0, len(requests), 10):
            for request in requests[wave:wave + 10]:
                scheduler.add_request(request)
            for _ in range(6):  # the next wave arrives while these still run
                steps.append(run_step(scheduler))
        steps += run_to_end(scheduler)
        monkeypatch.undo()
        assert (scheduler.num_long_prefills_held > 0) == (short > 0)
        return ([[(s.request_id, s.num_computed_tokens, len(s.token_ids)) for s in step.requests]
                 for step in steps], [r.output_token_ids for r in requests],
                scheduler.num_skipped_admissions)

    skipping_steps, skipping_tokens, skipped = run(skipping=True)
    every_steps, every_tokens, _ = run(skipping=False)
    assert skipped > 0
    assert skipping_steps == every_steps
    assert skipping_tokens == every_tokens


class InlineTiers:
    """Stands in for the TierManager: keeps the hash of every block ever computed or freed,
    and serves any run of them with a load that finishes at once."""

    chunk_blocks = 1
    stores_on_compute = True  # like write-through: every computed block is "stored"

    def __init__(self) -> None:
        self.held: set[object] = set()
        self.results: list[LoadResult] = []
        self.loaded_blocks = 0
        self.plans_out = 0
        """Plans `lookup` gave (their entries pinned) that neither `start_load` took nor
        `release_plan` gave back."""

    def note_request(self, hashes: list[object]) -> None:
        pass

    def is_loading(self, block_hash: object) -> bool:
        return False

    def lookup(self, hashes: list[object], first: int, max_blocks: int) -> SimpleNamespace | None:
        n = 0
        while first + n < max_blocks and hashes[first + n] in self.held:
            n += 1
        self.plans_out += n > 0
        return SimpleNamespace(num_blocks=n) if n else None

    def release_plan(self, plan: SimpleNamespace) -> None:
        self.plans_out -= 1

    def start_load(self, request_id: str, plan: SimpleNamespace, block_ids: list[int],
                   hashes: list[object]) -> bool:
        self.plans_out -= 1
        self.loaded_blocks += plan.num_blocks
        self.results.append(LoadResult(request_id, plan.num_blocks, {"cpu": plan.num_blocks},
                                       0.0))
        return True

    def poll(self) -> list[LoadResult]:
        results, self.results = self.results, []
        return results

    def store_lookahead(self, num_blocks: int) -> None:
        pass

    def on_blocks_computed(self, hashes: list[object], num_full: int, handled: int) -> int:
        self.held.update(hashes[:num_full])
        return num_full

    def on_request_freed(self, hashes: list[object], num_full: int) -> None:
        self.held.update(hashes[:num_full])


@pytest.mark.parametrize("after_first_token", [False, True])
def test_a_reload_after_preemption_is_not_counted_as_a_second_hit(after_first_token: bool) -> None:
    pool = BlockPool(64, enable_caching=True)
    tiers = InlineTiers()
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
                          KVCacheManager(pool, BLOCK, root_block_hash("m")), tiers)  # type: ignore[arg-type]
    prefix = list(range(100, 112))  # three blocks
    scheduler.add_request(make_request("first", prefix + [1]))
    run_to_end(scheduler)
    pool.reset_prefix_cache()  # the prefix now lives only in the "tier"
    request = make_request("again", prefix + [7, 8, 9, 10], max_tokens=4)
    scheduler.add_request(request)
    in_flight = None
    if after_first_token:
        run_step(scheduler)
        assert request.num_output_tokens == 1
    else:
        # Admitted (its load ran inline), then preempted while that step is in flight
        # (async scheduling): the step's token is kept when it completes.
        in_flight = scheduler.schedule()
    assert tiers.loaded_blocks == 3
    scheduler._preempt(request)
    if in_flight is not None:
        complete(scheduler, in_flight)
        assert request.num_output_tokens == 1 and request.num_computed_tokens == 0
    pool.reset_prefix_cache()  # so the second admission loads again
    run_to_end(scheduler)
    assert tiers.loaded_blocks > 3, "the second admission must load from the tier again"
    assert request.metrics.num_cached_tokens == 12
    assert request.metrics.num_tier_hit_tokens == {"device": 0, "cpu": 12}
    assert request.num_output_tokens == 4 and pool.num_free_blocks == pool.num_blocks


class LookaheadTiers(InlineTiers):
    """Never holds anything to load; records how far ahead each step asks to store."""

    stores_overlap_compute = True  # as on CUDA: store_ahead runs

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[int] = []

    def lookup(self, hashes: list[object], first: int, max_blocks: int) -> None:
        return None

    def store_lookahead(self, num_blocks: int) -> None:
        self.windows.append(num_blocks)


def lookahead_scheduler() -> tuple[Scheduler, LookaheadTiers, list[int]]:
    """A scheduler over a 40-block pool with LookaheadTiers, and the blocks each step
    allocates (the caller appends a 0 before each step)."""
    pool = BlockPool(40, enable_caching=True)
    tiers = LookaheadTiers()
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8),
                          KVCacheManager(pool, BLOCK, root_block_hash("m")), tiers)  # type: ignore[arg-type]
    allocated: list[int] = []
    allocate = pool.allocate

    def counting_allocate(num_blocks: int) -> list[int]:
        allocated[-1] += num_blocks
        return allocate(num_blocks)

    pool.allocate = counting_allocate  # type: ignore[method-assign]
    return scheduler, tiers, allocated


def test_store_lookahead_covers_every_block_a_step_allocates() -> None:
    # Lazy stores copy down candidates among the blocks a step may evict before it evicts
    # them; a step without prefill work asks for fewer (one block per running request).
    scheduler, tiers, allocated = lookahead_scheduler()
    scheduler.separate_prefill_steps = True
    for i in range(6):
        scheduler.add_request(make_request(str(i), list(range(50 * i + 1, 50 * i + 30)),
                                           max_tokens=12))
    running_before: list[int] = []
    while scheduler.has_unfinished_requests():
        allocated.append(0)
        running_before.append(scheduler.num_running)
        run_step(scheduler)
        assert len(allocated) < 1000
    assert len(tiers.windows) == len(allocated)
    for window, blocks in zip(tiers.windows, allocated, strict=True):
        assert blocks <= window
    pairs = list(zip(tiers.windows, running_before, strict=True))
    decode_windows = [w for w, running in pairs if w == running + tiers.chunk_blocks]
    prefill_windows = [w for w, running in pairs
                       if w == running + 32 // BLOCK + tiers.chunk_blocks]
    assert decode_windows and prefill_windows
    assert len(decode_windows) + len(prefill_windows) == len(pairs)


def test_store_ahead_covers_the_next_step_even_when_a_request_arrives_meanwhile() -> None:
    # The engine calls store_ahead once a step is launched, so the lazy stores for the next
    # step run while the device works; the window must hold whatever that step allocates,
    # including a prompt that arrives between the launch and the next schedule.
    scheduler, tiers, allocated = lookahead_scheduler()
    scheduler.add_request(make_request("0", list(range(1, 30)), max_tokens=12))
    ahead: list[int] = []
    step = 0
    while scheduler.has_unfinished_requests():
        allocated.append(0)
        out = scheduler.schedule()
        del tiers.windows[:]  # the lookahead in schedule itself is checked elsewhere
        scheduler.store_ahead()
        ahead.extend(tiers.windows)
        step += 1
        if step % 3 == 0 and step < 30:  # arrives while the step runs
            scheduler.add_request(make_request(f"late{step}", list(range(50 * step, 50 * step
                                                                         + 29)), max_tokens=4))
        sampled = {s.request_id: next_token(scheduler.requests[s.request_id].all_token_ids)
                   for s in out.requests if s.sample}
        scheduler.update_from_output(out, ModelRunnerOutput(sampled))
        assert step < 1000
    assert len(ahead) == len(allocated)
    assert sum(allocated[1:]) > 0
    for window, blocks in zip(ahead, allocated[1:], strict=False):
        assert blocks <= window
    # On the CPU nothing runs while the host works: store_ahead leaves it to schedule().
    tiers.stores_overlap_compute = False  # type: ignore[misc]
    scheduler.store_ahead()
    assert tiers.windows == ahead[-1:]


def test_schedule_does_not_walk_the_window_again_after_store_ahead() -> None:
    # store_ahead (after each launch, while the device works) looked over the most the next
    # step can allocate; schedule then skips its own walk, which would run between steps.
    # Without a store_ahead since the last step (the CPU, the first step) it still looks.
    scheduler, tiers, allocated = lookahead_scheduler()
    scheduler.add_request(make_request("0", list(range(1, 30)), max_tokens=6))
    allocated.append(0)
    out = scheduler.schedule()
    assert len(tiers.windows) == 1  # no store_ahead yet: schedule looked
    walks_in_schedule = []
    while scheduler.has_unfinished_requests():
        scheduler.store_ahead()
        sampled = {s.request_id: next_token(scheduler.requests[s.request_id].all_token_ids)
                   for s in out.requests if s.sample}
        scheduler.update_from_output(out, ModelRunnerOutput(sampled))
        before = len(tiers.windows)
        out = scheduler.schedule()
        walks_in_schedule.append(len(tiers.windows) - before)
    assert walks_in_schedule and set(walks_in_schedule) == {0}
    # The A/B switch restores the second walk; and a schedule with no store_ahead before it
    # walks again.
    scheduler.lookahead_after_store_ahead = True
    scheduler.add_request(make_request("1", list(range(100, 129)), max_tokens=2))
    scheduler.store_ahead()
    before = len(tiers.windows)
    scheduler.schedule()
    assert len(tiers.windows) == before + 1
    scheduler.lookahead_after_store_ahead = False
    before = len(tiers.windows)
    scheduler.schedule()
    assert len(tiers.windows) == before + 1


class HeldTiers(InlineTiers):
    """InlineTiers that also answer the short-prefill test's `holds_block`."""

    def holds_block(self, block_hash: object) -> bool:
        return block_hash in self.held


def first_steps(scheduler: Scheduler, max_steps: int = 100) -> dict[str, int]:
    """Run to the end; the step at which each request was first scheduled."""
    first: dict[str, int] = {}
    for step in range(max_steps):
        for scheduled in run_step(scheduler).requests:
            first.setdefault(scheduled.request_id, step)
        if not scheduler.has_unfinished_requests():
            return first
    raise AssertionError("requests left after max_steps")


def tier_pressure_scheduler(short: int) -> tuple[Scheduler, list[int]]:
    """An 80-token prefix held only by the (inline) tier, and 20 of 40 blocks taken by two
    running requests: a tier hit on the prefix needs more blocks than are free."""
    pool = BlockPool(40)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=128,
                                          short_prefill_first_tokens=short),
                          KVCacheManager(pool, BLOCK, root_block_hash("m")), HeldTiers())
    prefix = list(range(500, 580))
    scheduler.add_request(make_request("warm", prefix + [1], max_tokens=1))
    run_to_end(scheduler)
    pool.reset_prefix_cache()  # the prefix is now in the tier only
    scheduler.add_request(make_request("A", list(range(2000, 2020)), max_tokens=20))
    scheduler.add_request(make_request("B", list(range(3000, 3060)), max_tokens=20))
    run_step(scheduler)
    assert pool.num_free_blocks == 20
    return scheduler, prefix


@pytest.mark.parametrize("short", [0, 8])
def test_short_request_that_cannot_get_blocks_does_not_hold_an_earlier_long_one(
        short: int) -> None:
    """A 20-token miss arrives before a tier hit with 3 tokens left whose load and suffix do
    not fit. The hit stops admission; the miss ahead of it still runs at once, as it does
    with the option off (it used to wait until the hit got in, 19 steps later)."""
    scheduler, prefix = tier_pressure_scheduler(short)
    scheduler.add_request(make_request("long", list(range(1000, 1020)), max_tokens=2))
    scheduler.add_request(make_request("short", prefix + [2, 3, 4], max_tokens=2))
    first = first_steps(scheduler)
    assert first["long"] == 0 and first["short"] > 0
    assert scheduler.num_long_prefills_held == 0


def test_a_tier_hit_that_cannot_get_blocks_gives_its_plan_back() -> None:
    """`lookup` pins the entries its plan names; a hit whose blocks do not fit gives the plan
    back, or those entries could never be evicted again."""
    scheduler, prefix = tier_pressure_scheduler(0)
    tiers = scheduler.tiers
    scheduler.add_request(make_request("hit", prefix + [2, 3, 4], max_tokens=2))
    plans_before = tiers.plans_out
    run_step(scheduler)
    assert "hit" in {r.request_id for r in scheduler.waiting}  # the load did not fit
    assert tiers.plans_out == plans_before == 0
    run_to_end(scheduler)
    assert tiers.plans_out == 0 and tiers.loaded_blocks > 0


def test_held_long_prefill_ends_an_admission_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    """In one step a short device hit is admitted, a long miss held, and a short tier hit
    fails for want of blocks. Holding the miss changes the next attempt's order, so the next
    step tries again (the miss runs at step 1) rather than skipping admission as if nothing
    could get in: the same schedule as with a retry every step."""
    def run(skipping: bool) -> dict[str, int]:
        if not skipping:
            monkeypatch.setattr(scheduler_module._AdmissionState, "still_fails",
                                lambda self, now: False)
        scheduler, prefix = tier_pressure_scheduler(8)
        scheduler.add_request(make_request("long", list(range(1000, 1020)), max_tokens=2))
        scheduler.add_request(make_request("device hit", list(range(2000, 2020)) + [7, 8],
                                           max_tokens=2))
        scheduler.add_request(make_request("tier hit", prefix + [2, 3, 4], max_tokens=2))
        first = first_steps(scheduler)
        monkeypatch.undo()
        assert scheduler.num_long_prefills_held == 1
        return first

    skipping = run(skipping=True)
    assert skipping["device hit"] == 0 and skipping["long"] == 1
    assert skipping == run(skipping=False)


def test_only_admitted_short_work_holds_a_long_prefill() -> None:
    """A running prefill's 6-token tail is not short work: the 40-token miss waiting beside
    it is admitted in the same step, not held."""
    pool = BlockPool(64)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64,
                                          short_prefill_first_tokens=8),
                          KVCacheManager(pool, BLOCK, root_block_hash("m")))
    scheduler.add_request(make_request("chunked", list(range(100, 170)), max_tokens=2))
    assert [len(s.token_ids) for s in run_step(scheduler).requests] == [64]
    scheduler.add_request(make_request("miss", list(range(900, 940)), max_tokens=2))
    step = {s.request_id: len(s.token_ids) for s in run_step(scheduler).requests}
    assert step == {"chunked": 6, "miss": 40}
    assert scheduler.num_long_prefills_held == 0


def test_one_token_left_is_short_work() -> None:
    """A cache hit that computes only its last token still gets its own prefill step."""
    pool = BlockPool(64)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64,
                                          short_prefill_first_tokens=8),
                          KVCacheManager(pool, BLOCK, root_block_hash("m")))
    shared = list(range(500, 532))
    scheduler.add_request(make_request("warm", shared + [1], max_tokens=1))
    run_to_end(scheduler)
    scheduler.add_request(make_request("miss", list(range(900, 940))))
    scheduler.add_request(make_request("hit", shared + [2]))
    step = {s.request_id: len(s.token_ids) for s in run_step(scheduler).requests}
    assert step == {"hit": 1} and scheduler.num_long_prefills_held == 1


class SlowTiers(HeldTiers):
    """A tier that holds every prefix and whose loads report two polls after they start."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[list] = []

    def lookup(self, hashes: list[object], first: int, max_blocks: int) -> SimpleNamespace | None:
        return SimpleNamespace(num_blocks=max_blocks - first) if max_blocks > first else None

    def start_load(self, request_id: str, plan: SimpleNamespace, block_ids: list[int],
                   hashes: list[object]) -> bool:
        self.pending.append([request_id, plan.num_blocks, 2])
        return False

    def poll(self) -> list[LoadResult]:
        for load in self.pending:
            load[2] -= 1
        done = [load for load in self.pending if load[2] < 0]
        self.pending = [load for load in self.pending if load[2] >= 0]
        return [LoadResult(rid, n, {"cpu": n}, 0.0) for rid, n, _ in done]


def test_an_aborted_loading_request_keeps_its_id_until_its_load_reports() -> None:
    """Aborted while its tier load runs, a request keeps its blocks until the load reports
    (the transfer still writes them), and they are found by its id. A new request with that
    id is refused until then: it used to get those blocks, and lose them to the old load's
    release while it ran."""
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64),
                          KVCacheManager(BlockPool(32), BLOCK, root_block_hash("m")),
                          SlowTiers())
    scheduler.add_request(make_request("x", list(range(1, 18)), max_tokens=4))
    run_step(scheduler)
    assert "x" in scheduler.loading
    scheduler.finish_request("x", FinishReason.ABORT)
    assert scheduler.request_id_in_use("x")
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("x", [100, 101, 102]))
    run_to_end(scheduler)
    assert not scheduler.request_id_in_use("x")
    assert scheduler.kv.num_free_blocks == 32
    scheduler.add_request(make_request("x", [100, 101, 102]))
    run_to_end(scheduler)
    assert scheduler.kv.num_free_blocks == 32


@pytest.mark.parametrize("caching", [False, True])
def test_aborting_the_request_admission_failed_on_lets_the_next_one_in(caching: bool) -> None:
    """A 34-token request cannot get its 9 blocks; a 2-token one waits behind it. Aborting
    the big one lets the small one in at the next step: the skip that followed the failed
    admission used to hold it until the running request finished."""
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64),
                          KVCacheManager(BlockPool(10, enable_caching=caching), BLOCK,
                                         root_block_hash("m")))
    scheduler.add_request(make_request("running", [1, 2, 3, 4], max_tokens=24))
    run_step(scheduler)
    scheduler.add_request(make_request("big", list(range(100, 134)), max_tokens=1))
    scheduler.add_request(make_request("small", [1, 2], max_tokens=1))
    assert {s.request_id for s in run_step(scheduler).requests} == {"running"}
    scheduler.finish_request("big", FinishReason.ABORT)
    assert "small" in {s.request_id for s in run_step(scheduler).requests}


# -- async scheduling: a step scheduled while the one before it is still in flight -----------


def complete(scheduler: Scheduler, out: SchedulerOutput) -> None:
    """Apply a step's results. The 'model' reads a request's tokens when the step completes:
    by then the step before it has completed too, so they end with this step's input."""
    sampled = {s.request_id: next_token(scheduler.requests[s.request_id].all_token_ids)
               for s in out.requests if s.sample and s.request_id in scheduler.requests}
    scheduler.update_from_output(out, ModelRunnerOutput(sampled))
    scheduler.kv.pool.check_integrity()


def run_async_to_end(scheduler: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    steps: list[SchedulerOutput] = []
    in_flight: SchedulerOutput | None = None
    while scheduler.has_unfinished_requests() or in_flight is not None:
        launched = scheduler.schedule() if scheduler.has_unfinished_requests() else None
        if in_flight is not None:
            complete(scheduler, in_flight)
        in_flight = launched
        if launched is not None:
            steps.append(launched)
        assert len(steps) < max_steps, "scheduler made no progress"
    return steps


@pytest.mark.parametrize("num_blocks, budget", [(64, 64), (64, 5), (8, 32), (7, 6)])
def test_async_scheduling_gives_every_request_the_synchronous_tokens(num_blocks: int,
                                                                     budget: int) -> None:
    """Chunked prefills, decodes of pending tokens and preemptions of requests in flight:
    the same tokens as one step at a time, no leaked block, nothing left in flight."""
    prompts = {str(i): [i + 1] * 6 + list(range(i, i + 5 + i)) for i in range(6)}

    def outputs(run: object) -> tuple[dict[str, list[int]], Scheduler]:
        scheduler = make_scheduler(num_blocks=num_blocks, budget=budget, max_seqs=min(8, budget))
        requests = [make_request(rid, p, max_tokens=3 + int(rid))
                    for rid, p in prompts.items()]
        for request in requests:
            scheduler.add_request(request)
        run(scheduler)  # type: ignore[operator]
        pool = scheduler.kv.pool
        assert pool.num_free_blocks == pool.num_blocks, "blocks leaked"
        assert all(r.num_inflight_tokens == 0 and r.num_pending_outputs == 0 for r in requests)
        return {r.request_id: r.output_token_ids for r in requests}, scheduler

    expected, _ = outputs(run_to_end)
    got, scheduler = outputs(run_async_to_end)
    assert got == expected
    assert all(len(tokens) == 3 + int(rid) for rid, tokens in got.items())
    if num_blocks < 64:
        assert scheduler.num_preemptions > 0


def test_a_pending_decode_is_scheduled_but_never_past_max_tokens() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("one", [1] * 5, max_tokens=1))
    scheduler.add_request(make_request("two", [2] * 5, max_tokens=2))
    first = scheduler.schedule()
    assert [(s.request_id, s.sample) for s in first.requests] == [("one", True), ("two", True)]
    # Scheduled before the first step's tokens are known: "one" ends with its pending token,
    # "two" decodes it (the runner reads it on the device).
    second = scheduler.schedule()
    assert [(s.request_id, s.token_ids, s.num_computed_tokens, s.num_output_tokens)
            for s in second.requests] == [("two", [PENDING_TOKEN_ID], 5, 1)]
    complete(scheduler, first)
    assert "one" not in scheduler.requests  # finished by length
    third = scheduler.schedule()  # "two" has its second token in flight: nothing to do
    assert third.requests == [] and third.finished_request_ids == ["one"]
    complete(scheduler, second)
    complete(scheduler, third)
    assert not scheduler.has_unfinished_requests()
    pool = scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_a_request_stopped_by_a_token_drops_the_step_it_has_in_flight() -> None:
    scheduler = make_scheduler()
    stop = next_token([3] * 5)  # the first token stops it
    request = Request("r", [3] * 5, SamplingParams(max_tokens=10, temperature=0.0,
                                                   stop_token_ids=[stop]))
    scheduler.add_request(request)
    first = scheduler.schedule()
    second = scheduler.schedule()  # decodes the pending first token
    assert [s.token_ids for s in second.requests] == [[PENDING_TOKEN_ID]]
    complete(scheduler, first)
    assert request.is_finished and request.output_token_ids == [stop]
    assert request.stop_reason == stop
    complete(scheduler, second)  # its token belongs to no live request: dropped
    assert request.output_token_ids == [stop]
    pool = scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_min_tokens_counts_the_pending_token() -> None:
    """The stop ids are masked while the output, pending tokens included, is shorter than
    min_tokens: counting only the tokens read would mask one token too many."""
    scheduler = make_scheduler()
    request = Request("r", [4] * 5, SamplingParams(max_tokens=5, temperature=0.0, min_tokens=2,
                                                   stop_token_ids=[7], ignore_eos=True))
    scheduler.add_request(request)
    first = scheduler.schedule()
    second = scheduler.schedule()
    complete(scheduler, first)
    third = scheduler.schedule()  # one token read, one pending: min_tokens reached
    assert [s.suppressed_token_ids for s in (*first.requests, *second.requests,
                                              *third.requests)] == [(7,), (7,), ()]
    assert [s.num_output_tokens for s in third.requests] == [2]


def test_tokens_in_flight_are_reported_until_their_step_lands() -> None:
    """The engine sleeps on a tier transfer after an empty step only with nothing in flight:
    a step in flight (a preempted request's included) lands first and may free the way."""
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", [5] * 6, max_tokens=3))
    assert not scheduler.has_tokens_in_flight()
    first = scheduler.schedule()
    assert scheduler.has_tokens_in_flight()
    scheduler._preempt(scheduler.requests["a"])  # preempted while its step runs
    assert scheduler.has_tokens_in_flight()
    complete(scheduler, first)
    assert not scheduler.has_tokens_in_flight()
    assert scheduler.requests["a"].output_token_ids == [next_token([5] * 6)]  # kept
    run_to_end(scheduler)
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks


@pytest.mark.parametrize("ended_by", ["abort", "stop token"])
def test_a_finished_request_keeps_its_id_while_a_step_of_it_is_in_flight(ended_by: str) -> None:
    """Aborted, or stopped by a token, while a step of it is in flight (async scheduling),
    a request keeps its id until that step's results are applied: they are its own. A new
    request with the id used to be given them: the old request's token and in-flight
    counts gone negative, which kept it out of admission forever."""
    scheduler = make_scheduler()
    stop = next_token([1] * 5)
    scheduler.add_request(Request("x", [1] * 5, SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True, stop_token_ids=[stop])))
    first = scheduler.schedule()
    second = scheduler.schedule()  # decodes the pending first token
    if ended_by == "abort":
        scheduler.finish_request("x", FinishReason.ABORT)
    else:
        complete(scheduler, first)  # its first token stops it; `second` is still in flight
    assert "x" not in scheduler.requests
    assert scheduler.request_id_in_use("x")
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("x", [9, 9, 9], max_tokens=3))
    if ended_by == "abort":
        complete(scheduler, first)
    complete(scheduler, second)
    assert not scheduler.request_id_in_use("x")
    again = make_request("x", [9, 9, 9], max_tokens=3)
    scheduler.add_request(again)
    run_async_to_end(scheduler)
    assert again.output_token_ids == [next_token([9, 9, 9])] + again.output_token_ids[1:]
    assert len(again.output_token_ids) == 3
    assert again.num_inflight_tokens == 0 and again.num_pending_outputs == 0
    pool = scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
