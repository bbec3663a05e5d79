"""The synchronous engine: add requests, step, abort. One thread drives it.

    add_request -> validate -> Scheduler.waiting
    step        -> Scheduler.schedule -> ModelRunner.execute -> Scheduler.update_from_output
                -> OutputProcessor (text, stop strings) -> RequestOutputs

Every bad input is rejected in `add_request` with `InvalidRequestError` before anything is
queued, so a bad request never costs other requests anything.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from dataclasses import dataclass

import torch

from kvtier.attention import create_backend
from kvtier.config import ConfigError, EngineConfig
from kvtier.engine.output_processor import OutputProcessor
from kvtier.engine.stats import EngineStats
from kvtier.kv import BlockPool, KVCacheManager, root_block_hash, salted_root_hash
from kvtier.model.builder import build_model
from kvtier.model.generation_config import load_sampling_defaults
from kvtier.model.loader import ModelSource, resolve_model
from kvtier.model.tokenizer import Tokenizer
from kvtier.request import Request
from kvtier.runner.memory import (
    plan_kv_blocks,
    profile_activation_bytes,
    resolve_device,
    resolve_dtype,
)
from kvtier.runner.model_runner import ModelRunner, PendingOutput
from kvtier.runner.piecewise_graph import estimate_bytes as estimate_piecewise_bytes
from kvtier.scheduler import Scheduler
from kvtier.tiers.base import KVLayout, TierStore
from kvtier.tiers.cost import PrefillRate, attention_per_key, token_weight
from kvtier.tiers.manager import TierManager
from kvtier.tiers.stack import build_tier_manager, close_stores, open_disk_tiers
from kvtier.types import (
    FinishReason,
    InvalidRequestError,
    OutputDelta,
    PrefixCacheReset,
    RequestOutput,
    SamplingParams,
    ScheduledRequest,
    SchedulerOutput,
)
from kvtier.utils.gc_pauses import collector_paused
from kvtier.utils.host_memory import keep_freed_memory
from kvtier.utils.profiling import open_step_trace

logger = logging.getLogger(__name__)

WARMUP_STEPS = ((0, 4352), (4096, 64), (4096, 256), (4096, 384), (4096, 768), (4096, 1024),
                (512, 64), (0, 300), (4096, 2048))
"""(cached context, new tokens) of the steps run once at start-up on CUDA, so Triton compiles
the prefill kernel's variants before the first request does: a whole prompt (read by
`prompt_kernel`), extends that run the split tiles split (reduce buckets 16, 8 and 4: 64, 256
and 384 new tokens after 4,096; 64 after 512; bucket 2: a lone 300-token prompt) and unsplit
(768 and 1,024 after 4,096), and a long chunk after a cached context (the paged kernel's
long-prompt tiles: 2,048 after 4,096; without it a fresh H200 compiled them for 1.7 s in
workload S's first steps). tests/unit/attention/test_warm_up_variants.py checks that these
reach every variant."""


@dataclass
class _StatsWindow:
    """Step counters since the last throughput log line."""

    start: float
    queried_at_start: int = 0
    hits_at_start: int = 0
    steps: int = 0
    decode_only: int = 0
    runner_s: float = 0.0
    decode_runner_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def add(self, scheduled: SchedulerOutput, runner_s: float, kind: str,
            decodes: int) -> None:
        """`kind` and `decodes`: the step's `_step_kind` and `_num_decodes`."""
        self.steps += 1
        self.runner_s += runner_s
        decode_only = kind == "decode"
        self.decode_only += decode_only
        self.decode_runner_s += runner_s if decode_only else 0.0
        self.prompt_tokens += scheduled.num_scheduled_tokens - decodes
        self.generated_tokens += sum(1 for s in scheduled.requests if s.sample)


def _num_decodes(scheduled: SchedulerOutput) -> int:
    """Rows that are one sampled token (a decode, or a prompt's last token alone)."""
    return sum(1 for s in scheduled.requests if len(s.token_ids) == 1 and s.sample)


def _step_kind(scheduled: SchedulerOutput, decodes: int) -> str:
    """The step's kind: "decode" (every row one sampled token; `decodes` is
    `_num_decodes(scheduled)`), "prompt" (prompt tokens, decodes or not beside them) or
    "empty" (nothing ran: every request waiting for a load)."""
    if not scheduled.requests:
        return "empty"
    return "decode" if decodes == len(scheduled.requests) else "prompt"


@dataclass
class LaunchedStep:
    """A step queued on the device, its tokens not yet read."""

    scheduled: SchedulerOutput
    pending: PendingOutput
    started: float


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        started = time.monotonic()
        self.source: ModelSource = resolve_model(config.model.model, seed=config.model.seed)
        self.tokenizer = self.source.tokenizer
        self.spec = self.source.spec
        self.sampling_defaults = load_sampling_defaults(
            config.model.generation_config, self.source.path,
            config.model.override_generation_config)
        if self.sampling_defaults.items():
            # vLLM's warning: a request's unset fields no longer mean the API's defaults.
            logger.warning("default sampling of requests that set none: %s (from %s; "
                           "--generation-config vllm for the API's own defaults)",
                           ", ".join(f"{name} {value}" for name, value
                                     in self.sampling_defaults.items().items()),
                           self.sampling_defaults.source)
        requested_len = config.scheduler.max_model_len
        if requested_len is not None and requested_len > self.spec.max_context_len:
            # The rotary table ends there (a longer prompt would fail the step it runs in), or
            # the model's sliding window does (this engine's attention would see too much).
            key, limit, note = "max_position_embeddings", self.spec.max_position_embeddings, ""
            if self.spec.max_context_len < limit:
                key, limit = "sliding_window", self.spec.max_context_len
                note = (" (sliding-window attention is not implemented: contexts are capped "
                        "at the window)")
            raise ConfigError(f"max_model_len {requested_len} is more than the model's "
                              f"{key} {limit}{note}")
        self._step_trace = open_step_trace()
        """KVTIER_STEP_TRACE's file: a JSON line per step (utils/profiling.py), or None."""
        self._shut_down = False
        self._trace_tier_totals = (0, 0)
        """Tier loads finished and stores started at the last trace line."""
        self.device = resolve_device(config.model)
        if self.device.type == "cpu":  # the forward pass allocates its activations on the host
            keep_freed_memory()
        self.async_scheduling = config.resolved_async_scheduling(self.device.type)
        """Whether the engine's callers (`LLM.generate`, the engine core) launch each step
        before reading the tokens of the one before."""
        self.dtype = resolve_dtype(config.model, self.spec, self.device)
        disk_tiers = open_disk_tiers(config.tiers, self._kv_layout())
        self.tiers: TierManager | None = None
        try:
            self._build(config, started, disk_tiers)
        except BaseException:
            # A start that failed (a backend refused, no memory for the pool) lets go of the
            # disk tiers' folders: an `LLM(...)` that raised held them until collected.
            if self.tiers is not None:
                self.tiers.close()
            close_stores(disk_tiers.values())
            raise

    def _build(self, config: EngineConfig, started: float,
               disk_tiers: dict[int, TierStore]) -> None:
        """The model, the KV pool, the tiers and the graphs (`__init__`'s heavy part)."""
        try:
            backend = create_backend(config.attention_backend, self.device.type,
                                     config.batch_invariant)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.model = build_model(self.source, backend, self.device, self.dtype,
                                 batch_invariant=config.batch_invariant)
        activation_bytes = 0
        if self.device.type == "cuda" and config.cache.num_gpu_blocks_override is None:
            activation_bytes = profile_activation_bytes(
                self.model, backend, self.device, self.dtype,
                config.scheduler.max_num_batched_tokens, config.cache.block_size,
                config.scheduler.max_num_seqs, self.spec.vocab_size,
                self.spec.vocab_size if config.model.max_logprobs == -1
                else config.model.max_logprobs,
                max_context=config.scheduler.max_model_len or self.spec.max_context_len)
            if backend.supports_cuda_graphs and not config.enforce_eager:
                activation_bytes += estimate_piecewise_bytes(
                    self.spec, self._piecewise_max_tokens(),
                    torch.empty(0, dtype=self.dtype).element_size())
        plan = plan_kv_blocks(config.cache, self.spec, self.device, self.dtype, activation_bytes)
        block_size = config.cache.block_size
        self.pool = BlockPool(plan.num_blocks, config.cache.enable_prefix_caching)
        root = root_block_hash(self.source.model_id, str(self.dtype).removeprefix("torch."),
                               f"block_size={block_size}")
        self.kv_manager = KVCacheManager(self.pool, block_size, root)
        model_len = config.scheduler.max_model_len or self.spec.max_context_len
        # One request must always fit in the pool by itself, or preemption could never end.
        self.max_model_len = min(model_len, plan.num_blocks * block_size)
        if self.max_model_len < model_len:
            origin = ("asked for" if config.scheduler.max_model_len
                      else "the model's context length")
            logger.warning("max_model_len lowered to %d (%s: %d): the KV pool holds %d "
                           "blocks of %d tokens, and one request must fit in it alone",
                           self.max_model_len, origin, model_len, plan.num_blocks, block_size)
        self.runner = ModelRunner(self.model, backend, plan.num_blocks, block_size, self.device,
                                  self.dtype, config.model.seed)
        if config.tiers.kv_tiers:
            self.tiers = build_tier_manager(config.tiers, self._kv_layout(), self.runner.kv_cache,
                                            self.pool, self._probe_prefill_rate(), disk_tiers)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.tiers)
        self.stats = EngineStats()
        if self.tiers is not None:
            self.stats.num_tier_hit_tokens = {store.name: 0 for store in self.tiers.stores}
        if (self.device.type == "cuda" and backend.supports_cuda_graphs
                and not config.enforce_eager):
            with collector_paused():  # no CUDA frees from a collection while capturing
                self.runner.capture_decode_graphs(min(config.scheduler.max_num_seqs, 512),
                                                  self.max_model_len)
                if self._piecewise_max_tokens():
                    self.runner.capture_piecewise_graphs(self._piecewise_max_tokens())
            # A graph replays a decode step for a fraction of an eager step's launch cost, so
            # decodes run in steps of their own instead of riding along with prefill chunks.
            self.scheduler.separate_prefill_steps = True
            try:
                self.warm_up_prefill_kernels()
            except Exception:  # an optimisation only: the kernels then compile on first use
                logger.warning("prefill warm-up failed", exc_info=True)
        self.outputs = OutputProcessor(self.tokenizer)
        # The detokenizer's per-id byte table (~150k ids for Qwen) would be built on first use:
        # here instead, so that the first request does not wait for it inside the engine loop
        # (0.67 s under cProfile on an H200's host).
        self.tokenizer.token_bytes()
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(
            self.spec.eos_token_ids)
        self.log_stats_interval_s: float | None = None
        """Log a throughput line this often (the server sets it; offline runs stay quiet)."""
        self._window = _StatsWindow(time.monotonic())
        self._last_completed = 0.0
        """perf_counter() when the last step's tokens were read."""
        self._ids = itertools.count()
        logger.info("engine ready in %.1fs: %s on %s (%s), %d KV blocks of %d tokens, "
                    "backend %s, %s scheduling", time.monotonic() - started, self.source.name,
                    self.device, self.dtype, plan.num_blocks, block_size, backend.name,
                    "async" if self.async_scheduling else "synchronous")

    def _piecewise_max_tokens(self) -> int:
        """Largest step captured as piecewise graphs (0: none)."""
        return min(self.config.max_cudagraph_capture_size,
                   self.config.scheduler.max_num_batched_tokens)

    def _kv_layout(self) -> KVLayout:
        return KVLayout(model_id=self.source.model_id,
                        dtype=str(self.dtype).removeprefix("torch."),
                        num_layers=self.spec.num_hidden_layers,
                        num_kv_heads=self.spec.num_key_value_heads, head_dim=self.spec.head_dim,
                        block_size=self.config.cache.block_size,
                        dtype_bytes=torch.empty((), dtype=self.dtype).element_size())

    def _probe_prefill_rate(self) -> PrefillRate:
        """The prefill rate and a step's fixed cost (`tiers.cost`), from warm-up forwards
        before any request: the largest step the token budget allows (up to 8,192 tokens on
        CUDA, 256 on the CPU, where a step is nearly all compute and larger ones would slow
        the start) gives the rate; one an eighth as large (at most 256 tokens), the fixed cost.
        On CUDA a small step's time is the host's launching, which the device's work hides
        up to a point: timing two small sizes read the 1.7M tokens/s of a slope that launches
        flatten (an H200, against ~170k in 8,192-token steps)."""
        block_size = self.config.cache.block_size
        large = min(8192 if self.device.type == "cuda" else 256,
                    self.config.scheduler.max_num_batched_tokens,
                    self.pool.num_blocks * block_size)
        small = max(1, min(256, large // 8))
        seconds = {}
        for num_tokens in (small, large):
            blocks = list(range(-(-num_tokens // block_size)))
            step = SchedulerOutput([ScheduledRequest(
                "warmup", [0] * num_tokens, 0, blocks, True, SamplingParams(max_tokens=1), 0)],
                num_tokens)
            for _ in range(2):  # the first run warms kernels up
                started = time.perf_counter()
                self.runner.execute(step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds[num_tokens] = max(time.perf_counter() - started, 1e-9)
            self.runner.sampler.forget(["warmup"])
        spec = self.spec
        per_key = attention_per_key(spec.num_hidden_layers, spec.hidden_size,
                                    spec.intermediate_size, spec.num_attention_heads,
                                    spec.num_key_value_heads, spec.head_dim)
        return PrefillRate(token_weight(per_key, 0, large) / seconds[large],
                           step_overhead_s=seconds[small] if small < large else 0.0,
                           attention_per_key=per_key)

    def warm_up_prefill_kernels(self) -> None:
        """Run each step of WARMUP_STEPS once (fitted to the pool and the token budget).

        On a fresh machine Triton compiles a kernel variant the first time a step needs it,
        0.3-1 s each: workload Q's first requests logged 311 ms per step and a p99 TTFT of
        0.9-1.4 s when nothing had warmed the cache. The steps write into free blocks that no
        request owns and nothing caches, and sample greedily (no RNG state is consumed)."""
        started = time.monotonic()
        block_size = self.config.cache.block_size
        capacity = self.pool.num_blocks * block_size
        budget = self.config.scheduler.max_num_batched_tokens
        for context, query in WARMUP_STEPS:
            query = min(query, budget, capacity - 1)
            context = max(0, min(context, capacity - query))
            blocks = list(range(-(-(context + query) // block_size)))
            step = SchedulerOutput([ScheduledRequest(
                "warmup", [0] * query, context, blocks, True,
                SamplingParams(max_tokens=1, temperature=0.0), 0)], query)
            self.runner.execute(step)
        self.runner.sampler.forget(["warmup"])
        logger.info("prefill kernels warmed up in %.1fs", time.monotonic() - started)

    @property
    def model_name(self) -> str:
        return self.source.name

    # -- requests ----------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return self.tokenizer.encode(prompt)
        # Exact ints only (bool is an int subclass); map/set keep the scan in C, since the
        # engine core checks every prompt of every request between steps.
        if not isinstance(prompt, (list, tuple)) or not set(map(type, prompt)) <= {int}:
            raise InvalidRequestError("prompt must be a string or a list of token ids")
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    queued_time: float | None = None, cache_salt: str | None = None) -> str:
        """Validate and queue a request; returns its id. Raises InvalidRequestError.
        `queued_time`: when the engine core received it (default: now). `cache_salt`
        (vLLM's): only requests with the same salt share this one's cached KV."""
        if self._shut_down:
            raise RuntimeError("the engine has been shut down: start a new one")
        params = params or SamplingParams()
        token_ids = self.tokenize_prompt(prompt)
        if params.bad_words:
            params = dataclasses.replace(params, bad_words_token_ids=(
                params.bad_words_token_ids + bad_words_token_ids(self.tokenizer,
                                                                 params.bad_words)))
        self._validate(token_ids, params)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError(f"cache_salt must be a non-empty string, got "
                                      f"{cache_salt!r}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if self.scheduler.request_id_in_use(request_id):
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        request = Request(request_id, token_ids, params, eos_token_ids=self.eos_token_ids,
                          max_model_len=self.max_model_len,
                          prompt=prompt if isinstance(prompt, str) else None,
                          hash_root=None if cache_salt is None
                          else salted_root_hash(self.kv_manager.root_hash, cache_salt))
        if arrival_time is not None:
            request.arrival_time = request.metrics.arrival_time = arrival_time
        request.metrics.queued_time = time.monotonic() if queued_time is None else queued_time
        self.outputs.add_request(request)
        self.scheduler.add_request(request)
        return request_id

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens, but max_model_len is {self.max_model_len} "
                "(prompt + at least one output token must fit)", param="prompt")
        vocab = self.spec.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            bad = next(t for t in token_ids if not 0 <= t < vocab)
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})",
                                      param="prompt")
        max_logprobs = self.config.model.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is not None and max_logprobs != -1 and asked > max_logprobs:
                raise InvalidRequestError(f"{name} {asked} is more than this server's "
                                          f"max_logprobs {max_logprobs}", param=name)
        bad_stop = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad_stop is not None:  # min_tokens masks them in the logits
            raise InvalidRequestError(f"stop token id {bad_stop} is outside the vocabulary "
                                      f"(0..{vocab - 1})", param="stop_token_ids")
        bad_allowed = next((t for t in params.allowed_token_ids or () if t >= vocab), None)
        if bad_allowed is not None:
            raise InvalidRequestError(f"allowed_token_ids holds token id {bad_allowed}, outside "
                                      f"the vocabulary (0..{vocab - 1})",
                                      param="allowed_token_ids")
        if (params.allowed_token_ids is not None and params.min_tokens
                and set(params.allowed_token_ids) <= self.eos_token_ids
                | set(params.stop_token_ids)):  # nothing would be left to sample
            raise InvalidRequestError("allowed_token_ids holds only EOS and stop token ids, "
                                      "which min_tokens keeps out of the first outputs",
                                      param="allowed_token_ids")
        bad_word = next((t for ids in params.bad_words_token_ids for t in ids if t >= vocab),
                        None)
        if bad_word is not None:
            raise InvalidRequestError(f"bad_words_token_ids holds token id {bad_word}, outside "
                                      f"the vocabulary (0..{vocab - 1})", param="bad_words")
        bad_bias = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if bad_bias is not None:
            raise InvalidRequestError(f"logit_bias token id {bad_bias} is outside the "
                                      f"vocabulary (0..{vocab - 1})", param="logit_bias")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output if it was live."""
        request = self.scheduler.finish_request(request_id, FinishReason.ABORT)
        if request is None:
            return None
        self._count_finished(request)
        output = self.outputs.make_output(request, finished=True)
        return output

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- stepping ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns outputs of requests that produced a token or finished."""
        return self.make_outputs(self.complete_step(self.launch_step()))

    # A step in three parts, so that a caller (the engine core) can turn the previous step's
    # results into outputs and send them while the device runs the next one:
    #     launched = launch_step(); outputs = make_outputs(previous); previous = complete_step(
    #     launched)
    # Scheduling still waits for the previous step's tokens; only output building overlaps.
    # With async scheduling the caller launches the next step before completing this one:
    #     launched = launch_step(); updated = complete_step(previous); previous = launched

    def launch_step(self) -> LaunchedStep:
        """Schedule a batch and queue it on the device."""
        scheduled = self.scheduler.schedule()
        if not scheduled.requests and self.tiers is not None and \
                self.tiers.has_inflight_transfers and not self.scheduler.has_tokens_in_flight():
            # Nothing could run: every request waits for a load. Sleep on a transfer's
            # completion rather than spin, which would starve the transfer threads of the GIL.
            # (With a step in flight, whose results change that, the caller reads it first.)
            self.tiers.wait_for_transfer(timeout_s=0.01)
        started = time.perf_counter()
        pending = self.runner.launch(scheduled)
        self.scheduler.store_ahead()
        return LaunchedStep(scheduled, pending, started)

    def complete_step(self, launched: LaunchedStep) -> list[Request]:
        """Wait for a launched step's tokens and apply them: request state, stop tokens and
        strings (finishing requests now, before the next schedule), counters. Returns the
        requests that got a token or finished, for `make_outputs`."""
        scheduled = launched.scheduled
        runner_output = launched.pending.result()
        # Launch to tokens: the step's device time plus any host work done in between. A step
        # launched while the one before it ran (async scheduling) starts when that one's
        # tokens were read.
        now = time.perf_counter()
        runner_s = now - max(launched.started, self._last_completed)
        self._last_completed = now
        if self.tiers is not None:
            self._observe_prefill(scheduled, runner_s)
        updated = self.scheduler.update_from_output(scheduled, runner_output)
        decodes = _num_decodes(scheduled)  # one pass over the rows, for every count below
        kind = _step_kind(scheduled, decodes)
        self._count_step(updated, kind, runner_s)
        if self._step_trace is not None:
            self._trace_step(now, kind, scheduled, decodes, runner_s)
        if self.log_stats_interval_s is not None:
            self._window.add(scheduled, runner_s, kind, decodes)
            if time.monotonic() - self._window.start >= self.log_stats_interval_s:
                self._log_window()
        for request in updated:
            stop = self.outputs.detokenize(request)
            if stop is not None and not request.is_finished:
                self.scheduler.finish_request(request.request_id, FinishReason.STOP, stop)
            elif stop is not None:  # finished by a token in the same step; the string wins
                request.finish_reason, request.stop_reason = FinishReason.STOP, stop
            if request.is_finished:
                self._count_finished(request)
        return updated

    def make_delta(self, request: Request, with_prompt: bool) -> OutputDelta | None:
        """The engine core's delta of a completed-step request's new output; None if it was
        aborted since (its abort returned its final output)."""
        if not self.outputs.is_tracking(request.request_id):
            return None
        return self.outputs.make_delta(request, with_prompt)

    def make_outputs(self, updated: list[Request]) -> list[RequestOutput]:
        """RequestOutputs of completed-step requests (those aborted since are skipped: their
        abort already returned their final output)."""
        return [self.outputs.make_output(request, finished=request.is_finished)
                for request in updated if self.outputs.is_tracking(request.request_id)]

    def _observe_prefill(self, scheduled: SchedulerOutput, seconds: float) -> None:
        """Feed the tiers' cost model with prefill-dominated steps."""
        assert self.tiers is not None
        if scheduled.num_scheduled_tokens == len(scheduled.requests):
            return  # one token per row: decodes only (most steps), no prefill to observe
        prefills = [s for s in scheduled.requests if len(s.token_ids) > 1]
        num_prefill = sum(len(s.token_ids) for s in prefills)
        if num_prefill >= 32 and 2 * num_prefill >= scheduled.num_scheduled_tokens:
            positions = sum(len(s.token_ids) * (s.num_computed_tokens + (len(s.token_ids) - 1) / 2)
                            for s in prefills)
            self.tiers.cost.observe_prefill(num_prefill, seconds, positions / num_prefill)

    def _trace_step(self, now: float, kind: str, scheduled: SchedulerOutput, decodes: int,
                    runner_s: float) -> None:
        """One KVTIER_STEP_TRACE line; with tiers, also the loads that finished and the stores
        that started since the last line (a latency tail can be the tier's work)."""
        assert self._step_trace is not None
        line = {"t": round(now, 6), "kind": kind, "rows": len(scheduled.requests),
                "decodes": decodes, "tokens": scheduled.num_scheduled_tokens,
                "ms": round(1e3 * runner_s, 3)}
        if self.tiers is not None:
            loads, stores = self.tiers.stats.num_loads, self.tiers.stats.num_stores_started
            line["loads"] = loads - self._trace_tier_totals[0]
            line["stores"] = stores - self._trace_tier_totals[1]
            self._trace_tier_totals = (loads, stores)
        self._step_trace.write(json.dumps(line) + "\n")

    def _count_step(self, updated: list[Request], kind: str, runner_s: float) -> None:
        stats = self.stats
        stats.num_steps += 1
        if kind == "decode":
            stats.num_decode_only_steps += 1
            stats.decode_only_step_seconds += runner_s
        elif kind == "prompt":
            stats.num_prompt_steps += 1
            stats.prompt_step_seconds += runner_s
        stats.num_generation_tokens += len(updated)
        for request in updated:
            if request.num_output_tokens == 1:  # its prefill just finished
                stats.num_prompt_tokens += request.num_prompt_tokens
                stats.num_prefix_cache_queried_tokens += request.num_prompt_tokens
                stats.num_prefix_cache_hit_tokens += request.metrics.num_cached_tokens
                for tier, tokens in request.metrics.num_tier_hit_tokens.items():
                    if tier != "device":
                        stats.num_tier_hit_tokens[tier] = (
                            stats.num_tier_hit_tokens.get(tier, 0) + tokens)
        stats.num_preemptions = self.scheduler.num_preemptions

    def _count_finished(self, request: Request) -> None:
        reason = request.finish_reason.value if request.finish_reason else "unknown"
        self.stats.num_finished[reason] = self.stats.num_finished.get(reason, 0) + 1

    def _log_window(self) -> None:
        window, now = self._window, time.monotonic()
        elapsed = max(now - window.start, 1e-9)
        stats = self.get_stats()
        queried = stats.num_prefix_cache_queried_tokens - window.queried_at_start
        hits = stats.num_prefix_cache_hit_tokens - window.hits_at_start
        tier = ""
        if stats.num_tier_hit_tokens:
            tier = " | tier hit tokens " + ", ".join(
                f"{name} {tokens}" for name, tokens in stats.num_tier_hit_tokens.items())
        if self.tiers is not None:  # why hits are not loaded, when they are not
            cost = self.tiers.cost
            tier += " (" + ", ".join(
                f"{name} {rate.bytes_per_s / 1e9:.1f} GB/s" for name, rate in
                cost.tier_rates.items()) + f"; prefill {cost.prefill_tokens_per_s:.0f} tok/s; " \
                f"{self.tiers.stats.num_rejected_cost} refused by cost; " \
                f"{self.tiers.stores[0].stats.num_stored_entries} stored, min hits " \
                f"{self.tiers.stats.store_min_hits} at reuse {self.tiers.stats.reuse_rate:.0%})"
        logger.info(
            "%d steps (%.1f ms on the runner; %d decode-only, %.1f ms) | prompt %.0f tok/s, "
            "generation "
            "%.0f tok/s | running %d, waiting %d, loading %d | KV %.0f%% | prefix hits %.0f%%%s"
            " | preemptions %d", window.steps, 1e3 * window.runner_s / max(window.steps, 1),
            window.decode_only, 1e3 * window.decode_runner_s / max(window.decode_only, 1),
            window.prompt_tokens / elapsed,
            window.generated_tokens / elapsed, stats.num_running, stats.num_waiting,
            stats.num_loading, 100 * stats.kv_usage, 100 * hits / max(queried, 1), tier,
            stats.num_preemptions)
        self._window = _StatsWindow(now, stats.num_prefix_cache_queried_tokens,
                                    stats.num_prefix_cache_hit_tokens)

    def shutdown(self) -> None:
        """Store what lazy tiers still hold only on the device, wait for transfers to finish,
        copy each tier's entries into the tier below (a disk tier then survives the restart
        with everything) and release tier resources."""
        if self._shut_down:
            return
        self._shut_down = True
        if self._step_trace is not None:
            self._step_trace.close()
            self._step_trace = None
        if self.tiers is not None:
            self.tiers.flush_candidates()
            self.tiers.wait_idle()
            copied = self.tiers.write_down()
            if copied:
                logger.info("tiers: copied %d entries into lower tiers at shutdown", copied)
            self.tiers.close()

    def reset_prefix_cache(self, reset_tiers: bool = False) -> PrefixCacheReset:
        """Forget the device prefix cache, and with `reset_tiers` what the KV tiers hold, so
        the next requests compute their prompts afresh (benchmarks' cold runs, new weights).
        Refused while requests are unfinished, as vLLM's: their blocks would stay cached."""
        unfinished = len(self.scheduler.requests) + len(self.scheduler.loading)
        if unfinished:
            return PrefixCacheReset(False, reason=f"requests are unfinished ({unfinished}): "
                                    "their blocks would stay cached")
        tier_entries = 0
        if self.tiers is not None:
            if not reset_tiers:  # the tiers get what an eviction would have copied down
                self.tiers.flush_candidates()
            self.tiers.wait_idle()  # stores still reading device blocks hold them
        held = self.pool.num_blocks - self.pool.num_free_blocks
        if held:
            return PrefixCacheReset(False, reason=f"{held} KV blocks are still in use")
        device_blocks = self.pool.reset_prefix_cache()
        if reset_tiers and self.tiers is not None:
            tier_entries = self.tiers.clear_stores()
        logger.info("prefix cache reset: %d device blocks%s forgotten", device_blocks,
                    f" and {tier_entries} tier entries" if reset_tiers else "")
        return PrefixCacheReset(True, device_blocks, tier_entries)

    def get_stats(self) -> EngineStats:
        self.stats.num_running = self.scheduler.num_running
        self.stats.num_waiting = self.scheduler.num_waiting
        self.stats.num_loading = len(self.scheduler.loading)
        self.stats.kv_usage = self.pool.usage
        if self.tiers is not None:
            for store in self.tiers.stores:
                store.stats.used_bytes = store.used_bytes
                store.stats.capacity_bytes = store.capacity_bytes
            self.stats.tiers = {store.name: store.stats for store in self.tiers.stores}
            self.stats.tier_manager = self.tiers.stats
        return self.stats


def bad_words_token_ids(tokenizer: Tokenizer, words: tuple[str, ...],
                        ) -> tuple[tuple[int, ...], ...]:
    """vLLM's reading of `bad_words`: each word (its leading spaces dropped) as the tokenizer
    encodes it alone, and after a space when that gives as many tokens starting with another
    one (most BPE vocabularies spell a word differently after a space)."""
    sequences: list[tuple[int, ...]] = []
    for word in (w.lstrip() for w in words):
        bare = tokenizer.encode(word, add_special_tokens=False)
        spaced = tokenizer.encode(" " + word, add_special_tokens=False)
        if not bare:
            continue
        sequences.append(tuple(bare))
        if len(spaced) == len(bare) and spaced[0] != bare[0]:
            sequences.append(tuple(spaced))
    return tuple(sequences)
