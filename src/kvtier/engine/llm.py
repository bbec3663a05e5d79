"""The offline API, shaped like vLLM's: `LLM(model, **engine_args).generate(prompts, params)`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kvtier.config import EngineConfig
from kvtier.engine.engine import LLMEngine
from kvtier.types import InvalidRequestError, RequestOutput, SamplingParams

Prompt = str | list[int] | Mapping[str, Any]
"""Text, token ids, or vLLM's `{"prompt": text}` / `{"prompt_token_ids": ids}` dicts."""
Message = dict[str, Any]

logger = logging.getLogger(__name__)


class LLM:
    """Generate offline with continuous batching; `model=None` is the embedded default."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_args))

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling `generate` and `chat` use when given none: the model's generation
        config (`generation_config`, `override_generation_config`) over vLLM's defaults."""
        return self.engine.sampling_defaults.sampling_params()

    def reset_prefix_cache(self, *, reset_tiers: bool = False) -> bool:
        """Forget the device prefix cache (and, with `reset_tiers`, the KV tiers' entries):
        the next prompts are computed afresh. False, with a warning, if it could not (as
        vLLM's); between `generate` calls it always can. Keyword-only: vLLM's first
        positional flag (`reset_running_requests`) means something else."""
        result = self.engine.reset_prefix_cache(reset_tiers)
        if not result.reset:
            logger.warning("prefix cache not reset: %s", result.reason)
        return result.reset

    def shutdown(self) -> None:
        """Finish the tiers' work and release them: lazy candidates still only on the device
        are stored, and each tier's entries copied into the tier below (a disk or redis tier
        then serves them to the next engine). Generating after it is an error."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Outputs in prompt order. A bad prompt raises before any request runs; an error or
        interrupt (Ctrl-C) while they run aborts those not finished, so none stays in the
        engine holding KV blocks and steps of later calls."""
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params if sampling_params is not None
                                 else self.get_default_sampling_params(), len(prompt_list))
        request_ids: list[str] = []
        try:
            for (prompt, salt), p in zip(prompt_list, params, strict=True):
                request_ids.append(self.engine.add_request(prompt, p, cache_salt=salt))
            return self._run(request_ids)
        except BaseException:
            for request_id in request_ids:  # a finished one is not found: nothing to abort
                self.engine.abort_request(request_id)
            raise

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template: str | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template (or `chat_template`, a Jinja template) to one
        conversation or a list of them, with `tools` and `chat_template_kwargs` (e.g.
        `enable_thinking`) passed to it; with `continue_final_message` (and
        `add_generation_prompt` false) the model continues each conversation's final
        message, as in vLLM's `LLM.chat`."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = (self.engine.tokenizer if chat_template is None
                     else self.engine.tokenizer.with_chat_template(chat_template))
        prompts = [tokenizer.apply_chat_template(
            [_text_message(m) for m in conv],  # type: ignore[union-attr]
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools,
            template_kwargs=chat_template_kwargs) for conv in conversations]
        # The template already holds any BOS token: encode without adding special tokens.
        token_ids = [self.engine.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_ids, sampling_params)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}

        def collect(outputs: list[RequestOutput]) -> None:
            for output in outputs:
                if output.finished and output.request_id in pending:
                    finished[output.request_id] = output
                    pending.discard(output.request_id)

        engine = self.engine
        if not engine.async_scheduling:
            while pending:
                collect(engine.step())
            return [finished[r] for r in request_ids]
        # Async scheduling: launch each step before reading the tokens of the one before.
        in_flight = None
        try:
            while pending:
                launched = engine.launch_step()
                previous, in_flight = in_flight, launched
                if previous is not None:
                    collect(engine.make_outputs(engine.complete_step(previous)))
        except BaseException:  # read the step still in flight before generate aborts
            if in_flight is not None:
                with contextlib.suppress(Exception):
                    engine.complete_step(in_flight)
            raise
        if in_flight is not None:  # only tokens of finished requests, dropped
            engine.complete_step(in_flight)
        return [finished[r] for r in request_ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[tuple[Any, str | None]]:
    """(prompt, cache salt) of each prompt."""
    if isinstance(prompts, (str, Mapping)):  # one prompt (a dict is not a list of its keys)
        return [_prompt_of(prompts)]
    if isinstance(prompts, (list, tuple)) and prompts and all(
            isinstance(t, int) for t in prompts):
        return [(list(prompts), None)]  # type: ignore[arg-type]
    return [_prompt_of(p) for p in prompts]  # type: ignore[union-attr]


def _prompt_of(prompt: Prompt) -> tuple[Any, str | None]:
    """vLLM's TextPrompt and TokensPrompt dicts as the text or ids they hold, with their
    `cache_salt`; anything else as given (the engine checks it)."""
    if not isinstance(prompt, Mapping):
        return prompt, None
    keys = set(prompt) - {"cache_salt"}
    if keys == {"prompt"}:
        return prompt["prompt"], prompt.get("cache_salt")
    if keys == {"prompt_token_ids"}:
        return prompt["prompt_token_ids"], prompt.get("cache_salt")
    raise InvalidRequestError(f"a prompt dict must hold only 'prompt' (text) or only "
                              f"'prompt_token_ids' (and optionally 'cache_salt'), got the "
                              f"keys {sorted(map(str, prompt))}")


def _text_message(message: Message) -> Message:
    """An OpenAI message whose content is a list of text parts with that content as one
    string, the parts joined by newlines (as vLLM's `LLM.chat` renders them for a template
    that reads a string)."""
    content = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text" \
                or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"message content parts must be text parts "
                                      f"({{'type': 'text', 'text': ...}}), got {part!r}")
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


def _as_params_list(params: SamplingParams | Sequence[SamplingParams],
                    n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts")
    return list(params)
