"""`kvtier generate` in-process: the text on stdout, logprobs and errors on stderr."""

from __future__ import annotations

import pytest

from kvtier import LLM, SamplingParams
from kvtier.cli import main

MODEL = ["--model", "random:tiny-llama", "--max-model-len", "256",
         "--num-gpu-blocks-override", "64", "--device", "cpu"]


def test_generate_prints_the_offline_text_and_one_logprob_line_per_token(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "one two three", "--max-tokens", "5", "--ignore-eos",
                 "--logprobs", "2", *MODEL]) == 0
    out, err = capsys.readouterr()
    offline = LLM("random:tiny-llama", max_model_len=256, num_gpu_blocks_override=64,
                  device="cpu").generate(
        "one two three", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert out == offline.outputs[0].text + "\n"
    lines = [line for line in err.splitlines() if " logprob " in line]
    assert len(lines) == 5 and all("rank      1 | top: " in line for line in lines)


def test_a_bad_logprobs_value_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", "--logprobs", "-3", *MODEL]) == 2
    assert "logprobs must be None or an integer >= 0, got -3" in capsys.readouterr().err
