"""OpenAI wire format: pydantic models of the requests we accept and the responses we send.

Field names, defaults and shapes follow OpenAI's API (and vLLM's extras: `top_k`,
`stop_token_ids`, `ignore_eos`, `include_stop_str_in_output`, `return_tokens_as_token_ids`,
`allowed_token_ids`, `truncate_prompt_tokens`, `continuous_usage_stats`,
`continue_final_message`, among others).
Unknown fields are ignored, as OpenAI does. Range checks that pydantic can express live on
the fields (and so in `/openapi.json`); features we do not implement are refused with a
clear 400 by `unsupported_fields`, never silently ignored when they would change the output.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_serializer,
)

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
MAX_STOP_SEQUENCES = 16

TokenId = Annotated[StrictInt, Field(ge=0)]
StopList = Annotated[list[StrictStr], Field(max_length=MAX_STOP_SEQUENCES)]


class _Request(BaseModel):
    # strict: JSON's own types only, as OpenAI checks them. pydantic's lax mode took `true`
    # as the count 1 (`"top_k": true` sampled greedily), "3" as 3 and "yes" as true.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM's: with include_usage, "
                                                            "every chunk carries the usage so "
                                                            "far of its choice.")


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, description="A name from /v1/models; omitted or empty: "
                                                "the first.")
    cache_salt: StrictStr | None = Field(None, min_length=1, description=(
        "vLLM's: only requests with the same salt share this one's cached KV (on the device "
        "and in the tiers); for tenants who must not learn, by timing, what others sent. "
        "Long and random (e.g. 256 bits in base64)."))
    temperature: float | None = Field(None, ge=0, description="0 = greedy; default 1.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 = all tokens.")
    seed: int | None = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    stop: StrictStr | StopList | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=256)] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128, description="Choices: one engine request each, sharing "
                                                  "the prompt's KV through the prefix cache.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, description="vLLM's; 1 = off.")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM's; 0 = off.")
    min_tokens: int | None = Field(None, ge=0, description="vLLM's: outputs before EOS or a "
                                                          "stop can end the request.")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}.")
    guided_json: Any = Field(None, description="Not supported.")
    guided_regex: Any = Field(None, description="Not supported.")
    guided_choice: Any = Field(None, description="Not supported.")
    guided_grammar: Any = Field(None, description="Not supported.")
    structured_outputs: Any = Field(None, description="Not supported.")
    use_beam_search: bool | None = Field(None, description="Not supported.")
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="vLLM's: keep only the prompt's last this many tokens (-1: "
                                 "the model's context length).")
    skip_special_tokens: bool | None = Field(None, description="vLLM's: leave special tokens "
                                                               "out of the text (default "
                                                               "true).")
    logits_processors: list[Any] | None = Field(None, description="Not supported.")
    bad_words: list[str] | None = Field(None, description="vLLM's: words the output may not "
                                                          "hold (the last token of each is "
                                                          "not sampled where it would "
                                                          "complete the word).")
    allowed_token_ids: list[int] | None = Field(None, description="vLLM's: the only token "
                                                                 "ids the output may hold.")
    logit_bias: dict[str, float] | None = Field(
        None, description="OpenAI's: token id (as a string) -> bias in [-100, 100] added to "
                          "its logit before sampling.")
    return_tokens_as_token_ids: bool = Field(False, description="vLLM's: logprobs name "
                                                                 "tokens 'token_id:<id>'.")
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options
                                           and self.stream_options.continuous_usage_stats)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. `prompt` is text or token ids, or OpenAI's batch: a list of
    texts or of token-id lists, whose choices come prompt-major (prompt i's choice j is choice
    i * n + j, as in vLLM)."""

    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt, "
                                                        "generate nothing.")
    echo: StrictBool | None = Field(False, description="Prepend the prompt to the text (and "
                                                       "its tokens to the logprobs).")
    prompt_logprobs: StrictInt | None = Field(
        None, ge=0, description="vLLM's: each prompt token's logprob given the tokens before "
                                "it, and this many most likely tokens'.")
    logprobs: StrictInt | None = Field(None, ge=0, description="Log-probabilities of each "
                                       "output token and of this many most likely tokens at "
                                       "its position.")
    best_of: int | None = Field(None, description="Must equal n if given (no ranking).")
    suffix: str | None = Field(None, description="Not supported.")


class TextContentPart(_Request):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Request):
    name: StrictStr
    arguments: Any = Field(description="OpenAI's JSON string (or the object it holds).")

    @field_validator("arguments")
    @classmethod
    def _parsed(cls, value: Any) -> Any:
        # Templates (transformers' convention) read the arguments as an object, so the JSON
        # string OpenAI sends is parsed, as vLLM does.
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError("tool call arguments must be a JSON string") from None


class ToolCall(_Request):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict[str, Any]:
        call: dict[str, Any] = {"type": self.type, "function": {
            "name": self.function.name, "arguments": self.function.arguments}}
        return call if self.id is None else {"id": self.id, **call}


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: the tool calls "
                                                                "it made (history only).")
    tool_call_id: StrictStr | None = Field(None, description="tool: the call it answers.")
    reasoning: StrictStr | None = Field(None, description="assistant: its thinking (history; "
                                                          "templates read it as "
                                                          "reasoning_content).")
    reasoning_content: StrictStr | None = Field(None, description="The same, under its "
                                                                  "former name.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # as vLLM joins text parts

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it; unset keys are None (the tokenizer drops
        them). Tool calls and the id a tool answers are kept: tool-aware templates render
        them, and without them a tool's answer follows a call the prompt never shows."""
        return {"role": self.role, "content": self.text(), "name": self.name,
                "tool_call_id": self.tool_call_id,
                "reasoning_content": self.reasoning_content or self.reasoning,
                "tool_calls": None if self.tool_calls is None
                else [call.for_template() for call in self.tool_calls]}


class _ChatTemplateFields(_Request):
    """How chat messages are rendered (vLLM's extras)."""

    chat_template: str | None = Field(None, description="Not supported: the model's own "
                                                        "template renders the messages.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra variables for the template (e.g. enable_thinking).")


class ChatCompletionRequest(_SamplingFields, _ChatTemplateFields):
    """POST /v1/chat/completions, rendered with the model's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[dict[str, Any]] | None = Field(None, description="Rendered into the prompt; "
                                                                 "called only with a tool-call "
                                                                 "parser (--tool-call-parser).")
    tool_choice: Any = Field(None, description="'none' (the tools are only read) or 'auto' "
                                               "(the default with tools; needs "
                                               "--enable-auto-tool-choice).")
    add_generation_prompt: bool = Field(True, description="End with the assistant's turn "
                                                          "opened.")
    continue_final_message: bool = Field(False, description="End inside the final message "
                                                            "(no end of turn), which the model "
                                                            "continues; needs "
                                                            "add_generation_prompt false.")
    echo: bool = Field(False, description="Not supported.")
    prompt_logprobs: int | None = Field(None, description="Not supported.")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI; still read.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Wins over max_tokens.")
    logprobs: StrictBool | None = Field(False, description="Log-probabilities of each output "
                                                          "token.")
    top_logprobs: StrictInt | None = Field(None, ge=0, description="And of this many most "
                                                                   "likely tokens at each "
                                                                   "position.")


class TokenizeRequest(_ChatTemplateFields):
    """POST /tokenize, vLLM's: `prompt` text, or chat `messages` rendered with the model's
    template (exactly one of them). The ids are those a completion or chat request would
    run, so a client can count or align its prompts with the server's tokenizer."""

    model: str | None = Field(None, description="A name from /v1/models; omitted or empty: "
                                                "the first.")
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = Field(
        None, description="Add the tokenizer's special tokens (e.g. BOS); default true for a "
                          "prompt, false for messages (the template holds them).")
    add_generation_prompt: bool = Field(True, description="messages: end with the assistant's "
                                                          "turn opened.")
    continue_final_message: bool = Field(False, description="messages: end inside the final "
                                                            "message; needs "
                                                            "add_generation_prompt false.")
    tools: list[dict[str, Any]] | None = Field(None, description="messages: rendered into the "
                                                                 "template.")
    return_token_strs: bool = Field(False, description="Also return each id's token string.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeRequest(_Request):
    """POST /detokenize, vLLM's: the text of token ids (special tokens included)."""

    model: str | None = Field(None, description="A name from /v1/models; omitted or empty: "
                                                "the first.")
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class PrefixCacheResetResponse(BaseModel):
    """POST /reset_prefix_cache: what was forgotten."""

    device_blocks: int
    tier_entries: int


def unsupported_fields(body: CompletionRequest | ChatCompletionRequest,
                       tool_parser: str | None = None) -> tuple[str, str] | None:
    """(param, message) for the first field set to something we cannot honour, else None.
    `tool_parser`: the server's (`--tool-call-parser`), if it reads tool calls."""
    checks: list[tuple[str, bool, str]] = [
        ("response_format", body.response_format is not None
         and body.response_format.get("type", "text") != "text",
         "response_format is not supported: only plain text ({'type': 'text'})"),
        *((name, getattr(body, name) is not None, f"{name} is not supported (no guided "
                                                   "decoding)")
          for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                       "structured_outputs")),
        ("use_beam_search", bool(body.use_beam_search), "beam search is not supported"),
        ("logits_processors", bool(body.logits_processors),
         "logits_processors are not supported"),
        ("stream_options", body.stream_options is not None and not body.stream,
         "stream_options can only be set when stream is true"),
    ]
    if isinstance(body, CompletionRequest):
        checks += [
            ("best_of", body.best_of not in (None, body.n),
             "best_of must equal n: kvtier does not rank extra samples"),
            ("suffix", body.suffix is not None, "suffix is not supported"),
        ]
    else:
        checks += [
            # With tool_choice "none" the model only reads the tools (vLLM renders them into
            # the prompt); "auto" (the default with tools) needs a tool-call parser, and
            # "required" or a named function guided decoding, which kvtier does not have.
            ("tool_choice", body.tool_choice not in (None, "none", "auto"),
             "tool_choice must be 'none' or 'auto': 'required' and named functions need "
             "guided decoding, which kvtier does not have"),
            ("tools", bool(body.tools) and body.tool_choice != "none" and tool_parser is None,
             "tools need tool_choice 'none', or a server started with "
             "--enable-auto-tool-choice --tool-call-parser hermes"),
            ("tool_choice", body.tool_choice == "auto" and tool_parser is None,
             "tool_choice 'auto' needs a server started with --enable-auto-tool-choice "
             "--tool-call-parser hermes"),
            ("chat_template", body.chat_template is not None,
             "chat_template is not supported: the server's template (the model's, or "
             "--chat-template) renders the messages"),
            ("echo", body.echo, "echo is not supported"),
            ("prompt_logprobs", body.prompt_logprobs is not None,
             "prompt_logprobs is not supported in chat completions"),
        ]
    return next(((param, message) for param, bad, message in checks if bad), None)


# -- responses -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (device or a lower tier)."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    """The legacy completions' logprobs: parallel lists, one entry per output token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    """The `logprobs` most likely tokens and the sampled one (up to logprobs + 1 entries)."""


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobContent(ChatLogprob):
    top_logprobs: list[ChatLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprobContent] | None = None


class PromptLogprob(BaseModel):
    """vLLM's shape of one token's entry in `prompt_logprobs`."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    """vLLM's extra: the stop string or stop token id that ended the output, if any."""
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    """vLLM's extra: per prompt token (None for the first), its entry and the top k's."""


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str
    """A JSON string, as OpenAI's."""


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning: str | None = None
    """The thinking a reasoning parser split off (vLLM's field)."""
    reasoning_content: str | None = None
    """The same, under vLLM's former name (DeepSeek's, which many clients read)."""
    tool_calls: list[ToolCallOut] | None = None
    """Calls the tool-call parser read from the answer."""

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Left out when there are none; content stays, null where the calls replace it.
        return {key: value for key, value in handler(self).items()
                if value is not None or key == "content"}


class DeltaToolCall(BaseModel):
    """A whole call in one chunk: its index in the message, id, name and arguments."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """Only the fields that changed: `{"role": "assistant", "content": ""}` first, then
    `{"content": "..."}`, and `{}` in a final chunk that only carries the finish reason."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvtier"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
