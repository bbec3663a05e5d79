"""Chat templates rendered the way transformers renders them (`chat_template_utils`): a
sandboxed jinja2 environment with trim_blocks/lstrip_blocks, `raise_exception`, `tojson` without
HTML escaping, `strftime_now`, `{% generation %}` blocks and an underscore-safe `namespace`."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(
            lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses dunder-ish attribute names, like transformers' sandbox."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- jinja's signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore attributes on a namespace: {name!r}")


class ChatTemplateError(ValueError, jinja2.exceptions.TemplateError):
    """The model's chat template is not valid Jinja, fails while rendering, or refuses the
    conversation (its `raise_exception`). A ValueError, so the CLI reports it on one line (exit
    2) and the server as a 400; still a jinja2.TemplateError for callers that caught that."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes '<' and '&', which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def read_chat_template(value: str) -> str:
    """A `--chat-template` value as vLLM reads it: a file's text if `value` opens as one,
    else the template itself if it holds a Jinja character (`{`, `}` or a newline; escapes
    such as `\\n` decoded). A value that is neither raises ValueError naming it."""
    try:
        with open(value, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        if not any(char in value for char in "{}\n"):
            raise ValueError(f"chat template {value!r} looks like a file path, but it cannot "
                             f"be read: {exc}") from None
    # Escapes decoded, other characters kept (vLLM's codecs.decode would garble non-ASCII).
    return value.encode("latin-1", "backslashreplace").decode("unicode_escape")


def check_chat_template(source: str) -> None:
    """Raise ChatTemplateError if `source` is not valid Jinja (line named)."""
    try:
        compile_chat_template(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {exc.message} "
                                f"(line {exc.lineno})") from exc
