"""Long prompts tokenised as pieces in parallel must give exactly the ids of one encode.

A Q-shaped prompt (4,352 Qwen tokens of random-token text) took 17 ms to tokenise on this
2-core box, most of it the pre-tokenizer regex on one core; cut into pieces it takes 7 ms.
The cuts are only taken where the tokenizer's structure makes them exact
(`piece_cuts_are_exact`); these tests hunt for a text where they would not be. Pieces an
earlier text had are taken from the piece cache: prompts sharing prefixes, a cache small
enough to evict, and threads encoding at once must all still give the whole text's ids.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.model.piece_cache import PieceIdsCache
from kvtier.model.tokenizer import PARALLEL_CHUNK_CHARS, PARALLEL_MIN_CHARS, Tokenizer, cut_pieces

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


# -- the piece cache ------------------------------------------------------------------------


@pytest.fixture
def fresh_cache(qwen_tokenizer: Tokenizer) -> Iterator[PieceIdsCache]:
    """The session's tokenizer with an empty cache of its own, put back afterwards."""
    kept = qwen_tokenizer.piece_ids
    qwen_tokenizer.piece_ids = PieceIdsCache()
    yield qwen_tokenizer.piece_ids
    qwen_tokenizer.piece_ids = kept


def random_text(tokenizer: Tokenizer, rng: random.Random, num_tokens: int) -> str:
    return tokenizer.decode([rng.randrange(tokenizer.vocab_size) for _ in range(num_tokens)])


def test_a_shared_prefix_is_encoded_once(qwen_tokenizer: Tokenizer,
                                         fresh_cache: PieceIdsCache) -> None:
    rng = random.Random(0)
    prefix = random_text(qwen_tokenizer, rng, 4096)
    first, second = (prefix + random_text(qwen_tokenizer, rng, 256) for _ in range(2))
    assert qwen_tokenizer.encode(first) == whole_ids(qwen_tokenizer, first)
    stored = len(fresh_cache)
    assert stored == len(cut_pieces(first, PARALLEL_CHUNK_CHARS)) - 1  # the last is not kept
    assert fresh_cache.num_hits == 0
    assert qwen_tokenizer.encode(second) == whole_ids(qwen_tokenizer, second)
    # Every piece of the second prompt that ends inside the prefix came from the cache.
    shared = sum(1 for piece in cut_pieces(second, PARALLEL_CHUNK_CHARS)[:-1]
                 if piece in cut_pieces(first, PARALLEL_CHUNK_CHARS)[:-1])
    assert shared >= stored - 1 > 0
    assert fresh_cache.num_hits == shared


@settings(max_examples=max(20, EXAMPLES // 10), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(TRICKY) | st.text(max_size=3), min_size=1, max_size=40),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0, 8000)), min_size=2, max_size=6),
       st.integers(1, 4))
def test_texts_sharing_prefixes_keep_their_ids(qwen_tokenizer: Tokenizer,
                                               fresh_cache: PieceIdsCache, parts: list[str],
                                               uses: list[tuple[int, int]],
                                               capacity: int) -> None:
    # A few long texts built from tricky parts; each use takes one of them, cut anywhere, so
    # that pieces are shared, cut short and evicted (a cache of 1-4 pieces).
    qwen_tokenizer.piece_ids = PieceIdsCache(capacity)
    unit = "".join(parts) or "a"
    texts = [(unit * (PARALLEL_MIN_CHARS // len(unit) + 2))[i:] + unit * (i + 1)
             for i in range(4)]
    for which, cut in uses:
        text = texts[which][:PARALLEL_MIN_CHARS + cut]
        assert qwen_tokenizer.encode(text) == whole_ids(qwen_tokenizer, text)
        assert len(qwen_tokenizer.piece_ids) <= capacity


def test_threads_encoding_shared_prefixes_at_once(qwen_tokenizer: Tokenizer,
                                                  fresh_cache: PieceIdsCache) -> None:
    rng = random.Random(1)
    prefixes = [random_text(qwen_tokenizer, rng, 3000) for _ in range(3)]
    texts = [prefixes[i % 3] + random_text(qwen_tokenizer, rng, rng.randrange(1, 400))
             for i in range(24)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        encoded = list(pool.map(qwen_tokenizer.encode, texts))
    assert encoded == [whole_ids(qwen_tokenizer, text) for text in texts]
    assert fresh_cache.num_hits > 0


def test_the_cache_drops_the_least_recently_used_piece() -> None:
    cache = PieceIdsCache(capacity=2)
    cache.put("a", [1, 2])
    cache.put("b", [3])
    assert cache.get("a") == [1, 2]  # now the most recent
    cache.put("c", [4])
    assert cache.get("b") is None and cache.get("a") == [1, 2] and cache.get("c") == [4]
    assert (len(cache), cache.num_hits, cache.num_misses) == (2, 3, 1)
    with pytest.raises(ValueError, match="capacity must be at least 1, got 0"):
        PieceIdsCache(capacity=0)
