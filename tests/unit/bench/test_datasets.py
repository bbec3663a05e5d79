"""datasets.py: seeded determinism and the structure of every synthetic workload (Qwen2.5)."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from kvtier.bench.datasets import (
    LongDocQAParams,
    MultiTurnParams,
    PrefixRepetitionParams,
    RandomParams,
    decode_to_target_len,
    sample_long_doc_qa,
    sample_multi_turn,
    sample_prefix_repetition,
    sample_random,
)
from kvtier.utils.resources import find_package_file
from kvtier.utils.tokenizer_json import QWEN_TOKENIZER, load_tokenizer

SMALL_PREFIX = PrefixRepetitionParams(prefix_len=64, suffix_len=32, num_prefixes=5, output_len=16)


def common_len(a: list[int] | str, b: list[int] | str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def vllm_reference_prefix_repetition(tokenizer, num_requests: int, p: PrefixRepetitionParams,
                                     seed: int) -> list[tuple[str, int]]:
    """vLLM's construction restated on the *global* RNGs it uses (seeded in its __init__)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        np.random.seed(seed)
        random.seed(seed)

        def draw(n: int) -> list[int]:
            return np.random.randint(0, tokenizer.vocab_size, size=n).tolist()

        out = []
        for _ in range(p.num_prefixes):
            prefix = decode_to_target_len(tokenizer, draw(p.prefix_len), p.prefix_len, draw)[1]
            for _ in range(num_requests // p.num_prefixes):
                suffix = decode_to_target_len(tokenizer, draw(p.suffix_len), p.suffix_len, draw)[1]
                out.append((tokenizer.decode(prefix + suffix), len(prefix + suffix)))
        random.shuffle(out)
        return out
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def test_prefix_repetition_matches_vllm_global_rng_construction(qwen):
    got = sample_prefix_repetition(qwen, 23, SMALL_PREFIX, seed=3)
    want = vllm_reference_prefix_repetition(qwen, 23, SMALL_PREFIX, seed=3)
    assert [(r.prompt, r.prompt_len) for r in got] == want


def test_prefix_repetition_structure(qwen):
    """Defaults: exactly 10 prefixes of 256 tokens, 10 requests each, shuffled."""
    params = PrefixRepetitionParams()
    requests = sample_prefix_repetition(qwen, 105, params, seed=0)
    assert len(requests) == 100  # num_requests // num_prefixes per prefix
    assert all(r.prompt_len == 512 and r.expected_output_len == 128 for r in requests)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[r.prompt[:40]].append(i)  # the first 40 characters lie inside the prefix text
    assert len(groups) == params.num_prefixes
    assert all(len(g) == 10 for g in groups.values())
    for members in groups.values():
        ids = [qwen.encode(requests[i].prompt) for i in members]
        shared = min(common_len(ids[0], other) for other in ids[1:])
        # the server re-tokenizes the text: it shares the 256 prefix tokens, give or take the
        # one token where prefix and suffix text meet
        assert params.prefix_len - 2 <= shared <= params.prefix_len + 2
        assert len({requests[i].prompt for i in members}) == len(members)  # distinct suffixes
    label = {i: key for key, members in groups.items() for i in members}
    runs = sum(label[i] != label[i + 1] for i in range(len(requests) - 1))
    assert runs > 50  # shuffled: not ten runs of ten


def test_prefix_repetition_needs_a_request_per_prefix(qwen):
    with pytest.raises(ValueError):
        sample_prefix_repetition(qwen, 4, SMALL_PREFIX)


@pytest.mark.parametrize("generate", [
    lambda tok, seed: sample_prefix_repetition(tok, 10, SMALL_PREFIX, seed),
    lambda tok, seed: sample_random(tok, 8, RandomParams(96, 16, 0.5, 8), seed),
    lambda tok, seed: sample_multi_turn(tok, 3, MultiTurnParams(2, 32, 16, 8, 0.25), seed),
    lambda tok, seed: sample_long_doc_qa(tok, LongDocQAParams(3, 64, 2, question_len=4), seed),
])
def test_seeded_determinism(qwen, generate):
    assert generate(qwen, 7) == generate(qwen, 7)
    assert generate(qwen, 7) != generate(qwen, 8)


def test_random_lengths_and_shared_prefix(qwen):
    params = RandomParams(input_len=200, output_len=50, range_ratio=0.25, prefix_len=40)
    requests = sample_random(qwen, 40, params, seed=0, request_id_prefix="r-")
    assert [r.request_id for r in requests[:2]] == ["r-0", "r-1"]
    for r in requests:
        assert 40 + 150 <= r.prompt_len <= 40 + 250
        assert 37 <= r.expected_output_len <= 63
        assert len(qwen.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
    ids = [qwen.encode(r.prompt, add_special_tokens=False) for r in requests]
    assert min(common_len(ids[0], other) for other in ids[1:]) >= params.prefix_len - 2
    assert len({r.prompt_len for r in requests}) > 10


def test_random_rejects_bad_range_ratio(qwen):
    with pytest.raises(ValueError):
        sample_random(qwen, 2, RandomParams(range_ratio=1.0))


def test_multi_turn_structure(qwen):
    params = MultiTurnParams(num_turns=3, system_prompt_len=100, input_len=40, output_len=20)
    convs = sample_multi_turn(qwen, 4, params, seed=0)
    assert [c.conversation_id for c in convs] == ["conv-0", "conv-1", "conv-2", "conv-3"]
    assert len({c.system_prompt for c in convs}) == 1  # one system prompt shared by all
    assert len(qwen.encode(convs[0].system_prompt, False)) == convs[0].system_prompt_len == 100
    for c in convs:
        assert c.num_turns == 3 and c.output_lens == (20, 20, 20)
        assert [len(qwen.encode(t, False)) for t in c.user_turns] == list(c.user_turn_lens)
    assert len({t for c in convs for t in c.user_turns}) == 12
    assert sample_multi_turn(qwen, 1, MultiTurnParams(system_prompt_len=0, num_turns=1),
                             0)[0].system_prompt == ""


@pytest.mark.parametrize("mode,order", [
    ("tile", [0, 1, 2, 0, 1, 2]),
    ("interleave", [0, 0, 1, 1, 2, 2]),
])
def test_long_doc_qa_orders(qwen, mode, order):
    work = sample_long_doc_qa(qwen, LongDocQAParams(3, 48, 2, mode, output_len=5), seed=0)
    assert [int(r.request_id.split("-")[0][3:]) for r in work.requests] == order
    docs = [r.prompt for r in work.warmup_requests]
    assert [r.prompt for r in work.requests] == [docs[i] for i in order]
    assert all(len(qwen.encode(d, False)) == 48 for d in docs)
    assert all(r.prompt_len == 48 and r.expected_output_len == 5 for r in work.requests)


def test_long_doc_qa_random_order_is_lmcaches(qwen):
    work = sample_long_doc_qa(qwen, LongDocQAParams(4, 32, 3, "random"), seed=5)
    lmcache = [0, 1, 2, 3] * 3
    random.Random(5).shuffle(lmcache)  # LMCache: random.seed(shuffle_seed); random.shuffle
    assert [int(r.request_id.split("-")[0][3:]) for r in work.requests] == lmcache


def test_long_doc_qa_misses_and_questions(qwen):
    params = LongDocQAParams(2, 40, 2, "tile", hit_miss_ratio=(1, 1), question_len=6,
                             warmup_round=False)
    work = sample_long_doc_qa(qwen, params, seed=0)
    assert work.warmup_requests == []
    hits, misses = work.requests[0::2], work.requests[1::2]
    assert all(r.prompt_len == 46 for r in hits)
    assert all(r.prompt.split(" ", 1)[0].lstrip("-").isdigit() and r.prompt_len > 46
               for r in misses)
    assert len({r.prompt for r in work.requests}) == 4  # every query differs


def test_decode_to_target_len_pads_and_truncates(qwen):
    draws = iter([[1, 2, 3]] * 20)
    text, ids, mismatch = decode_to_target_len(qwen, [9707, 1879], 5, lambda n: next(draws)[:n])
    assert (len(ids), mismatch) == (5, 0) and len(qwen.encode(text, False)) == 5
    text, ids, mismatch = decode_to_target_len(qwen, list(range(1000, 1010)), 4, lambda n: [])
    assert len(ids) == 4 and mismatch == 0


def test_tokenizer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    path = find_package_file(*QWEN_TOKENIZER)
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent))
    ours = load_tokenizer(path)
    assert (ours.vocab_size, ours.num_special_tokens_to_add()) == (hf.vocab_size, 0)
    assert set(hf.all_special_ids) <= set(ours.all_special_ids)
    rng = np.random.RandomState(0)
    for _ in range(5):
        ids = rng.randint(0, hf.vocab_size, size=200).tolist()
        text = hf.decode(ids)
        assert ours.decode(ids) == text
        assert ours.encode(text) == hf(text).input_ids
        assert ours.encode(text, False) == hf.encode(text, add_special_tokens=False)


def test_load_tokenizer_resolution(tmp_path, monkeypatch):
    path = find_package_file(*QWEN_TOKENIZER)
    assert load_tokenizer(path.parent).vocab_size == 151643
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert load_tokenizer("Qwen/Qwen2.5-1.5B-Instruct").vocab_size == 151643  # package fallback
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").symlink_to(path)
    assert Path(load_tokenizer("org/tiny").name) == snapshot / "tokenizer.json"
    with pytest.raises(FileNotFoundError):
        load_tokenizer("org/unknown-model")
