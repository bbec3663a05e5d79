"""Engine outputs as OpenAI responses: usage, logprobs, and the SSE streams.

Streams follow OpenAI's SSE format (`data: {json}\\n\\n`, ending `data: [DONE]\\n\\n`) and send
each step's text as soon as the engine produced it. Like vLLM, the chat role chunk goes out
with the first token, so clients measure TTFT from the first chunk. A choice's chunk goes out
when its text grew, when it finished, or when its tokens carry logprobs (their text may still
be held back: a character split across tokens, a possible stop string).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pydantic_core
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kvtier.engine.async_engine import RequestAbortedError, RequestStream
from kvtier.server.errors import from_engine_error
from kvtier.server.logprobs import LogprobsFormat, TokenStrings, vllm_prompt_logprobs
from kvtier.server.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    PromptTokensDetails,
    ToolCallOut,
    Usage,
)
from kvtier.server.reasoning import ReasoningStream, split_reasoning
from kvtier.server.tool_calls import (
    JsonAnswerStream,
    ParsedToolCall,
    ToolCallStream,
    parse_tool_calls,
    tool_call_stream,
)
from kvtier.types import RequestOutput, TokenLogprobs

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class ResponseContext:
    """What every chunk of one response repeats."""

    response_id: str
    model: str
    created: int
    include_usage: bool
    logprobs: LogprobsFormat | None = None
    """Set when the request asked for logprobs."""
    echo: tuple[str, ...] | None = None
    """Completions with `echo`: per choice, its prompt's text, which leads the choice's text."""
    echo_only: bool = False
    """Completions with `echo` and max_tokens 0: the sampled token is left out."""
    prompt_logprobs: TokenStrings | None = None
    """Set when the request asked for vLLM's `prompt_logprobs` field (names its tokens)."""
    choices_per_prompt: int = 1
    """`n`: choice i answers prompt i // n (completions take a batch of prompts)."""
    continuous_usage: bool = False
    """vLLM's continuous_usage_stats: every choice chunk carries its choice's usage so far."""
    tool_parser: str | None = None
    """Chat: the format tool calls are read out of each answer in (`kvtier.server.tool_calls`);
    None: they are not."""
    reasoning: bool = False
    """Chat: each answer's thinking is split from its content (`kvtier.server.reasoning`)."""


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, which aborts the request when
    the client left mid-stream (Starlette only cancels the task that awaits the client)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def completion_choice(ctx: ResponseContext, index: int, output: RequestOutput,
                      text: str, new_logprobs: list[TokenLogprobs] | None, text_offset: int,
                      first: bool) -> tuple[CompletionChoice, int]:
    """A completions choice (a whole response's, or a stream chunk's) with `text` and the
    logprobs of `new_logprobs` from `text_offset`; the choice's `first` chunk (or the whole
    response) leads with the echoed prompt and carries the prompt logprobs. Returns it and
    the text offset after its tokens."""
    completion = output.outputs[0]
    logprobs: CompletionLogprobs | None = None
    prompt_field = None
    if ctx.echo_only:
        text, new_logprobs = "", None
    token_ids: list[int] = []
    entries: list[TokenLogprobs | None] = []
    if first and ctx.echo is not None:
        text = ctx.echo[index] + text
        if output.prompt_logprobs is not None:
            token_ids, entries = list(output.prompt_token_ids), list(output.prompt_logprobs)
    if new_logprobs is not None:
        token_ids += [entry.token_id for entry in new_logprobs]
        entries += new_logprobs
    if ctx.logprobs is not None and (entries or new_logprobs is not None):
        logprobs, text_offset = ctx.logprobs.completion(token_ids, entries, text_offset)
    if first and ctx.prompt_logprobs is not None and output.prompt_logprobs is not None:
        prompt_field = vllm_prompt_logprobs(ctx.prompt_logprobs, output.prompt_logprobs)
    choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                              finish_reason=completion.finish_reason,
                              stop_reason=completion.stop_reason, prompt_logprobs=prompt_field)
    return choice, text_offset


def chat_choice(ctx: ResponseContext, index: int, output: RequestOutput) -> ChatChoice:
    """A finished chat choice; with reasoning split off, its content is the text after the
    thinking; with tool calls read, the text before the first call, and a choice that calls
    tools finishes with "tool_calls" (as vLLM's)."""
    completion = output.outputs[0]
    content: str | None = completion.text
    reasoning = None
    if ctx.reasoning:
        split = split_reasoning(completion.text)
        reasoning, content = split.reasoning, split.content
    message = ChatResponseMessage(content=content, reasoning=reasoning,
                                  reasoning_content=reasoning)
    finish_reason = completion.finish_reason
    if ctx.tool_parser is not None and content is not None:
        answer = parse_tool_calls(content, ctx.tool_parser)
        if answer.tool_calls:
            message.content = answer.content
            message.tool_calls = [
                ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name,
                                                                 arguments=call.arguments))
                for call in answer.tool_calls]
            finish_reason = "tool_calls"
    return ChatChoice(index=index, message=message, finish_reason=finish_reason,
                      stop_reason=completion.stop_reason,
                      logprobs=chat_logprobs(ctx, completion.logprobs))


def chat_logprobs(ctx: ResponseContext, entries: list[TokenLogprobs] | None,
                  ) -> ChatChoiceLogprobs | None:
    if ctx.logprobs is None or entries is None:
        return None
    return ctx.logprobs.chat(entries)


def running_usage(output: RequestOutput, num_sent_tokens: int) -> Usage:
    """One choice's usage so far (vLLM's continuous usage stats): its prompt, and the
    tokens its chunks have carried."""
    num_prompt = len(output.prompt_token_ids)
    return Usage(prompt_tokens=num_prompt, completion_tokens=num_sent_tokens,
                 total_tokens=num_prompt + num_sent_tokens,
                 prompt_tokens_details=PromptTokensDetails(
                     cached_tokens=output.metrics.num_cached_tokens))


def usage_of(outputs: list[RequestOutput], generated: bool = True,
             choices_per_prompt: int = 1) -> Usage:
    """Every prompt once (`outputs` in choice order, `choices_per_prompt` per prompt), the
    completions of every choice (none when `generated` is false: the prompts were only
    scored)."""
    firsts = outputs[::choices_per_prompt]
    num_prompt = sum(len(output.prompt_token_ids) for output in firsts)
    num_completion = (sum(len(output.outputs[0].token_ids) for output in outputs)
                      if generated else 0)
    return Usage(prompt_tokens=num_prompt, completion_tokens=num_completion,
                 total_tokens=num_prompt + num_completion,
                 prompt_tokens_details=PromptTokensDetails(
                     cached_tokens=sum(output.metrics.num_cached_tokens for output in firsts)))


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from every choice's stream as they arrive; closing it aborts
    the unfinished ones. A failed choice raises here."""
    if len(streams) == 1:  # the common case: no task or queue hop per output
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, exc))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


def sse(chunk: CompletionChunk | ChatCompletionChunk, ctx: ResponseContext) -> str:
    exclude = None if ctx.include_usage else {"usage"}
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


_TEXT_SLOT = "\x00kvtier text\x00"
"""Stands for a chunk's text while its event is rendered once (NULs: no id or model has them)."""


class TextEvents:
    """SSE events that differ only in one text field: the event is rendered once by pydantic
    around a placeholder, and each text is spliced in with pydantic's own string encoding, so
    every event is byte-identical to rendering it whole. Plain text chunks are nearly all of a
    stream's events, and building and dumping a model per chunk cost more front-end CPU than
    sending it."""

    def __init__(self, render: Callable[[str], str]) -> None:
        slot = pydantic_core.to_json(_TEXT_SLOT).decode()
        self._head, self._tail = render(_TEXT_SLOT).split(slot)

    def __call__(self, text: str) -> str:
        return self._head + pydantic_core.to_json(text).decode() + self._tail


def error_event(exc: Exception) -> str:
    error = from_engine_error(exc)
    return f"data: {json.dumps(error.body(), ensure_ascii=True)}\n\n"


async def completion_events(streams: list[RequestStream],
                            ctx: ResponseContext) -> AsyncIterator[str]:
    last: dict[int, RequestOutput] = {}
    text_offsets: dict[int, int] = {}  # per choice: where its next token's text starts
    text_events: dict[int, TextEvents] = {}
    sent: dict[int, int] = {}  # per choice: tokens its chunks carried (continuous usage)
    # Chunks then carry only text (no logprobs, no usage of their own).
    plain = ctx.logprobs is None and not ctx.echo_only and not ctx.continuous_usage
    try:
        async with contextlib.aclosing(merged(streams)) as outputs:
            async for index, output in outputs:
                first = index not in last
                last[index] = output
                if ctx.continuous_usage and not ctx.echo_only:  # only then read: not per token
                    sent[index] = sent.get(index, 0) + len(output.new_token_ids)
                # An output carries finish and stop reasons only once finished.
                if plain and not first and not output.finished:
                    if output.new_text:
                        if index not in text_events:
                            text_events[index] = TextEvents(
                                lambda text, i=index: sse(CompletionChunk(
                                    id=ctx.response_id, created=ctx.created, model=ctx.model,
                                    choices=[CompletionChoice(index=i, text=text)]), ctx))
                        yield text_events[index](output.new_text)
                    continue
                choice, text_offsets[index] = completion_choice(
                    ctx, index, output, output.new_text, output.new_logprobs or None,
                    text_offsets.get(index, 0), first)
                leads = first and (ctx.echo is not None or choice.prompt_logprobs is not None)
                if leads or output.new_text or output.finished or choice.logprobs is not None:
                    yield sse(CompletionChunk(
                        id=ctx.response_id, created=ctx.created, model=ctx.model,
                        choices=[choice], usage=(running_usage(output, sent.get(index, 0))
                                                 if ctx.continuous_usage else None)), ctx)
    except RequestAbortedError as exc:
        yield error_event(exc)
    else:
        if ctx.include_usage and last:
            yield sse(CompletionChunk(id=ctx.response_id, created=ctx.created, model=ctx.model,
                                      choices=[], usage=usage_of(
                                          [last[i] for i in sorted(last)], not ctx.echo_only,
                                          ctx.choices_per_prompt)), ctx)
    yield DONE


async def chat_events(streams: list[RequestStream], ctx: ResponseContext) -> AsyncIterator[str]:
    last: dict[int, RequestOutput] = {}
    text_events: dict[int, TextEvents] = {}
    sent: dict[int, int] = {}  # per choice: tokens its chunks carried (continuous usage)
    readers: dict[int, ToolCallStream | JsonAnswerStream] = {}  # per choice, if calls are read
    thinkers: dict[int, ReasoningStream] = {}  # per choice, when reasoning is split off

    def chunk(index: int, delta: DeltaMessage, finish: str | None = None,
              stop_reason: str | int | None = None,
              logprobs: ChatChoiceLogprobs | None = None) -> str:
        usage = (running_usage(last[index], sent.get(index, 0)) if ctx.continuous_usage
                 else None)
        return sse(ChatCompletionChunk(
            id=ctx.response_id, created=ctx.created, model=ctx.model,
            choices=[ChatStreamChoice(index=index, delta=delta, finish_reason=finish,
                                      stop_reason=stop_reason, logprobs=logprobs)],
            usage=usage), ctx)

    def text_chunk(index: int, text: str) -> str:
        if ctx.continuous_usage:  # the usage differs per chunk: no pre-rendered event
            return chunk(index, DeltaMessage(content=text))
        if index not in text_events:
            text_events[index] = TextEvents(
                lambda content: chunk(index, DeltaMessage(content=content)))
        return text_events[index](text)

    try:
        async with contextlib.aclosing(merged(streams)) as outputs:
            async for index, output in outputs:
                first = index not in last
                last[index] = output
                if first:  # its usage, if asked: the prompt, no token counted yet
                    yield chunk(index, DeltaMessage(role="assistant", content=""))
                if ctx.continuous_usage:  # only then read: not per token
                    sent[index] = sent.get(index, 0) + len(output.new_token_ids)
                completion = output.outputs[0]
                # A step's tokens carry their logprobs even while their text is held back
                # (a character split across tokens, a possible stop string).
                logprobs = (chat_logprobs(ctx, output.new_logprobs)
                            if output.new_logprobs else None)
                text, calls, finish = output.new_text, [], completion.finish_reason
                if ctx.reasoning:  # the thinking first, then the answer's text
                    thinking = thinkers.setdefault(index, ReasoningStream())
                    thought, text = thinking.feed(text)
                    if output.finished:
                        rest_thought, rest = thinking.finish()
                        thought, text = thought + rest_thought, text + rest
                    if thought:
                        yield chunk(index, DeltaMessage(reasoning=thought,
                                                        reasoning_content=thought),
                                    logprobs=logprobs)
                        logprobs = None
                if ctx.tool_parser is not None:
                    reader = readers.setdefault(index, tool_call_stream(ctx.tool_parser))
                    text, calls = reader.feed(text)
                    if output.finished:
                        rest, more = reader.finish()
                        text, calls = text + rest, calls + more
                        finish = "tool_calls" if reader.num_calls else finish
                    if calls:
                        first_call = reader.num_calls - len(calls)
                        yield chunk(index, DeltaMessage(content=text or None,
                                                        tool_calls=_call_deltas(calls,
                                                                                first_call)),
                                    logprobs=logprobs)
                        text, logprobs = "", None
                if output.finished:
                    delta = DeltaMessage(content=text or None)
                    yield chunk(index, delta, finish, completion.stop_reason, logprobs)
                elif logprobs is not None:
                    yield chunk(index, DeltaMessage(content=text), logprobs=logprobs)
                elif text:
                    yield text_chunk(index, text)
    except RequestAbortedError as exc:
        yield error_event(exc)
    else:
        if ctx.include_usage and last:
            yield sse(ChatCompletionChunk(id=ctx.response_id, created=ctx.created,
                                          model=ctx.model, choices=[],
                                          usage=usage_of([last[i] for i in sorted(last)],
                                                         True, ctx.choices_per_prompt)), ctx)
    yield DONE


def _call_deltas(calls: list[ParsedToolCall], first_index: int) -> list[DeltaToolCall]:
    return [DeltaToolCall(index=first_index + i, id=call.id,
                          function=FunctionCallOut(name=call.name, arguments=call.arguments))
            for i, call in enumerate(calls)]
