"""`create_app(async_engine, settings)`: the FastAPI app of `kvtier serve`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models` and
`POST /reset_prefix_cache` (behind the API key when one is set), and `POST /tokenize`,
`/detokenize`, `GET /health`, `/version`, `/metrics`, `/openapi.json` (always open, as vLLM's
API key guards only `/v1`).
The app holds no global state: its metrics live in its own registry, so tests may build
several apps in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from kvtier import __version__
from kvtier.engine.async_engine import AsyncEngine, EngineClosedError
from kvtier.server.errors import OpenAIError, from_engine_error, install_error_handlers
from kvtier.server.metrics import CONTENT_TYPE, ServerMetrics
from kvtier.server.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware
from kvtier.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    PrefixCacheResetResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from kvtier.server.serving import OpenAIServing

DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: tuple[str, ...] = ()
    """Names clients may send as `model`; the first is used in responses. Empty = the
    engine's model name."""
    api_key: str | None = None
    """When set, `/v1/*` needs `Authorization: Bearer <api_key>`."""
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    chat_template: str | None = None
    """A Jinja chat template that replaces the model's (`--chat-template`); None: the
    model's."""
    tool_call_parser: str | None = None
    """Set (`--enable-auto-tool-choice --tool-call-parser`): chat answers to requests with
    tools have their tool calls read out."""
    reasoning_parser: str | None = None
    """Set (`--reasoning-parser`): chat answers' thinking comes out as `reasoning`."""
    allowed_origins: tuple[str, ...] = ("*",)
    """CORS, with vLLM's defaults: browser pages on these origins may call the API."""
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    def __post_init__(self) -> None:
        if self.max_request_body_bytes < 1:
            raise ValueError("max_request_body_bytes must be >= 1")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (pass None to disable it)")


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in (
        (400, "Malformed request, bad value, or prompt too long."),
        (401, "Missing or wrong API key."),
        (404, "Unknown model."),
        (409, "Requests are unfinished: the prefix cache was not reset."),
        (413, "Request body too large."),
        (503, "Waiting queue full (see Retry-After) or shutting down."))}
_STREAM_DOC: dict[str, Any] = {"content": {"text/event-stream": {}},
                               "description": "JSON, or server-sent events when stream=true."}


def create_app(async_engine: AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    """Build the app around a started AsyncEngine; registers the app's metrics listener."""
    settings = settings or ServerSettings()
    names = settings.served_model_names or (async_engine.model_name,)
    metrics = ServerMetrics(async_engine.snapshot, model_name=names[0])  # vLLM's label value
    async_engine.add_listener(metrics.observe)
    serving = OpenAIServing(async_engine, names, on_tokenized=metrics.tokenize_time.observe,
                            chat_template=settings.chat_template,
                            tool_parser=settings.tool_call_parser,
                            reasoning_parser=settings.reasoning_parser)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        serving.close()

    app = FastAPI(title="kvtier", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible LLM server with tiered KV-cache reuse.")
    install_error_handlers(app)

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={200: _STREAM_DOC, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Complete a prompt (text or token ids); `stream=true` for server-sent events."""
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={200: _STREAM_DOC, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Answer a conversation rendered with the model's chat template."""
        return await serving.chat(body, request)

    @app.post("/tokenize", response_model=TokenizeResponse,
              responses={k: _ERRORS[k] for k in (400, 404, 413)})
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """Token ids of a prompt, or of chat messages rendered with the template (vLLM's)."""
        return await serving.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse,
              responses={k: _ERRORS[k] for k in (400, 404, 413)})
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """Text of token ids, special tokens kept (vLLM's)."""
        return await serving.detokenize(body)

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]})
    async def models() -> ModelList:
        root = async_engine.model_name
        return ModelList(data=[ModelCard(id=name, root=root,
                                         max_model_len=async_engine.max_model_len)
                               for name in names])

    @app.post("/reset_prefix_cache", response_model=PrefixCacheResetResponse,
              responses={k: _ERRORS[k] for k in (400, 401, 409, 503)})
    async def reset_prefix_cache(reset_external: bool = False,
                                 reset_running_requests: bool = False,
                                 ) -> PrefixCacheResetResponse:
        """Forget the device prefix cache, so the next prompts are computed afresh (vLLM's
        route; SGLang's is /flush_cache); `reset_external=true` also empties the KV tiers
        (for a shared Redis tier, every replica's). 409 while requests are unfinished."""
        if reset_running_requests:
            raise OpenAIError(400, "reset_running_requests is not supported: the cache is "
                                   "reset between requests; retry once they have finished",
                              param="reset_running_requests")
        try:
            result = await async_engine.reset_prefix_cache(reset_external)
        except EngineClosedError as exc:
            raise from_engine_error(exc) from exc
        if not result.reset:
            raise OpenAIError(409, f"prefix cache not reset: {result.reason}",
                              code="requests_unfinished", error_type="conflict_error")
        return PrefixCacheResetResponse(device_blocks=result.device_blocks,
                                        tier_entries=result.tier_entries)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine serves; 503 once it is shutting down or its thread died."""
        if async_engine.is_accepting:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition (counters, gauges, latency histograms)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    # Outermost: a browser's preflight (OPTIONS, no API key) is answered here, and every
    # response, a 401 or 413 included, carries the CORS headers the browser needs to read it.
    app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                       allow_methods=list(settings.allowed_methods),
                       allow_headers=list(settings.allowed_headers),
                       allow_credentials=settings.allow_credentials)
    app.state.metrics = metrics
    return app
