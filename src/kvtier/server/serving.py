"""The OpenAI completion routes: request -> token ids and SamplingParams -> engine -> response.

Everything that can be wrong with a request is found before the engine sees it or, at the
latest, when the engine thread accepts it; only then does a response start. Tokenisation and
chat templating run on one worker thread, so a long prompt never blocks the event loop nor
the engine thread. The response bodies and SSE streams are built in `responses`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kvtier.engine.async_engine import AsyncEngine, RequestStream
from kvtier.server.errors import OpenAIError, from_engine_error
from kvtier.server.logprobs import (
    LogprobsFormat,
    TokenStrings,
    requested_prompt_top,
    requested_top,
)
from kvtier.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    unsupported_fields,
)
from kvtier.server.reasoning import thinks
from kvtier.server.responses import (
    ResponseContext,
    SSEResponse,
    chat_choice,
    chat_events,
    completion_choice,
    completion_events,
    usage_of,
)
from kvtier.types import InvalidRequestError, RequestOutput, SamplingParams

TOKENIZER_WORKERS = max(1, min(4, (os.cpu_count() or 1) - 1))


class OpenAIServing:
    """Turns validated request bodies into engine requests and engine outputs into responses."""

    def __init__(self, engine: AsyncEngine, served_model_names: tuple[str, ...],
                 on_tokenized: Callable[[float], None] | None = None,
                 chat_template: str | None = None, tool_parser: str | None = None,
                 reasoning_parser: str | None = None) -> None:
        """`on_tokenized` gets each generation request's seconds from arrival at the handler
        to its prompt's token ids, once the request is in the engine: as vLLM's per-request
        histograms, it leaves out requests refused (a prompt too long, a bad parameter, the
        engine's refusal) after their tokenisation. `chat_template` replaces the model's;
        `tool_parser` (`--tool-call-parser`) reads tool calls out of answers to requests with
        tools; `reasoning_parser` (`--reasoning-parser`) splits thinking from answers."""
        self._tool_parser = tool_parser
        self._reasoning_parser = reasoning_parser
        self.engine = engine
        self._on_tokenized = on_tokenized
        self.model_names = served_model_names
        assert engine.tokenizer is not None, "start() the engine first"
        self.max_model_len = engine.max_model_len
        self._tokenizer = (engine.tokenizer if chat_template is None
                           else engine.tokenizer.with_chat_template(chat_template))
        self._token_strings = TokenStrings(engine.tokenizer)
        self.max_logprobs = (engine.max_logprobs if engine.max_logprobs != -1
                             else engine.tokenizer.vocab_size)
        # Tokenisation releases the GIL (Tokenizer.encode), so a few workers tokenise prompts
        # in parallel while the event loop streams; the tokeniser is only read, never
        # reconfigured, so sharing it across threads is safe.
        self._executor = ThreadPoolExecutor(max_workers=TOKENIZER_WORKERS,
                                            thread_name_prefix="kvtier-tokenize")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- routes -------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        model = self._check(body)
        num_top = requested_top(body, self.max_logprobs)
        num_prompt_top = requested_prompt_top(body, self.max_logprobs)
        prompts = _prompts(body.prompt)
        # echo with max_tokens 0 scores the prompt only (vLLM's "echo without generation"):
        # the engine still samples one token, which the response leaves out.
        echo_only = body.max_tokens == 0
        if echo_only and not body.echo:
            raise OpenAIError(400, "max_tokens must be at least 1 (0 only with echo)",
                              param="max_tokens")
        max_tokens = 1 if echo_only else 16 if body.max_tokens is None else body.max_tokens
        token_ids = [self._truncated(ids, body.truncate_prompt_tokens) for ids in
                     await asyncio.gather(*(self._prompt_ids(prompt) for prompt in prompts))]
        tokenized = time.monotonic()
        # Every prompt is checked before any is added: a batch runs whole or not at all.
        params = [self._params(body, max_tokens, len(ids), "prompt",
                               explicit=body.max_tokens is not None, logprobs=num_top,
                               prompt_logprobs=num_prompt_top) for ids in token_ids]
        echo = None
        if body.echo:
            texts = [prompt if isinstance(prompt, str) and body.truncate_prompt_tokens is None
                     else await self._off_loop(self._tokenizer.decode, ids, False,
                                               param="prompt")  # specials kept
                     for prompt, ids in zip(prompts, token_ids, strict=True)]
            echo = tuple(text for text in texts for _ in range(body.n))
        ctx, headers = _context(request, "cmpl", model, body.include_usage, body.n,
                                self._logprobs_format(body, num_top), body.continuous_usage)
        ctx = dataclasses.replace(ctx, echo=echo, echo_only=echo_only, prompt_logprobs=(
            self._token_strings if body.prompt_logprobs is not None else None))
        streams = await self._add_choices(list(zip(token_ids, params, strict=True)), arrival,
                                          ctx, body.n, body.cache_salt)
        self._tokenized(tokenized - arrival)
        if body.stream:
            return SSEResponse(completion_events(streams, ctx), media_type="text/event-stream",
                               headers=headers)
        outputs = await _collect(streams, request)
        response = CompletionResponse(
            id=ctx.response_id, model=model,
            usage=usage_of(outputs, not echo_only, body.n),
            choices=[completion_choice(ctx, index, output, output.outputs[0].text,
                                       output.outputs[0].logprobs, 0, first=True)[0]
                     for index, output in enumerate(outputs)])
        return Response(response.model_dump_json(), media_type="application/json",
                        headers=headers)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        model = self._check(body)
        num_top = requested_top(body, self.max_logprobs)
        messages = [m.for_template() for m in body.messages]
        _check_template_flags(body.add_generation_prompt, body.continue_final_message)
        token_ids = await self._run(
            lambda: self._render_chat(messages, body.add_generation_prompt,
                                      tools=body.tools,  # tool_choice "none": read only
                                      continue_final_message=body.continue_final_message,
                                      template_kwargs=body.chat_template_kwargs),
            param="messages")
        token_ids = self._truncated(token_ids, body.truncate_prompt_tokens)
        tokenized = time.monotonic()
        requested = body.max_completion_tokens or body.max_tokens
        params = self._params(body, requested or self.max_model_len, len(token_ids), "messages",
                              explicit=requested is not None, logprobs=num_top)
        ctx, headers = _context(request, "chatcmpl", model, body.include_usage, body.n,
                                self._logprobs_format(body, num_top), body.continuous_usage)
        # Tool calls are read out of the answer when the model may make them (vLLM's "auto").
        calls_tools = bool(body.tools) and body.tool_choice != "none" \
            and self._tool_parser is not None
        ctx = dataclasses.replace(
            ctx, tool_parser=self._tool_parser if calls_tools else None,
            reasoning=thinks(self._reasoning_parser, body.chat_template_kwargs))
        streams = await self._add_choices([(token_ids, params)], arrival, ctx, body.n,
                                          body.cache_salt)
        self._tokenized(tokenized - arrival)
        if body.stream:
            return SSEResponse(chat_events(streams, ctx), media_type="text/event-stream",
                               headers=headers)
        outputs = await _collect(streams, request)
        response = ChatCompletionResponse(
            id=ctx.response_id, model=model, usage=usage_of(outputs, True, body.n),
            choices=[chat_choice(ctx, index, output) for index, output in enumerate(outputs)])
        return Response(response.model_dump_json(), media_type="application/json",
                        headers=headers)

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """The ids a completion (`prompt`) or chat (`messages`) request would run."""
        self._served_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "give either prompt or messages, not "
                              + ("both" if body.prompt is not None else "neither"),
                              param="prompt" if body.prompt is None else "messages")
        if body.chat_template is not None:
            raise OpenAIError(400, "chat_template is not supported: the server's template "
                              "(the model's, or --chat-template) renders the messages",
                              param="chat_template", code="unsupported_parameter")
        if body.prompt is not None:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            token_ids = await self._off_loop(self._tokenizer.encode, body.prompt, special,
                                             param="prompt")
        else:
            assert body.messages is not None
            messages = [m.for_template() for m in body.messages]
            _check_template_flags(body.add_generation_prompt, body.continue_final_message)
            token_ids = await self._off_loop(
                lambda: self._render_chat(messages, body.add_generation_prompt,
                                          bool(body.add_special_tokens), body.tools,
                                          body.chat_template_kwargs,
                                          body.continue_final_message), param="messages")
        strings = (await self._off_loop(self._tokenizer.convert_ids_to_tokens, token_ids,
                                        param="tokens")
                   if body.return_token_strs else None)
        return TokenizeResponse(count=len(token_ids), max_model_len=self.max_model_len,
                                tokens=token_ids, token_strs=strings)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids, special tokens kept (as vLLM's /detokenize)."""
        self._served_model(body.model)
        vocab = self._tokenizer.vocab_size
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise OpenAIError(400, f"token id {bad} is outside the tokenizer's vocabulary "
                              f"(0..{vocab - 1})", param="tokens")
        text = await self._off_loop(self._tokenizer.decode, body.tokens, False, param="tokens")
        return DetokenizeResponse(prompt=text)

    # -- request preparation ------------------------------------------------------------------

    def _served_model(self, model: str | None) -> str:
        """The served model name to answer with; refuses unknown models (404). No name or an
        empty one means the first, as in vLLM."""
        if model and model not in self.model_names:
            raise OpenAIError(404, f"the model {model!r} does not exist; see /v1/models",
                              param="model", code="model_not_found")
        return model or self.model_names[0]

    def _check(self, body: CompletionRequest | ChatCompletionRequest) -> str:
        """The served model name to answer with; refuses unknown models and features."""
        model = self._served_model(body.model)
        unsupported = unsupported_fields(body, self._tool_parser)
        if unsupported is not None:
            param, message = unsupported
            raise OpenAIError(400, message, param=param, code="unsupported_parameter")
        return model

    def _logprobs_format(self, body: CompletionRequest | ChatCompletionRequest,
                         num_top: int | None) -> LogprobsFormat | None:
        if num_top is None:
            return None
        return LogprobsFormat(self._token_strings, num_top, body.return_tokens_as_token_ids)

    def _render_chat(self, messages: list[dict[str, Any]],
                     add_generation_prompt: bool = True, add_special_tokens: bool = False,
                     tools: list[dict[str, Any]] | None = None,
                     template_kwargs: dict[str, Any] | None = None,
                     continue_final_message: bool = False) -> list[int]:
        text = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools,
            template_kwargs=template_kwargs)
        # The template already holds any BOS token: encode without adding special tokens.
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _tokenized(self, seconds: float) -> None:
        """A request whose choices the engine took had tokenised in `seconds`."""
        if self._on_tokenized is not None:
            self._on_tokenized(seconds)

    def _truncated(self, token_ids: list[int], keep: int | None) -> list[int]:
        """vLLM's truncate_prompt_tokens: the last `keep` ids (-1: the context length)."""
        if keep is None:
            return token_ids
        if keep == -1:
            keep = self.max_model_len
        if not 1 <= keep <= self.max_model_len:
            raise OpenAIError(400, f"truncate_prompt_tokens must be -1 or in [1, "
                              f"max_model_len={self.max_model_len}], got {keep}",
                              param="truncate_prompt_tokens")
        return token_ids[-keep:]

    async def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A completions prompt's token ids: text tokenised, ids as given (the engine checks
        them against the vocabulary); an empty prompt is refused (400)."""
        if isinstance(prompt, str):
            return await self._run(self._tokenizer.encode, prompt, param="prompt")
        if not prompt:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        return prompt

    async def _run(self, fn: Callable[..., list[int]], *args: object,
                   param: str) -> list[int]:
        """Tokenise for a generation request: an empty result is refused (400)."""
        token_ids = await self._off_loop(fn, *args, param=param)
        if not token_ids:
            raise OpenAIError(400, f"the {param} is empty", param=param)
        return token_ids

    async def _off_loop(self, fn: Callable[..., Any], *args: object, param: str = "") -> Any:
        """fn(*args) on the tokenizer's worker thread; a failure there is the input's fault
        (400 naming `param`)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except Exception as exc:
            raise OpenAIError(400, f"cannot tokenize the {param}: {type(exc).__name__}: {exc}",
                              param=param or None) from exc

    def _params(self, body: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                num_prompt_tokens: int, param: str, explicit: bool,
                logprobs: int | None = None,
                prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams with max_tokens fitted to the context (refused if asked for)."""
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise OpenAIError(400, f"this model's maximum context length is "
                              f"{self.max_model_len} tokens, but the {param} has "
                              f"{num_prompt_tokens} tokens (prompt + at least one output token "
                              "must fit)", param=param, code="context_length_exceeded")
        if explicit and max_tokens > room:
            raise OpenAIError(400, f"this model's maximum context length is "
                              f"{self.max_model_len} tokens, but {num_prompt_tokens + max_tokens}"
                              f" were requested ({num_prompt_tokens} in the {param}, "
                              f"{max_tokens} to generate)", param="max_tokens",
                              code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        # Fields the request leaves unset take the model's generation config, then the API's
        # defaults; its max_new_tokens also caps max_tokens (vLLM's get_max_tokens).
        default = self.engine.sampling_defaults
        try:
            return SamplingParams(
                max_tokens=default.cap_max_tokens(min(max_tokens, room)),
                temperature=default.pick("temperature", body.temperature, 1.0),
                top_p=default.pick("top_p", body.top_p, 1.0),
                top_k=default.pick("top_k", body.top_k, -1), seed=body.seed, stop=stop,
                stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                include_stop_str_in_output=body.include_stop_str_in_output,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=default.pick("repetition_penalty", body.repetition_penalty,
                                                1.0),
                min_p=default.pick("min_p", body.min_p, 0.0), min_tokens=body.min_tokens or 0,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, logit_bias=_logit_bias(body.logit_bias),
                allowed_token_ids=body.allowed_token_ids, bad_words=tuple(body.bad_words or ()),
                skip_special_tokens=body.skip_special_tokens is not False)
        except InvalidRequestError as exc:
            # SamplingParams' messages start with the field at fault ("min_tokens must ...").
            field = str(exc).split(" ", 1)[0]
            raise OpenAIError(400, str(exc), param=field if field in type(body).model_fields
                              else None) from exc

    async def _add_choices(self, prompts: list[tuple[list[int], SamplingParams]],
                           arrival: float, ctx: ResponseContext, n: int,
                           cache_salt: str | None = None) -> list[RequestStream]:
        """One engine request per choice, `n` per prompt (as vLLM's parallel sampling), in
        choice order (prompt-major). A prompt's choices share it, so the prefix cache
        computes it once; choice i of a prompt samples with seed + i, if a seed is given, so
        the choices differ. If one cannot be added, none stays."""
        choices = [(token_ids, params if index == 0 or params.seed is None
                    else dataclasses.replace(params, seed=(params.seed + index) % 2**64))
                   for token_ids, params in prompts for index in range(n)]
        limit = self.engine.max_waiting_requests
        if limit is not None and len(choices) > limit:
            # Never accepted, however idle the server: a 503 "retry later" would be a lie.
            raise OpenAIError(400, f"this request has {len(choices)} choices ({len(prompts)} "
                              f"prompt(s), n={n}), more than this server accepts at once "
                              f"({limit}, --max-waiting-requests)",
                              param="n" if len(prompts) == 1 else "prompt")
        # Added together: the engine core takes them in one turn (one at a time, each
        # would wait for a step, n=128 for seconds).
        added = await asyncio.gather(*(self._add(token_ids, choice, arrival, ctx, cache_salt)
                                       for token_ids, choice in choices),
                                     return_exceptions=True)
        streams = [a for a in added if isinstance(a, RequestStream)]
        failure = next((a for a in added if not isinstance(a, RequestStream)), None)
        if failure is not None:
            for stream in streams:
                stream.close()
            raise failure
        return streams

    async def _add(self, token_ids: list[int], params: SamplingParams, arrival: float,
                   ctx: ResponseContext, cache_salt: str | None) -> RequestStream:
        engine_id = f"{ctx.response_id}-{uuid.uuid4().hex[:8]}"
        try:
            return await self.engine.add_request(token_ids, params, engine_id, arrival,
                                                 cache_salt=cache_salt)
        except Exception as exc:
            raise from_engine_error(exc) from exc


def _prompts(prompt: str | list[int] | list[str] | list[list[int]],
             ) -> list[str] | list[list[int]]:
    """The prompts of a completions request: one (text or token ids), or OpenAI's batch (a
    list of texts or of token-id lists)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt or isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as strings."""
    parsed: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise OpenAIError(400, f"logit_bias keys must be token ids, got {key!r}",
                              param="logit_bias") from None
        if token_id in parsed:  # "7" and "07"
            raise OpenAIError(400, f"logit_bias names token {token_id} twice",
                              param="logit_bias")
        parsed[token_id] = value
    return parsed


def _check_template_flags(add_generation_prompt: bool, continue_final_message: bool) -> None:
    if add_generation_prompt and continue_final_message:
        raise OpenAIError(400, "continue_final_message continues the final message, so it "
                          "needs add_generation_prompt set to false",
                          param="continue_final_message")


def _context(request: Request, kind: str, model: str, include_usage: bool,
             choices_per_prompt: int, logprobs: LogprobsFormat | None = None,
             continuous_usage: bool = False) -> tuple[ResponseContext, dict[str, str]]:
    """Response id from the `x-request-id` header (as vLLM does), echoed back as a header."""
    given = request.headers.get("x-request-id", "")[:128]
    request_id = given or uuid.uuid4().hex
    ctx = ResponseContext(f"{kind}-{request_id}", model, int(time.time()), include_usage,
                          logprobs, choices_per_prompt=choices_per_prompt,
                          continuous_usage=continuous_usage)
    return ctx, {"X-Request-Id": request_id}


async def _collect(streams: list[RequestStream], request: Request) -> list[RequestOutput]:
    """The final outputs of a non-streaming request's choices; aborts them all if the client
    goes away or one fails."""

    async def last_output(stream: RequestStream) -> RequestOutput:
        final: RequestOutput | None = None
        async for output in stream:
            final = output
        assert final is not None and final.finished
        return final

    results = [asyncio.ensure_future(last_output(stream)) for stream in streams]
    gone = asyncio.ensure_future(_client_gone(request))
    pending = set(results)
    failed: asyncio.Future[RequestOutput] | None = None
    try:
        while pending and failed is None and not gone.done():
            done, pending = await asyncio.wait(pending | {gone},
                                               return_when=asyncio.FIRST_COMPLETED)
            pending.discard(gone)
            failed = next((t for t in done if t is not gone
                           and (t.cancelled() or t.exception() is not None)), None)
    finally:
        gone.cancel()
        for task in results:  # a choice's failure ends the others (and their tasks)
            task.cancel()
        for stream in streams:
            stream.close()
    if failed is not None and not failed.cancelled():
        exc = failed.exception()
        assert exc is not None
        raise from_engine_error(exc) if isinstance(exc, Exception) else exc
    if pending or not all(task.done() and not task.cancelled() for task in results):
        raise OpenAIError(499, "the client closed the connection", code="client_closed")
    return [task.result() for task in results]


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


