"""Long prompts tokenised as pieces in parallel must give exactly the ids of one encode.

A Q-shaped prompt (4,352 Qwen tokens of random-token text) took 17 ms to tokenise on this
2-core box, most of it the pre-tokenizer regex on one core; cut into pieces it takes 7 ms.
The cuts are only taken where the tokenizer's structure makes them exact
(`piece_cuts_are_exact`); these tests hunt for a text where they would not be.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.model.tokenizer import PARALLEL_MIN_CHARS, Tokenizer, cut_pieces

# Characters where the Qwen2 regex and NFC have their corner cases: contractions, letters
# of other scripts, combining marks (NFC composes them with what precedes), unicode spaces,
# CR/LF runs, digits of other scripts, punctuation runs, Hangul jamo, emoji.
TRICKY = list("aZz09 \t\n\r'sStTlLdDmMvVeEr.,!?-_/\\\"#") + [
    "\u00e9", "e\u0301", "\u0301", "\u0308", "\u00a0", "\u2009", "\u3000", "\u4e2d", "\u0663",
    "\u1100", "\u1161", "\u11a8", "\U0001f600", "\u200d", "\u0627", "\u00df", "\u0130",
    " '", "'ll", "'re", "'ve", "  ", "\r\n", "x1", "1x", "a b",
]


EXAMPLES = int(os.environ.get("KVTIER_HYPOTHESIS_EXAMPLES", "300"))
"""Raise it for a longer hunt (6,000 examples of each property passed once)."""


def whole_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.backend.encode(text, add_special_tokens=True).ids


def piece_ids(tokenizer: Tokenizer, text: str, chunk_chars: int) -> list[int]:
    encodings = tokenizer.backend.encode_batch(cut_pieces(text, chunk_chars),
                                               add_special_tokens=True)
    return [token for encoding in encodings for token in encoding.ids]


def test_only_the_qwen2_structure_is_cut(qwen_tokenizer: Tokenizer,
                                         smollm_tokenizer: Tokenizer) -> None:
    assert qwen_tokenizer.cuts_into_pieces
    # GPT-2 style regex (SmolLM2): digit runs and " ?\p{L}+" pieces; a cut could split them.
    assert not smollm_tokenizer.cuts_into_pieces


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TRICKY) | st.text(max_size=3), min_size=1, max_size=80),
       st.integers(1, 6))
def test_pieces_encode_to_the_ids_of_the_whole_text(qwen_tokenizer: Tokenizer,
                                                     parts: list[str], chunk_chars: int) -> None:
    # Tiny chunks cut at nearly every allowed place.
    text = "".join(parts)
    assert piece_ids(qwen_tokenizer, text, chunk_chars) == whole_ids(qwen_tokenizer, text)


def test_a_long_prompt_is_cut_and_encodes_the_same(qwen_tokenizer: Tokenizer) -> None:
    text = ("The quick brown fox jumps over 13 lazy dogs, doesn't it? Ünïcödé\u0301 text\n"
            * 200)
    assert len(text) > PARALLEL_MIN_CHARS
    assert len(cut_pieces(text, 2048)) > 4
    assert qwen_tokenizer.encode(text) == whole_ids(qwen_tokenizer, text)


@pytest.mark.parametrize("text", ["", "no cut here", "ab" * 5000, "1" * 10, "x " * 3000])
def test_cut_pieces_rejoin_to_the_text(text: str) -> None:
    pieces = cut_pieces(text, 7)
    assert "".join(pieces) == text
    assert all(pieces) or text == ""
