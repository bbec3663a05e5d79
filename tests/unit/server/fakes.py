"""A stand-in for `LLMEngine` with the same surface the AsyncEngine and the server use.

Each step gives every running request one token `t<n> ` (n = output index); at most
`max_running` requests run, the rest wait, like the real scheduler's max_num_seqs. It records
the thread of every call, so tests can check the one-thread rule.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from kvtier.config import EngineConfig
from kvtier.engine.async_engine import AsyncEngine
from kvtier.engine.core_messages import output_delta
from kvtier.engine.engine import LLMEngine
from kvtier.engine.stats import EngineStats
from kvtier.model.generation_config import SamplingDefaults
from kvtier.types import (
    CompletionOutput,
    InvalidRequestError,
    OutputDelta,
    PrefixCacheReset,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
)


class FakeTokenizer:
    """One token per character (ids = code points)."""

    vocab_size = 0x110000
    BOS = 1
    adds_bos = False
    """Whether add_special_tokens prepends BOS (the /tokenize tests turn it on)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.BOS] * (add_special_tokens and self.adds_bos) + [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == self.BOS))

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [chr(i) for i in ids]

    def token_bytes(self, skip_special_tokens: bool = True) -> None:
        """Not byte-level BPE (as `Tokenizer.token_bytes` answers for such tokenizers)."""
        return None

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, *,
                            continue_final_message: bool = False,
                            tools: list[dict[str, Any]] | None = None,
                            template_kwargs: dict[str, Any] | None = None) -> str:
        """`<role>content` per message: no end of turn, so the text always ends inside the
        final message (what `continue_final_message` asks of a real template)."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message excludes add_generation_prompt")
        if any(m["role"] == "tool" for m in messages):
            raise ValueError("this template has no tool role")
        rendered = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        if tools:
            rendered = f"<tools>{len(tools)}" + rendered
        if template_kwargs:
            rendered += "".join(f"<{k}={v}>" for k, v in sorted(template_kwargs.items()))
        return rendered + "<assistant>" * add_generation_prompt


@dataclass
class _Req:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    tokens: list[int] = field(default_factory=list)
    num_sent: int = 0


@dataclass
class _Completed:
    output: RequestOutput

    @property
    def is_finished(self) -> bool:
        return self.output.finished

    @property
    def request_id(self) -> str:
        return self.output.request_id


class _Launched(list[RequestOutput]):
    """A launched fake step: its outputs, and what the core reads of a LaunchedStep."""

    @property
    def scheduled(self) -> SimpleNamespace:
        return SimpleNamespace(requests=list(self))


class FakeEngine:
    model_name = "fake-model"
    max_model_len = 64
    overlap_outputs = False
    """The engine core's turn for new fakes (tests run the core every way)."""
    async_scheduling = False

    def __init__(self, max_running: int = 8, step_delay_s: float = 0.002,
                 fail_steps: int = 0) -> None:
        self.config = EngineConfig(overlap_outputs=self.overlap_outputs,
                                   async_scheduling=self.async_scheduling)
        self.tokenizer = FakeTokenizer()
        self.sampling_defaults = SamplingDefaults()
        self.pool = SimpleNamespace(num_free_blocks=100, num_blocks=100)
        self.max_running = max_running
        self.step_delay_s = step_delay_s
        self.fail_steps = fail_steps
        self.requests: dict[str, _Req] = {}
        self.stats = EngineStats()
        self.threads: set[int] = set()
        self.num_calls = 0
        self.aborted: list[str] = []
        self.shut_down = False
        self.reset_result = PrefixCacheReset(True)
        """What `reset_prefix_cache` answers."""
        self.resets: list[bool] = []
        """`reset_tiers` of every reset asked for."""
        self.cache_salts: list[str | None] = []
        """`cache_salt` of every request added."""
        self.reply: list[str] | None = None
        """When set, output token n's text is reply[n] (not `t<n> `), and a request ends with
        "stop" after the last (a model's scripted answer)."""

    def _touch(self) -> None:
        self.threads.add(threading.get_ident())
        self.num_calls += 1

    def reset_prefix_cache(self, reset_tiers: bool = False) -> PrefixCacheReset:
        self._touch()
        self.resets.append(reset_tiers)
        return self.reset_result

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None, arrival_time: float | None = None,
                    queued_time: float | None = None, cache_salt: str | None = None) -> str:
        self._touch()
        self.cache_salts.append(cache_salt)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError("prompt too long")
        request_id = request_id or f"r{len(self.requests)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        metrics = RequestMetrics(arrival_time=arrival_time or time.monotonic(),
                                 queued_time=queued_time, num_prompt_tokens=len(ids))
        self.requests[request_id] = _Req(request_id, ids, params, metrics)
        return request_id

    # The engine core's three-part step (see LLMEngine.launch_step): here all work happens
    # at launch; completion wraps the outputs, and outputs of requests aborted in between are
    # dropped, as the real engine's make_outputs does.
    def step(self) -> list[RequestOutput]:
        return self.make_outputs(self.complete_step(self.launch_step()))

    def complete_step(self, launched: list[RequestOutput]) -> list[_Completed]:
        self._touch()
        return [_Completed(output) for output in launched]

    def make_outputs(self, completed: list[_Completed]) -> list[RequestOutput]:
        self._touch()
        return [c.output for c in completed if c.output.request_id not in self.aborted]

    def make_delta(self, completed: _Completed, with_prompt: bool) -> OutputDelta | None:
        self._touch()
        if completed.output.request_id in self.aborted:
            return None
        return output_delta(completed.output, with_prompt)

    def launch_step(self) -> _Launched:
        self._touch()
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("injected step failure")
        time.sleep(self.step_delay_s)
        outputs = []
        for req in list(self.requests.values())[:self.max_running]:
            now = time.monotonic()
            req.metrics.first_scheduled_time = req.metrics.first_scheduled_time or now
            req.metrics.first_token_time = req.metrics.first_token_time or now
            req.tokens.append(len(req.tokens))
            stopped = self.reply is not None and len(req.tokens) >= len(self.reply)
            finished = stopped or len(req.tokens) >= req.params.max_tokens
            if finished:
                del self.requests[req.request_id]
                req.metrics.finished_time = now
            self.stats.num_generation_tokens += 1
            outputs.append(self._output(req, "stop" if stopped else "length" if finished
                                        else None))
        return _Launched(outputs)

    def _output(self, req: _Req, reason: str | None) -> RequestOutput:
        new = req.tokens[req.num_sent:]
        req.num_sent = len(req.tokens)
        text = "".join(self._text(t) for t in req.tokens)
        if reason is not None:
            self.stats.num_finished[reason] = self.stats.num_finished.get(reason, 0) + 1
        return RequestOutput(req.request_id, None, req.prompt_ids,
                             [CompletionOutput(0, text, list(req.tokens), reason)],
                             finished=reason is not None, metrics=req.metrics,
                             new_text="".join(self._text(t) for t in new), new_token_ids=new)

    def _text(self, token: int) -> str:
        return f"t{token} " if self.reply is None else self.reply[token]

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self._touch()
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.aborted.append(request_id)
        return self._output(req, "abort")

    def has_unfinished_requests(self) -> bool:
        self._touch()
        return bool(self.requests)

    def get_stats(self) -> EngineStats:
        self._touch()
        self.stats.num_running = min(len(self.requests), self.max_running)
        self.stats.num_waiting = max(0, len(self.requests) - self.max_running)
        return self.stats

    def shutdown(self) -> None:
        self._touch()
        self.shut_down = True


def start_async_engine(fake: FakeEngine, **kwargs: Any) -> AsyncEngine:
    engine = AsyncEngine(lambda: cast(LLMEngine, fake), **kwargs)
    engine.start()
    return engine
