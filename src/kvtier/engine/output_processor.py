"""Turns sampled tokens into text: incremental detokenisation, stop strings, and outputs
(RequestOutputs offline, OutputDeltas for the engine core's updates).

While a request streams, text that could still turn out to be the start of a stop string is
held back (at most the longest stop string minus one character), so a client never receives
text that is later cut off; with include_stop_str_in_output nothing is (the text is cut after a
stop string, which ends in the newest text: never before text already sent), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.model.tokenizer import IncrementalDetokenizer, Tokenizer
from kvtier.request import Request
from kvtier.types import CompletionOutput, FinishReason, OutputDelta, RequestOutput, TokenLogprobs


@dataclass
class _TextState:
    detokenizer: IncrementalDetokenizer
    text: str = ""
    """Output text so far, after any stop-string truncation."""
    num_detokenized_tokens: int = 0
    num_sent_chars: int = 0
    num_sent_tokens: int = 0
    stop_floor: int = 0
    """Text before this offset is min_tokens' output: no stop string may end in it."""


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _TextState] = {}

    def add_request(self, request: Request) -> None:
        self._states[request.request_id] = _TextState(IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids,
            skip_special_tokens=request.sampling_params.skip_special_tokens))

    def is_tracking(self, request_id: str) -> bool:
        """Whether the request's final output is still to be made."""
        return request_id in self._states

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def detokenize(self, request: Request) -> str | None:
        """Detokenise the request's new tokens; returns the stop string found in the new text,
        if any (the text is cut there, and the caller finishes the request)."""
        state = self._states[request.request_id]
        old_len = len(state.text)
        new_ids = request.output_token_ids[state.num_detokenized_tokens:]
        if (new_ids and request.finish_reason is FinishReason.STOP
                and not request.sampling_params.include_stop_str_in_output):
            # EOS or a stop token id ended it (a stop string is found below, after this):
            # as in vLLM, the token stays in the ids but its text is not output.
            new_ids = new_ids[:-1]
        state.text += state.detokenizer.add(new_ids)
        state.num_detokenized_tokens = request.num_output_tokens
        if request.is_finished:  # flush text held back for an incomplete character
            state.text += state.detokenizer.finish()
        stops = request.sampling_params.stop
        if not stops:
            return None
        if request.num_output_tokens <= request.sampling_params.min_tokens:
            state.stop_floor = len(state.text)  # as vLLM: no stop within min_tokens' text
            return None
        # A new match must end inside the new text (and past min_tokens' text).
        search_from = max(0, old_len - max(len(s) for s in stops) + 1)
        best: tuple[int, str] | None = None
        for stop in stops:
            index = state.text.find(stop, max(search_from, state.stop_floor - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        if request.sampling_params.include_stop_str_in_output:
            index += len(stop)
        state.text = state.text[:index]
        return stop

    def _take_new(self, state: _TextState, request: Request, finished: bool,
                  ) -> tuple[str, int, list[int], list[TokenLogprobs], bool]:
        """What the request's output gained since its last output, now marked sent: (new
        text, visible length of the text, new token ids, their logprobs, whether this is
        its first output)."""
        visible = len(state.text)
        params = request.sampling_params
        stops = params.stop
        # A stop string kept in the output never takes text back, so (as vLLM) only an
        # excluded one holds back the text that may be its start.
        if not finished and stops and not params.include_stop_str_in_output:
            visible = max(state.num_sent_chars, visible - (max(len(s) for s in stops) - 1))
        new_text = state.text[state.num_sent_chars:visible]
        first = state.num_sent_tokens == 0
        new_token_ids = request.output_token_ids[state.num_sent_tokens:]
        new_logprobs = (request.output_logprobs[state.num_sent_tokens:]
                        if request.sampling_params.logprobs is not None else [])
        state.num_sent_chars = visible
        state.num_sent_tokens = request.num_output_tokens
        return new_text, visible, new_token_ids, new_logprobs, first

    @staticmethod
    def _prompt_logprobs(request: Request, first: bool,
                         finished: bool) -> list[TokenLogprobs | None] | None:
        if (first or finished) and request.sampling_params.prompt_logprobs is not None:
            return [None, *request.prompt_logprobs]
        return None

    def make_delta(self, request: Request, with_prompt: bool) -> OutputDelta:
        """The engine core's delta for the request's new output, the same as
        `output_delta(make_output(...))` without building the RequestOutput in between (a
        step's host work scales with its requests)."""
        state = self._states[request.request_id]
        finished = request.is_finished
        new_text, _, new_token_ids, new_logprobs, first = self._take_new(state, request,
                                                                         finished)
        if finished:
            self.drop(request.request_id)
        return OutputDelta(
            request_id=request.request_id, new_token_ids=new_token_ids, new_text=new_text,
            finished=finished,
            finish_reason=(request.finish_reason.value if finished and request.finish_reason
                           else None),
            stop_reason=request.stop_reason if finished else None,
            metrics=request.metrics if with_prompt or finished else None,
            final_text=state.text if finished else None,
            prompt=request.prompt if with_prompt else None,
            prompt_token_ids=request.prompt_token_ids if with_prompt else None,
            new_logprobs=(new_logprobs if request.sampling_params.logprobs is not None
                          else None),
            prompt_logprobs=(self._prompt_logprobs(request, first, finished) if with_prompt
                             else None))

    def make_output(self, request: Request, finished: bool) -> RequestOutput:
        state = self._states[request.request_id]
        new_text, visible, new_token_ids, new_logprobs, first = self._take_new(state, request,
                                                                               finished)
        wants_logprobs = request.sampling_params.logprobs is not None
        reason = request.finish_reason.value if finished and request.finish_reason else None
        completion = CompletionOutput(
            index=0,
            text=state.text if finished else state.text[:visible],
            # Streaming outputs share the live list (a copy per step would be O(n^2)).
            token_ids=list(request.output_token_ids) if finished else request.output_token_ids,
            finish_reason=reason,
            stop_reason=request.stop_reason if finished else None,
            logprobs=((list(request.output_logprobs) if finished else request.output_logprobs)
                      if wants_logprobs else None),
        )
        if finished:
            self.drop(request.request_id)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            metrics=request.metrics,
            new_text=new_text,
            new_token_ids=new_token_ids,
            new_logprobs=new_logprobs,
            prompt_logprobs=self._prompt_logprobs(request, first, finished),
        )
