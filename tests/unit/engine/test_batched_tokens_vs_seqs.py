"""max_num_batched_tokens below max_num_seqs is refused, as vLLM refuses it: its
SchedulerConfig.verify_max_model_len raises "max_num_batched_tokens (X) must be greater than
or equal to max_num_seqs (Y)" whatever chunked prefill says (every running request needs at
least a token of a step's budget). Before, kvtier took `max_num_batched_tokens=64,
max_num_seqs=128` and ran with it.

A max_num_seqs left out is defaulted as vLLM's EngineArgs default it: 256, lowered to the
token budget when that is smaller, so a small budget alone (`max_num_batched_tokens=16`, the
tests' chunked-prefill setups) stays valid, in the Python API and on the command line."""

from __future__ import annotations

import pytest

from kvtier import LLM
from kvtier.cli import build_parser, main
from kvtier.config import ConfigError, EngineConfig, SchedulerConfig
from kvtier.engine.args import engine_kwargs

REFUSED = r"^max_num_batched_tokens \(64\) must be greater than or equal to max_num_seqs \(128\)$"


def test_a_budget_below_max_num_seqs_is_refused() -> None:
    with pytest.raises(ConfigError, match=REFUSED):
        SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=128)
    with pytest.raises(ConfigError, match=REFUSED):
        EngineConfig.from_kwargs(max_num_batched_tokens=64, max_num_seqs=128)
    with pytest.raises(ConfigError, match=r"^max_num_batched_tokens \(2048\) must be .* "
                                          r"max_num_seqs \(4096\)$"):
        EngineConfig.from_kwargs(max_num_seqs=4096)  # past the default budget


def test_llm_refuses_it_before_loading_anything() -> None:
    with pytest.raises(ConfigError, match=REFUSED):
        LLM("random:tiny-llama", device="cpu", max_num_batched_tokens=64, max_num_seqs=128)


@pytest.mark.parametrize(("kwargs", "budget", "seqs"), [
    ({}, 2048, 256),
    ({"max_num_batched_tokens": 16}, 16, 16),  # the default lowered to the budget
    ({"max_num_batched_tokens": 300}, 300, 256),
    ({"max_num_batched_tokens": 64, "max_num_seqs": None}, 64, 64),
    ({"max_num_batched_tokens": 64, "max_num_seqs": 64}, 64, 64),  # equal is fine
    ({"max_num_batched_tokens": 64, "max_num_seqs": 8}, 64, 8),
])
def test_max_num_seqs_left_out_defaults_within_the_budget(kwargs: dict[str, int | None],
                                                          budget: int, seqs: int) -> None:
    scheduler = EngineConfig.from_kwargs(**kwargs).scheduler
    assert (scheduler.max_num_batched_tokens, scheduler.max_num_seqs) == (budget, seqs)


def test_the_command_line_defaults_max_num_seqs_the_same_way() -> None:
    args = build_parser().parse_args(["serve", "--max-num-batched-tokens", "16"])
    assert EngineConfig.from_kwargs(**engine_kwargs(args)).scheduler.max_num_seqs == 16
    args = build_parser().parse_args(["serve"])
    assert EngineConfig.from_kwargs(**engine_kwargs(args)).scheduler.max_num_seqs == 256


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"]])
def test_the_command_line_refuses_it_in_one_line(command: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The engine's refusal reaches `kvtier serve`/`generate` as one line and exit 2, before
    any socket is bound or model loaded."""
    code = main([*command, "--device", "cpu", "--model", "random:tiny-llama",
                 "--max-num-batched-tokens", "64", "--max-num-seqs", "128"])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"kvtier {command[0]}: error: max_num_batched_tokens (64) must be greater than or "
        f"equal to max_num_seqs (128)"]
