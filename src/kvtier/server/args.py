"""`kvtier serve` flags beyond the engine's (which come from `kvtier.engine.args`).

Kept free of heavy imports so that building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse
import json

from kvtier.config import ConfigError, parse_size
from kvtier.server.reasoning import REASONING_PARSERS
from kvtier.server.tool_calls import TOOL_CALL_PARSERS

DEFAULT_MAX_WAITING_REQUESTS = 4096


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server)")
    g.add_argument("--port", type=_port, default=8000, help="0 picks a free port (logged)")
    g.add_argument("--served-model-name", nargs="+", type=_model_name, default=None,
                   metavar="NAME",
                   help="names clients may send as `model` (first one answers); default: the "
                        "model's name")
    g.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="render chats with this Jinja template (a file, or the template "
                        "itself) instead of the model's, as vLLM's flag")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="chat requests with tools may call them (tool_choice 'auto'): the "
                        "answers' tool calls are read with --tool-call-parser")
    g.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                   help="the format the model writes tool calls in (hermes: Qwen2.5's, "
                        "Qwen3's and Hermes models' <tool_call> blocks; llama3_json: Llama "
                        "3.1-3.3's JSON answers)")
    g.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="split reasoning models' thinking (<think>...</think>) from chat "
                        "answers into `reasoning` (deepseek_r1: DeepSeek-R1 and its distills; "
                        "qwen3: also honours enable_thinking false)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: the "
                        "KVTIER_API_KEY environment variable, else no key)")
    for name in ("origins", "methods", "headers"):
        # vLLM's CORS flags and defaults: a browser page on any origin may call the API.
        g.add_argument(f"--allowed-{name}", nargs="+", type=_cors_values, default=[["*"]],
                       metavar="VALUE", help=f"CORS: allowed {name}, as values or a JSON "
                       "list (default: *)")
    g.add_argument("--allow-credentials", action="store_true",
                   help="CORS: allow credentials (cookies, authorization headers)")
    g.add_argument("--max-waiting-requests", type=_positive_int,
                   default=DEFAULT_MAX_WAITING_REQUESTS,
                   help="requests allowed to wait for their first schedule; past it new ones "
                        "get 503 with Retry-After (default %(default)s)")
    g.add_argument("--request-timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="abort requests still running this long after arrival (default: none)")
    g.add_argument("--max-request-body-bytes", type=_positive_size, default=4 * 1024 * 1024,
                   help="larger request bodies get 413 (default 4MiB)")
    g.add_argument("--api-server-count", type=_positive_int, default=1, metavar="N",
                   help="HTTP front-end processes sharing the listening socket and one engine "
                        "process (vLLM's flag; default 1). More of them keep up with a fast "
                        "engine's token streams")
    g.add_argument("--shutdown-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long in-flight requests may finish before they "
                        "are aborted")


def _positive_size(text: str) -> int:
    """A size in bytes (`4MiB`, `1000000`) of at least one byte."""
    try:
        value = parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def _cors_values(text: str) -> list[str]:
    """One `--allowed-*` value, or a JSON list of them (vLLM's form: '["http://a"]')."""
    if text.startswith("["):
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list: {exc}") from None
        if not (isinstance(values, list) and all(isinstance(v, str) and v for v in values)):
            raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list of strings")
        return values
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return [text]


def cors_list(values: list[list[str]]) -> tuple[str, ...]:
    """An `--allowed-*` flag's values, flattened."""
    return tuple(value for group in values for value in group)


def _model_name(text: str) -> str:
    """A served model name: not empty or blank (a client sending `model: ""` gets the default
    model anyway, so a blank name could never be asked for by itself)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


def _port(text: str) -> int:
    """A TCP port, 0..65535 (past it the OS would wrap: 70000 listened on 4464)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value
