"""Property-based runs of the scheduler against a simulated KV pool, without a model.

The simulated runner (at launch, as the device orders it) writes each scheduled token into
the slot its block table names and, for every row, reads the whole context back through the
table: a request must see exactly its own tokens (a block freed too early, shared wrongly or
loaded into the wrong place shows up as a foreign token). Its "model" is a function of that
context, so every request's output must equal what it gets alone, whatever the schedule:
chunked prefill, prefix hits, tier loads (finishing inline or some polls later), preemption,
aborts in every phase, ids used again, async scheduling (a step launched before the previous
one's tokens are applied) and idle prefix-cache resets. Every step checks the pool's
invariants and that each block's reference count is the number of block tables holding it;
once idle, every block is free.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.config import SchedulerConfig
from kvtier.kv import BlockPool, KVCacheManager, root_block_hash
from kvtier.request import Request
from kvtier.scheduler import Scheduler
from kvtier.tiers.records import LoadResult
from kvtier.types import (
    PENDING_TOKEN_ID,
    FinishReason,
    ModelRunnerOutput,
    SamplingParams,
    SchedulerOutput,
)

BLOCK = 4


def next_token(context: list[int]) -> int:
    return (sum(t * (i + 7) for i, t in enumerate(context)) * 31 + len(context)) % 97 + 1


def alone(prompt: list[int], max_tokens: int, max_model_len: int,
          stop_token_ids: tuple[int, ...] = ()) -> list[int]:
    tokens, out = list(prompt), []
    while True:
        token = next_token(tokens)
        out.append(token)
        tokens.append(token)
        if token in stop_token_ids or len(out) >= max_tokens or len(tokens) >= max_model_len:
            return out


class SimTiers:
    """A tier holding every block ever computed (its tokens), whose loads finish inline or a
    few polls later, writing the tokens into the blocks when they finish."""

    chunk_blocks = 1

    def __init__(self, kv: SimKV, delays: list[int], stores_on_compute: bool) -> None:
        self.kv = kv
        self.held: dict[bytes, tuple[int, ...]] = {}
        self.delays = delays
        self.stores_on_compute = stores_on_compute
        self.pending: list[list] = []  # [request id, block ids, hashes, polls left]
        self.loading: set[bytes] = set()
        self.plans_out = 0

    def note_request(self, hashes: list[bytes]) -> None:
        pass

    def is_loading(self, block_hash: bytes) -> bool:
        return block_hash in self.loading

    def holds_block(self, block_hash: bytes) -> bool:
        return block_hash in self.held

    def lookup(self, hashes: list[bytes], first: int, max_blocks: int) -> SimpleNamespace | None:
        n = 0
        while first + n < max_blocks and hashes[first + n] in self.held:
            n += 1
        if not n:
            return None
        self.plans_out += 1
        return SimpleNamespace(num_blocks=n)

    def release_plan(self, plan: SimpleNamespace) -> None:
        self.plans_out -= 1

    def start_load(self, request_id: str, plan: SimpleNamespace, block_ids: list[int],
                   hashes: list[bytes]) -> bool:
        self.plans_out -= 1
        delay = self.delays.pop(0) if self.delays else 0
        hashes = hashes[:plan.num_blocks]
        self.loading.update(hashes)
        self.pending.append([request_id, list(block_ids), hashes, delay])
        return delay == 0

    def poll(self) -> list[LoadResult]:
        done, still = [], []
        for load in self.pending:
            load[3] -= 1
            (done if load[3] < 0 else still).append(load)
        self.pending = still
        results = []
        for request_id, block_ids, hashes, _ in done:
            for block_id, block_hash in zip(block_ids, hashes, strict=True):
                self.kv.slots[block_id] = list(self.held[block_hash])
                self.loading.discard(block_hash)
            results.append(LoadResult(request_id, len(block_ids), {"cpu": len(block_ids)}, 0.0))
        return results

    def store_lookahead(self, num_blocks: int) -> None:
        pass

    def _keep(self, hashes: list[bytes], num_full: int) -> None:
        for block_hash in hashes[:num_full]:
            if block_hash not in self.held:
                self.held[block_hash] = self.kv.tokens_of[block_hash]

    def on_blocks_computed(self, hashes: list[bytes], num_full: int, handled: int) -> int:
        self._keep(hashes, num_full)
        return num_full

    def on_request_freed(self, hashes: list[bytes], num_full: int) -> None:
        self._keep(hashes, num_full)


@dataclass
class SimKV:
    """The simulated device KV: each slot holds the token id written there."""

    num_blocks: int
    slots: list[list[int | None]] = field(init=False)
    tokens_of: dict[bytes, tuple[int, ...]] = field(default_factory=dict)
    """Block hash -> the tokens of its whole prefix's last block (what a hit must hold)."""

    def __post_init__(self) -> None:
        self.slots = [[None] * BLOCK for _ in range(self.num_blocks)]


class Harness:
    def __init__(self, num_blocks: int, budget: int, max_seqs: int, threshold: int,
                 policy: str, short: int, separate: bool, caching: bool, tiers: bool,
                 delays: list[int],
                 stores_on_compute: bool, async_scheduling: bool, max_model_len: int) -> None:
        pool = BlockPool(num_blocks, enable_caching=caching)
        self.kv = KVCacheManager(pool, BLOCK, root_block_hash("m"))
        self.sim = SimKV(num_blocks)
        self.tiers = SimTiers(self.sim, delays, stores_on_compute) if tiers else None
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_batched_tokens=budget, max_num_seqs=max_seqs,
            long_prefill_token_threshold=threshold, scheduling_policy=policy,
            short_prefill_first_tokens=short), self.kv, self.tiers)  # type: ignore[arg-type]
        self.scheduler.separate_prefill_steps = separate
        self.async_scheduling = async_scheduling
        self.max_model_len = max_model_len
        self.in_flight: tuple[SchedulerOutput, dict[str, int]] | None = None
        self.last_sampled: dict[str, int] = {}
        self.context: dict[str, list[int]] = {}
        """Each launched request's tokens as the device knows them (pending ones included)."""
        self.owner: dict[str, Request] = {}
        self.requests: list[tuple[Request, list[int]]] = []
        """Every request added, and its tokens alone (ids of finished ones may be reused)."""
        self.aborted: set[int] = set()
        """id() of the aborted requests."""
        self.num_steps = 0

    # -- the simulated device ----------------------------------------------------------------

    def _execute(self, out: SchedulerOutput, tables: list[list[int]]) -> dict[str, int]:
        sampled: dict[str, int] = {}
        for scheduled, table in zip(out.requests, tables, strict=True):
            rid = scheduled.request_id
            context = self.context[rid]
            start = scheduled.num_computed_tokens
            tokens = [self.last_sampled[rid] if t == PENDING_TOKEN_ID else t
                      for t in scheduled.token_ids]
            if start + len(tokens) > len(context):  # a pending token the device knows now
                context.extend(tokens[len(context) - start:])
            assert context[start:start + len(tokens)] == tokens, f"{rid}: wrong input tokens"
            for offset, token in enumerate(tokens):
                position = start + offset
                self.sim.slots[table[position // BLOCK]][position % BLOCK] = token
            seen = [self.sim.slots[table[p // BLOCK]][p % BLOCK]
                    for p in range(start + len(tokens))]
            assert seen == context[:start + len(tokens)], \
                f"{rid} reads {seen} from its blocks, not its tokens {context}"
            if scheduled.sample:
                token = next_token(seen)
                sampled[rid] = token
                context.append(token)
        self.last_sampled = sampled  # what the next step's pending decodes read (the runner)
        return sampled

    def _launch(self) -> tuple[SchedulerOutput, dict[str, int]]:
        """Schedule a step and run it on the simulated device at once: the device runs steps
        in launch order, and orders tier loads after the steps launched before them."""
        out = self.scheduler.schedule()
        for scheduled in out.requests:
            rid = scheduled.request_id
            request = self.scheduler.requests[rid]
            if (scheduled.num_computed_tokens == 0 or rid not in self.context
                    or self.owner[rid] is not request):  # new, or an id used again
                self.context[rid] = list(request.all_token_ids)
                self.owner[rid] = request
            else:
                # Resumed after a preemption, the context is the tokens known now.
                known = request.all_token_ids
                context = self.context[rid]
                assert context[:len(known)] == known
        return out, self._execute(out, [s.block_ids for s in out.requests])

    def _complete(self, launched: tuple[SchedulerOutput, dict[str, int]]) -> None:
        out, sampled = launched
        self.scheduler.update_from_output(out, ModelRunnerOutput(sampled))

    def step(self) -> None:
        self.num_steps += 1
        if self.async_scheduling:
            launched = self._launch() if self.scheduler.has_unfinished_requests() else None
            if self.in_flight is not None:
                self._complete(self.in_flight)
            self.in_flight = launched
        else:
            self._complete(self._launch())
        self.check()

    # -- checks ------------------------------------------------------------------------------

    def check(self) -> None:
        pool = self.kv.pool
        pool.check_integrity()
        held = Counter(b for table in self.kv._block_tables.values() for b in table)
        for block in pool.blocks:
            assert block.ref_cnt == held[block.block_id], f"block {block.block_id} refs"
            if block.block_hash is not None and block.block_hash in self.sim.tokens_of:
                assert self.sim.slots[block.block_id] == list(
                    self.sim.tokens_of[block.block_hash]), "a cached block holds other tokens"
        for request in self.scheduler.requests.values():
            hashes = self.kv.block_hashes(request)
            for index, block_hash in enumerate(hashes):
                self.sim.tokens_of.setdefault(
                    block_hash, tuple(request.all_token_ids[index * BLOCK:(index + 1) * BLOCK]))

    def add(self, rid: str, prompt: list[int], max_tokens: int, stop: tuple[int, ...]) -> None:
        request = Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                      ignore_eos=True, stop_token_ids=stop),
                          max_model_len=self.max_model_len)
        self.scheduler.add_request(request)
        self.requests.append((request, alone(prompt, max_tokens, self.max_model_len, stop)))
        self.check()

    def abort(self, rid: str) -> None:
        request = self.scheduler.finish_request(rid, FinishReason.ABORT)
        if request is not None:
            self.aborted.add(id(request))
        self.check()

    def drain(self, max_steps: int = 3000) -> None:
        start = self.num_steps
        while self.scheduler.has_unfinished_requests() or self.in_flight is not None:
            self.step()
            assert self.num_steps - start < max_steps, "the scheduler made no progress"

    def check_idle(self) -> None:
        self.step()  # hands the last finished ids over
        pool = self.kv.pool
        assert pool.num_free_blocks == pool.num_blocks, "blocks leaked"
        assert not self.kv._block_tables and not self.kv._num_cached_blocks
        assert not self.scheduler.requests and not self.scheduler.loading
        if self.tiers is not None:
            assert self.tiers.plans_out == 0, "a tier plan was never loaded nor released"
        for request, expected in self.requests:
            rid = request.request_id
            assert request.is_finished
            assert request.num_inflight_tokens == 0 and request.num_pending_outputs == 0, rid
            if id(request) in self.aborted:
                assert request.output_token_ids == expected[:len(request.output_token_ids)], \
                    f"{rid}: wrong tokens before its abort"
            else:
                assert request.output_token_ids == expected, \
                    f"{rid}: {request.output_token_ids} != {expected} alone"


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict, list[tuple]]:
    num_blocks = draw(st.integers(3, 12))
    max_model_len = draw(st.integers(2, num_blocks * BLOCK))
    config = dict(
        num_blocks=num_blocks,
        budget=draw(st.integers(1, 24)),
        max_seqs=draw(st.integers(1, 6)),
        threshold=draw(st.sampled_from([0, 0, 3, 5])),
        policy=draw(st.sampled_from(["fcfs", "lpm"])),
        short=draw(st.sampled_from([0, 0, 6])),
        separate=draw(st.booleans()),
        caching=draw(st.booleans()),
        tiers=draw(st.booleans()),
        delays=draw(st.lists(st.integers(0, 4), max_size=8)),
        stores_on_compute=draw(st.booleans()),
        async_scheduling=draw(st.booleans()),
        max_model_len=max_model_len,
    )
    config["tiers"] = config["tiers"] and config["caching"]
    config["max_seqs"] = min(config["max_seqs"], config["budget"])  # as the config requires
    prefixes = [draw(st.lists(st.integers(1, 9), min_size=1, max_size=3 * BLOCK))
                for _ in range(2)]
    ops: list[tuple] = []
    for index in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["add", "add", "add", "step", "step", "step", "abort",
                                     "drain"]))
        if kind == "add":
            prefix = draw(st.sampled_from(prefixes))
            prompt = prefix[:draw(st.integers(0, len(prefix)))] + draw(
                st.lists(st.integers(1, 9), max_size=2 * BLOCK))
            prompt = (prompt or [1])[:max_model_len - 1]
            if not prompt:
                continue
            stop = tuple(draw(st.lists(st.integers(1, 97), max_size=1)))
            # Some reuse the id of an earlier request, once it is free again.
            rid = f"r{draw(st.integers(0, index))}" if draw(st.booleans()) else f"r{index}"
            ops.append(("add", rid, prompt, draw(st.integers(1, 16)), stop))
        elif kind == "step":
            ops.append(("step", draw(st.integers(1, 4))))
        elif kind == "abort":
            ops.append(("abort", draw(st.integers(0, 20))))
        else:
            ops.append(("drain", draw(st.booleans())))
    return config, ops


def run_scenario(config: dict, ops: list[tuple]) -> Harness:
    harness = Harness(**config)
    added: list[str] = []
    for op in ops:
        if op[0] == "add":
            if not harness.scheduler.request_id_in_use(op[1]):  # as the engine refuses it
                harness.add(*op[1:])
                added.append(op[1])
        elif op[0] == "step":
            for _ in range(op[1]):
                harness.step()
        elif op[0] == "abort":
            live = sorted({rid for rid in added if rid in harness.scheduler.requests})
            if live:
                harness.abort(live[op[1] % len(live)])
        elif op[0] == "drain":
            harness.drain()
            if op[1] and harness.in_flight is None:  # idle: reset the prefix cache
                harness.kv.pool.reset_prefix_cache()
    harness.drain()
    harness.check_idle()
    return harness


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_schedule_gives_each_request_its_own_tokens(scenario: tuple[dict, list]) -> None:
    run_scenario(*scenario)


def test_the_harness_sees_preemptions_loads_and_hits() -> None:
    """What the scenarios stress happens in the harness: a prefix computed, forgotten by a
    reset, loaded from the tier (two polls late) for four requests that preempt each other."""
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    config = dict(num_blocks=6, budget=8, max_seqs=4, threshold=0, policy="fcfs", short=0,
                  separate=False, caching=True, tiers=True, delays=[2], stores_on_compute=False,
                  async_scheduling=True, max_model_len=24)
    ops = [("add", f"r{i}", prompt + [i], 10, ()) for i in range(4)]
    harness = run_scenario(config, [ops[0], ("drain", True), *ops[1:]])
    assert harness.scheduler.num_preemptions > 0
    assert harness.tiers is not None and harness.tiers.delays == []
    assert harness.requests[1][0].metrics.num_tier_hit_tokens.get("cpu") == 8
