"""Every failure as OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.

FastAPI answers malformed bodies with 422 and its own shape; OpenAI clients expect 400 and
OpenAI's shape, so the handlers here replace FastAPI's. Error bodies are ASCII-escaped JSON, so
a message can never fail to encode (a prompt may hold lone surrogates).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from kvtier.engine.async_engine import EngineClosedError, QueueFullError, RequestAbortedError
from kvtier.types import InvalidRequestError

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          503: "service_unavailable_error"}


class OpenAIError(Exception):
    """Raise from a route to answer `status` with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, error_type: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(status, "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(json.dumps(self.body(), ensure_ascii=True), status_code=self.status,
                        headers=self.headers, media_type="application/json")


def from_engine_error(exc: Exception) -> OpenAIError:
    """Map what `AsyncEngine.add_request` and a request's stream raise to an HTTP error."""
    if isinstance(exc, InvalidRequestError):
        return OpenAIError(400, str(exc), param=exc.param)
    if isinstance(exc, QueueFullError):
        return OpenAIError(503, f"{exc}; retry later", code="queue_full",
                           error_type="server_overloaded",
                           headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, EngineClosedError):
        return OpenAIError(503, str(exc), code="shutting_down",
                           headers={"Retry-After": "5", "Connection": "close"})
    if isinstance(exc, RequestAbortedError):
        status = {"timeout": 408, "shutdown": 503}.get(exc.reason, 500)
        return OpenAIError(status, str(exc), code=f"request_{exc.reason}")
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return OpenAIError(500, "internal server error", error_type="server_error")


_UNION_BRANCH = re.compile(r"\[|^(str|int|float|bool|list|dict|none)$")
"""A location part naming which member of a union type an error is about (`str`,
`list[int]`), not a field: dropped from the parameter users see."""


_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})
"""Where FastAPI found the value (the first part of an error's location): not a parameter."""


def _param_parts(error: Any) -> list[str]:
    loc = list(error.get("loc", ()))
    if loc and loc[0] in _LOCATIONS:
        loc = loc[1:]
    return [str(part) for part in loc
            if not (isinstance(part, str) and _UNION_BRANCH.search(part))]


def _most_telling(errors: Sequence[Any]) -> Any:
    """The error to report. A value that fits no member of a union gets one error per member;
    most say only "not this type". One that is not a type mismatch (too many items, a value
    out of range) names the problem, else the member that got furthest into the value."""
    def rank(error: Any) -> tuple[bool, int]:
        return (not str(error.get("type", "")).endswith("_type"), len(error.get("loc", ())))
    return max(errors, key=rank)  # max keeps the first of equals: the order pydantic tried


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A one-line message and the offending parameter from pydantic's error list."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type", "") == "json_invalid":
        return "the request body is not valid JSON", None
    fields = {tuple(_param_parts(e))[:1] for e in errors}
    chosen = _most_telling(errors) if len(fields) == 1 else first
    param = ".".join(_param_parts(chosen)) or None
    if chosen.get("type", "") == "missing" and param:
        return f"missing required parameter {param!r}", param
    message = str(chosen.get("msg", "invalid value"))
    # Errors about one field are its union members' alternatives, not more problems.
    more = f" (and {len(errors) - 1} more errors)" if len(fields) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def _not_parsed_as_json(error: Any) -> bool:
    """The whole body failed validation as raw bytes: FastAPI did not parse it as JSON."""
    return tuple(error.get("loc", ())) == ("body",) and isinstance(error.get("input"), bytes)


def install_error_handlers(app: FastAPI) -> None:
    """Replace FastAPI's 422 and Starlette's plain-text errors by OpenAI error bodies."""

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        if any(_not_parsed_as_json(error) for error in errors):
            # FastAPI parses only JSON media types; any other body reaches the model as bytes,
            # whose error ("a valid dictionary") hides the cause (e.g. `curl -d`'s form type).
            content_type = request.headers.get("content-type", "")
            return OpenAIError(400, f"the request body must be JSON sent with Content-Type: "
                                    f"application/json, not {content_type!r}").response()
        message, param = validation_message(errors)
        return OpenAIError(400, message, param=param).response()

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return OpenAIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    async def on_openai(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenAIError)
        return exc.response()

    async def on_any(request: Request, exc: Exception) -> Response:
        return from_engine_error(exc).response()

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(OpenAIError, on_openai)
    app.add_exception_handler(InvalidRequestError, on_any)
    app.add_exception_handler(Exception, on_any)
