"""sharegpt.py: stream-parsing the truncated dump and vLLM's ShareGPT sampling filters."""

from __future__ import annotations

import json
import random

import pytest

from kvtier.bench import sharegpt
from kvtier.bench.sharegpt import (
    is_valid_sequence,
    iter_json_array,
    oversample,
    sample_sharegpt,
    shuffled_conversations,
)


def record(i: int, turns: int = 2, text: str = "héllo wörld") -> dict:
    return {"id": f"r{i}", "conversations": [
        {"from": "human" if t % 2 == 0 else "gpt", "value": f"{text} {i} {t}"}
        for t in range(turns)]}


def test_truncated_array_keeps_complete_records(tmp_path, monkeypatch):
    monkeypatch.setattr(sharegpt, "_CHUNK_BYTES", 7)  # records and UTF-8 chars span chunks
    records = [record(i) for i in range(5)]
    full = json.dumps(records, indent=2, ensure_ascii=False).encode()
    path = tmp_path / "dump.json"
    path.write_bytes(full)
    assert list(iter_json_array(path)) == records
    cut = full.index(b'"r4"') + 10
    path.write_bytes(full[:cut])
    assert list(iter_json_array(path)) == records[:4]
    path.write_bytes(full[:full.index("ö".encode()) + 1])  # cut inside a UTF-8 character
    assert list(iter_json_array(path)) == []
    path.write_bytes(b"[]")
    assert list(iter_json_array(path)) == []
    path.write_bytes(b'{"a": 1}')
    with pytest.raises(ValueError):
        list(iter_json_array(path))


def test_real_dump_parses_all_complete_records(sharegpt_records):
    assert 17_600 <= len(sharegpt_records) <= 17_700  # 17,671 in the installed file
    assert all("id" in r and "conversations" in r for r in sharegpt_records)
    assert sharegpt_records[0]["id"] == "QWJhYvA_0"


def test_shuffle_is_vllms(sharegpt_records):
    entries = shuffled_conversations(sharegpt_records, seed=0)
    assert all(len(e["conversations"]) >= 2 for e in entries)
    kept = [r for r in sharegpt_records if len(r.get("conversations") or ()) >= 2]
    random.seed(0)
    random.shuffle(kept)  # vLLM: random.seed(seed); random.shuffle(data)
    assert [e["id"] for e in entries] == [e["id"] for e in kept]
    assert shuffled_conversations(sharegpt_records, 0, shuffle=False)[0]["id"] == "QWJhYvA_0"


def test_filters_on_the_real_dump(qwen, sharegpt_records):
    entries = shuffled_conversations(sharegpt_records, seed=0)
    samples = sample_sharegpt(qwen, entries, 300, request_id_prefix="s-")
    assert len(samples) == 300
    assert [s.request_id for s in samples[:2]] == ["s-0", "s-1"]
    for s in samples:
        assert 4 <= s.prompt_len <= 1024
        assert s.expected_output_len >= 4
        assert s.prompt_len + s.expected_output_len <= 2048
    # one-at-a-time walk with HF's `tokenizer(text).input_ids`: same picks, same lengths
    expected = []
    for e in entries:
        if len(expected) == 300:
            break
        prompt, answer = e["conversations"][0]["value"], e["conversations"][1]["value"]
        n_in, n_out = len(qwen.encode(prompt)), len(qwen.encode(answer))
        if is_valid_sequence(n_in, n_out):
            expected.append((prompt, n_in, n_out))
    assert [(s.prompt, s.prompt_len, s.expected_output_len) for s in samples] == expected


def test_fixed_output_len_skips_the_min_output_check(qwen):
    entries = [record(0, text="a"), record(1, text="tell me a long story about " * 3)]
    free = sample_sharegpt(qwen, entries, 10)
    fixed = sample_sharegpt(qwen, entries, 10, output_len=2)
    assert all(s.expected_output_len == 2 for s in fixed)
    assert len(fixed) >= len(free)


def test_is_valid_sequence_bounds():
    assert is_valid_sequence(4, 4) and is_valid_sequence(1024, 1024)
    assert not is_valid_sequence(3, 100)
    assert not is_valid_sequence(100, 3)
    assert is_valid_sequence(100, 3, skip_min_output_len_check=True)
    assert not is_valid_sequence(1025, 10)
    assert not is_valid_sequence(1024, 1025)


def test_oversample_fills_with_seeded_picks(qwen):
    samples = sample_sharegpt(qwen, [record(i, text="what is the capital of") for i in range(3)],
                              10, request_id_prefix="x")
    assert len(samples) == 3
    filled = oversample(samples, 7, seed=1, request_id_prefix="x")
    assert len(filled) == 7 and filled[:3] == samples
    assert [s.request_id for s in filled] == [f"x{i}" for i in range(7)]
    assert {s.prompt for s in filled} <= {s.prompt for s in samples}
    assert oversample(samples, 7, seed=1, request_id_prefix="x") == filled


@pytest.mark.parametrize(("content", "message"), [
    ('["a", 1]', r"record 0 is not a ShareGPT conversation .*'a'"),
    ('[{"id": "x", "conversations": 5}]', r"record 0 \(x\): 'conversations' is not a list"),
    ('[{"id": "x", "conversations": [{"value": "a b c d e"}, {"from": "gpt"}]}]',
     r"conversation x: turn 1 has no 'value'"),
    ("[]", r"holds no conversation of two or more turns"),
    ('[{"conversations": [{"value": "hi"}, {"value": "yo"}]}]',
     r"'.*dump.json': no conversation passes vLLM's length filters"),
])
def test_a_malformed_dump_is_a_value_error_naming_the_record(qwen, tmp_path, content, message):
    from kvtier.bench.config import BenchConfig, build_workload

    path = tmp_path / "dump.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        build_workload(BenchConfig(dataset_name="sharegpt", dataset_path=str(path),
                                   num_prompts=2), qwen)
