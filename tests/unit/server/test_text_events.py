"""`TextEvents` splices a stream chunk's text into an event rendered once: every event must be
byte-identical to rendering the whole chunk with pydantic, for any text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.server.protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    DeltaMessage,
)
from kvtier.server.responses import ResponseContext, TextEvents, sse

# Any text a detokenizer can produce: every code point but lone surrogates, so quotes,
# backslashes, control characters, NULs, non-ASCII and astral characters.
TEXTS = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
CONTEXTS = [
    ResponseContext("cmpl-1", 'a "model" / ü', 1_700_000_000, include_usage=False),
    ResponseContext("chatcmpl-2", "m", 1, include_usage=True),
]


def completion_render(ctx: ResponseContext, index: int):  # noqa: ANN201 - a render function
    return lambda text: sse(CompletionChunk(id=ctx.response_id, created=ctx.created,
                                            model=ctx.model,
                                            choices=[CompletionChoice(index=index, text=text)]),
                            ctx)


def chat_render(ctx: ResponseContext, index: int):  # noqa: ANN201 - a render function
    return lambda text: sse(ChatCompletionChunk(
        id=ctx.response_id, created=ctx.created, model=ctx.model,
        choices=[ChatStreamChoice(index=index, delta=DeltaMessage(content=text))]), ctx)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=5), which=st.integers(0, 3),
       index=st.integers(0, 3))
def test_spliced_events_equal_whole_renders(texts: list[str], which: int, index: int) -> None:
    ctx = CONTEXTS[which % 2]
    render = (completion_render if which < 2 else chat_render)(ctx, index)
    events = TextEvents(render)
    for text in texts:
        assert events(text) == render(text)


def test_the_placeholder_text_itself_round_trips() -> None:
    render = completion_render(CONTEXTS[0], 0)
    events = TextEvents(render)
    assert events("\x00kvtier text\x00") == render("\x00kvtier text\x00")
