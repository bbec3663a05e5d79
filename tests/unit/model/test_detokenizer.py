"""IncrementalDetokenizer: streamed deltas add up to a full decode, and each call is cheap."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.model.tokenizer import IncrementalDetokenizer, Tokenizer

MULTIBYTE_TEXT = "日本語の文章 🤖🎉👍🏽 naïve ĀāĂ ∑∫ 한국어 العربية ½"


def _stream(tokenizer: Tokenizer, prompt: list[int], ids: list[int], chunks: list[int],
            skip_special_tokens: bool) -> tuple[list[str], str]:
    """Feed `ids` in chunks of the given sizes; return the add() deltas and finish()'s tail."""
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas, start = [], 0
    for size in chunks:
        if start >= len(ids):
            break
        deltas.append(detok.add(ids[start:start + size]))
        start += size
    if start < len(ids):
        deltas.append(detok.add(ids[start:]))
    tail = detok.finish()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


def _token_ids(tokenizer: Tokenizer) -> st.SearchStrategy[int]:
    """Mostly byte-fragment ids of multi-byte characters and special ids, plus any id at all
    (including ids past the tokenizer's vocabulary, as a padded model vocab can sample)."""
    fragments = tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    special = sorted(tokenizer.special_token_ids)[:8]
    return st.one_of(st.sampled_from(fragments + special),
                     st.integers(0, tokenizer.vocab_size + 3))


@pytest.mark.parametrize("which", ["smollm", "qwen"])
def test_concatenated_deltas_equal_full_decode(which: str, request: pytest.FixtureRequest) -> None:
    """For random id streams cut into random chunks, after any prompt: deltas + finish() ==
    tokenizer.decode(output_ids), with and without special tokens; streamed text is never
    retracted: every running concatenation of deltas is a prefix of the final text (so a
    character split across tokens is never sent half-decoded as U+FFFD)."""
    tokenizer: Tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    ids_strategy = _token_ids(tokenizer)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(prompt=st.lists(ids_strategy, max_size=8), ids=st.lists(ids_strategy, max_size=40),
           chunks=st.lists(st.integers(1, 5), max_size=40), skip=st.booleans())
    def check(prompt: list[int], ids: list[int], chunks: list[int], skip: bool) -> None:
        deltas, tail = _stream(tokenizer, prompt, ids, chunks, skip)
        full = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) + tail == full
        streamed = ""
        for delta in deltas:
            streamed += delta
            assert full.startswith(streamed)

    check()


def test_multibyte_character_split_over_tokens_is_emitted_whole(
        smollm_tokenizer: Tokenizer) -> None:
    """An emoji whose UTF-8 bytes span several tokens appears only once complete."""
    ids = smollm_tokenizer.encode("a🤖", add_special_tokens=False)
    assert len(ids) > 2, "the emoji should take several byte tokens"
    detok = IncrementalDetokenizer(smollm_tokenizer, [])
    deltas = [detok.add([i]) for i in ids]
    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(ids) - 2)
    assert deltas[-1] == "🤖"


def test_work_per_call_is_bounded_by_new_tokens(smollm_tokenizer: Tokenizer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming 2,000 tokens one at a time never decodes more than a few tokens per call,
    i.e. add() is O(new tokens), not O(output so far)."""
    ids = smollm_tokenizer.encode(("The quick brown fox 🦊 jumps over 13 lazy dogs. " * 120),
                                  add_special_tokens=False)[:2000]
    decoded_lengths: list[int] = []
    original = smollm_tokenizer.convert_tokens_to_string

    def spy(tokens: list[str]) -> str:
        decoded_lengths.append(len(tokens))
        return original(tokens)

    monkeypatch.setattr(smollm_tokenizer, "convert_tokens_to_string", spy)
    detok = IncrementalDetokenizer(smollm_tokenizer, ids[:50])
    text = "".join(detok.add([i]) for i in ids) + detok.finish()
    assert text == smollm_tokenizer.decode(ids)
    assert max(decoded_lengths) <= 8
