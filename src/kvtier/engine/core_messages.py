"""What crosses between the serving front end and the engine core (a thread or a process).

Front end -> core: `AddRequest`, `AbortRequest`, `ResetPrefixCache` (and, to end, `StopCore`).
Core -> front end: one `CoreUpdate` per turn of the core's loop: acceptances, output deltas,
aborts, answered cache resets, and a stats snapshot. Everything here pickles, so the same
messages serve the in-thread core and the engine process; outputs travel as deltas (new tokens
and text, the prompt only once) so a step's message stays small however long the prompts are.
On the pipe an update's deltas go as columns (`CoreUpdate.__reduce__`): pickling the update is
the engine loop's work in every step.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat

from kvtier.engine.async_types import AbortReason, EngineSnapshot
from kvtier.types import (
    CompletionOutput,
    OutputDelta,
    PrefixCacheReset,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
)


@dataclass
class AddRequest:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    received_time: float | None = None
    """Stamped by the core's inbox when it takes the command (its metrics' queued time)."""
    cache_salt: str | None = None


@dataclass
class AbortRequest:
    request_id: str
    reason: AbortReason | None
    """None: the client went away, nobody is listening for the final output."""


@dataclass
class ResetPrefixCache:
    """Forget the device prefix cache, and with `tiers` the KV tiers' entries; answered by a
    `CacheReset` with the same `call_id`."""

    call_id: str
    tiers: bool = False


@dataclass
class StopCore:
    """Refuse what is queued, abort what is live ("shutdown"), shut the engine down."""


Command = AddRequest | AbortRequest | ResetPrefixCache


@dataclass
class Accepted:
    """The engine took the request (error None) or refused it (error says why)."""

    request_id: str
    error: BaseException | None = None


@dataclass
class Aborted:
    """A live request was aborted; `reason` None means its client left (nobody to tell)."""

    request_id: str
    reason: AbortReason | None
    final: OutputDelta | None


@dataclass
class CacheReset:
    call_id: str
    result: PrefixCacheReset


@dataclass
class CoreUpdate:
    snapshot: EngineSnapshot | None
    """Set just before the update is emitted."""
    num_adds_drained: int
    """Adds taken from the inbox this turn (accepted or refused), for admission counting."""
    time: float
    """time.monotonic() when the outputs were produced (one clock for all processes)."""
    accepted: list[Accepted] = field(default_factory=list)
    outputs: list[OutputDelta] = field(default_factory=list)
    aborted: list[Aborted] = field(default_factory=list)
    closed: bool = False
    """The core's last update: it stopped and shut its engine down."""
    resets: list[CacheReset] = field(default_factory=list)

    def __reduce__(self) -> tuple[Callable[..., CoreUpdate], tuple[object, ...]]:
        # The engine process pickles one update per step, on its loop, with a delta per
        # running request; most carry only new tokens and text, which travel as columns.
        return _update_from_wire, (self.snapshot, self.num_adds_drained, self.time,
                                   self.accepted, _deltas_to_wire(self.outputs), self.aborted,
                                   self.closed, self.resets)


_DELTA_COLUMNS = ("request_id", "new_token_ids", "new_text")
"""OutputDelta's first fields: all a plain delta (one that only streams) has."""
_DELTA_REST = operator.attrgetter(
    *(f.name for f in dataclasses.fields(OutputDelta) if f.name not in _DELTA_COLUMNS))
_request_ids, _new_token_ids, _new_texts = (operator.attrgetter(name) for name in _DELTA_COLUMNS)
DeltaWire = tuple[list[str], list[list[int]], list[str], list[tuple[int, tuple[object, ...]]]]


def _deltas_to_wire(deltas: list[OutputDelta]) -> DeltaWire:
    """Three columns, and the rest of the fields of each delta that has any (its index)."""
    # Field by field rather than comparing `_DELTA_REST(d)` with a plain delta's: that took
    # twice as long per delta, in every step of the engine loop. A test sets each field.
    rest = [(i, _DELTA_REST(d)) for i, d in enumerate(deltas)
            if d.finished or d.finish_reason is not None or d.stop_reason is not None
            or d.metrics is not None or d.final_text is not None or d.prompt is not None
            or d.prompt_token_ids is not None or d.new_logprobs is not None
            or d.prompt_logprobs is not None]
    return (list(map(_request_ids, deltas)), list(map(_new_token_ids, deltas)),
            list(map(_new_texts, deltas)), rest)


def _deltas_from_wire(wire: DeltaWire) -> list[OutputDelta]:
    ids, token_ids, texts, rest = wire
    deltas = list(map(OutputDelta, ids, token_ids, texts, repeat(False), repeat(None),
                      repeat(None), repeat(None)))
    for i, fields in rest:
        deltas[i] = OutputDelta(ids[i], token_ids[i], texts[i], *fields)  # type: ignore[arg-type]
    return deltas


def _update_from_wire(snapshot: EngineSnapshot | None, num_adds_drained: int, time: float,
                      accepted: list[Accepted], outputs: DeltaWire, aborted: list[Aborted],
                      closed: bool, resets: list[CacheReset]) -> CoreUpdate:
    return CoreUpdate(snapshot, num_adds_drained, time, accepted, _deltas_from_wire(outputs),
                      aborted, closed, resets)


def output_delta(output: RequestOutput, with_prompt: bool) -> OutputDelta:
    completion = output.outputs[0]
    return OutputDelta(
        request_id=output.request_id, new_token_ids=list(output.new_token_ids),
        new_text=output.new_text, finished=output.finished,
        finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
        metrics=output.metrics if with_prompt or output.finished else None,
        final_text=completion.text if output.finished else None,
        prompt=output.prompt if with_prompt else None,
        prompt_token_ids=output.prompt_token_ids if with_prompt else None,
        new_logprobs=(list(output.new_logprobs) if completion.logprobs is not None
                      else None),
        prompt_logprobs=output.prompt_logprobs if with_prompt else None)


@dataclass
class StreamState:
    """The front end's copy of one request's output, rebuilt from its deltas."""

    prompt: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    metrics: RequestMetrics | None = None
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def apply(self, delta: OutputDelta) -> RequestOutput:
        if delta.prompt_token_ids is not None:
            self.prompt, self.prompt_token_ids = delta.prompt, delta.prompt_token_ids
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.metrics is not None:
            self.metrics = delta.metrics
        assert self.metrics is not None, "a request's first delta carries its metrics"
        self.token_ids.extend(delta.new_token_ids)
        if delta.new_logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.new_logprobs)
        self.text += delta.new_text
        if delta.final_text is not None:
            self.text = delta.final_text
        completion = CompletionOutput(
            index=0, text=self.text,
            # Streaming outputs share the live list (a copy per step would be O(n^2)).
            token_ids=list(self.token_ids) if delta.finished else self.token_ids,
            finish_reason=delta.finish_reason, stop_reason=delta.stop_reason,
            logprobs=(list(self.logprobs) if delta.finished and self.logprobs is not None
                      else self.logprobs))
        return RequestOutput(
            request_id=delta.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids, outputs=[completion],
            finished=delta.finished, metrics=self.metrics, new_text=delta.new_text,
            new_token_ids=delta.new_token_ids, new_logprobs=delta.new_logprobs or [],
            prompt_logprobs=self.prompt_logprobs)
