"""ReuseCounter: per-chunk counts, the windowed reuse rate, and `--kv-store-min-hits`'s parsing."""

from __future__ import annotations

import argparse

import pytest

from kvtier.config import ConfigError, TierConfig
from kvtier.engine.args import add_engine_args
from kvtier.tiers.chunks import Chunk, ReuseCounter


def chunk(name: str, num_blocks: int = 4) -> Chunk:
    return Chunk(tuple(f"{name}-{i}".encode() for i in range(num_blocks)))


def test_counts_requests_per_chunk() -> None:
    counter = ReuseCounter(window_blocks=64)
    counter.note([chunk("a"), chunk("b")])
    counter.note([chunk("a")])
    assert [counter.count(chunk(n)) for n in "abc"] == [2, 1, 0]


def test_the_rate_weighs_blocks_and_forgets_notes_older_than_the_window() -> None:
    counter = ReuseCounter(window_blocks=12, min_notes=1)
    counter.note([chunk("a", 4)])
    assert counter.reuse_rate == 0.0 and not counter.window_full
    counter.note([chunk("a", 4), chunk("x", 2)])  # 4 of 6 blocks seen before
    assert counter.reuse_rate == pytest.approx(4 / 10)
    counter.note([chunk("y", 2)])
    assert counter.window_full and counter.reuse_rate == pytest.approx(4 / 12)
    # The first note leaves the window once the newer notes alone fill it.
    counter.note([chunk("z", 4)])
    assert counter.window_full and counter.reuse_rate == pytest.approx(4 / 12)
    counter.note([chunk("w", 4)])  # y, z and w alone are 10 blocks: the second note stays
    assert counter.reuse_rate == pytest.approx(4 / 16)
    counter.note([chunk("v", 4)])
    assert counter.reuse_rate == 0.0  # y, z, w and v


def test_a_note_longer_than_the_window_is_kept_whole() -> None:
    counter = ReuseCounter(window_blocks=4, min_notes=1)
    counter.note([chunk("a", 8)])
    counter.note([chunk("a", 8)])
    assert counter.window_full and counter.reuse_rate == 1.0


def test_the_window_spans_at_least_min_notes_requests() -> None:
    # Long prompts on a small pool: two fill its blocks, but two first uses say nothing.
    counter = ReuseCounter(window_blocks=4, min_notes=3)
    counter.note([chunk("a", 8)])
    counter.note([chunk("b", 8)])
    assert not counter.window_full
    counter.note([chunk("a", 8)])
    assert counter.window_full and counter.reuse_rate == pytest.approx(1 / 3)
    counter.note([chunk("c", 8)])  # the oldest note leaves: three remain
    assert counter.reuse_rate == pytest.approx(1 / 3)


def test_the_oldest_keys_are_forgotten_past_max_keys() -> None:
    counter = ReuseCounter(max_keys=2, window_blocks=64)
    counter.note([chunk("a"), chunk("b"), chunk("c")])
    assert [counter.count(chunk(n)) for n in "abc"] == [0, 1, 1]


@pytest.mark.parametrize("value", ["auto", 1, 3])
def test_min_hits_accepts_auto_and_positive_integers(value: int | str) -> None:
    assert TierConfig(kv_store_min_hits=value).kv_store_min_hits == value


@pytest.mark.parametrize("value", [0, -1, "sometimes", True, 1.5])
def test_min_hits_refuses_other_values_naming_them(value: object) -> None:
    with pytest.raises(ConfigError, match=f"kv_store_min_hits {value!r}"):
        TierConfig(kv_store_min_hits=value)  # type: ignore[arg-type]


def test_the_cli_flag_parses_auto_and_integers_and_names_a_bad_value(
        capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args([]).kv_store_min_hits == "auto"
    assert parser.parse_args(["--kv-store-min-hits", "2"]).kv_store_min_hits == 2
    for bad in ("0", "often"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--kv-store-min-hits", bad])
        assert f"--kv-store-min-hits: {bad!r} is not 'auto' or an integer >= 1" in \
            capsys.readouterr().err
