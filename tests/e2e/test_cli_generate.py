"""`kvtier generate` in-process: the text on stdout, logprobs and errors on stderr."""

from __future__ import annotations

import json

import pytest

from kvtier import LLM, SamplingParams
from kvtier.cli import main
from kvtier.model.architectures import ARCHITECTURES

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


def test_a_second_run_over_the_same_disk_tier_reuses_the_first_runs_prefix(
        tmp_path, capsys: pytest.CaptureFixture[str],  # noqa: ANN001
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvtier generate` shuts its engine down before it exits: the lazy tier's candidates
    reach the disk, and the next process's identical prompt loads them. Before, the process
    ended with them only on the device, and the second run recomputed everything. (Loads
    are granted: whether the tiny model's recompute beats the disk is the cost model's call.)"""
    from kvtier.tiers.cost import CostModel
    # Recomputing anything takes 1,000 s: every store and load pays.
    monkeypatch.setattr(CostModel, "recompute_s", lambda self, num_tokens, first_token=0: 1e3)
    prompt = " ".join(["alpha beta gamma delta"] * 12)  # several full 16-token blocks
    args = ["generate", prompt, "--max-tokens", "2", "--kv-tier", f"disk:{tmp_path}:64MiB",
            *MODEL]
    assert main(args) == 0
    first = capsys.readouterr().err
    assert main(args) == 0
    second = capsys.readouterr().err
    assert "(0 cached)" in first
    cached = int(second.split("(")[1].split(" cached")[0])
    assert cached >= 32, second


def test_an_llm_shut_down_refuses_new_requests_by_name() -> None:
    with LLM("random:tiny-llama", max_model_len=256, num_gpu_blocks_override=64,
             device="cpu") as llm:
        llm.generate("one two", SamplingParams(max_tokens=1))
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate("one two", SamplingParams(max_tokens=1))
    llm.shutdown()  # a second shutdown is harmless


def test_a_model_of_an_unsupported_architecture_exits_2_naming_it(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    """`kvtier generate --model DIR` for a Mixtral checkpoint: one error line, exit 2, no
    traceback; `LLM(model=DIR)` raises the same message."""
    config = {**ARCHITECTURES["tiny-llama"].config, "architectures": ["MixtralForCausalLM"],
              "model_type": "mixtral"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["generate", "hi", "--model", str(tmp_path), "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvtier generate: error: "), err
    assert "['MixtralForCausalLM'] are not supported (supported: LlamaForCausalLM" in err
    with pytest.raises(ValueError, match="MixtralForCausalLM'\\] are not supported"):
        LLM(model=str(tmp_path))


def test_a_chat_template_that_is_not_valid_jinja_exits_2_on_one_line(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvtier generate --chat` with a model whose template is malformed Jinja: one error line
    and exit 2 (before: TemplateSyntaxError's traceback)."""
    from kvtier.model import tokenizer as tokenizer_module
    monkeypatch.setattr(tokenizer_module, "_pick_chat_template",
                        lambda value: "{% for m in messages %}{{ m.content }")
    assert main(["generate", "hi", "--chat", "--max-tokens", "2", *MODEL]) == 2
    err = capsys.readouterr().err
    assert err == ("kvtier generate: error: the model's chat template is not valid Jinja: "
                   "unexpected '}' (line 1)\n"), err


def test_demo_writes_what_its_disk_tier_keeps_before_it_exits(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    """`kvtier demo` shuts its engine down as `kvtier generate` does: the long document's
    blocks reach the disk tier. Before, the demo exited with them only on the device."""
    assert main(["demo", "--model", "random:tiny-llama", "--device", "cpu", "--max-num-seqs",
                 "4", "--kv-tier", f"disk:{tmp_path}:64MiB"]) == 0
    assert "Throughput:" in capsys.readouterr().out
    assert list(tmp_path.rglob("*.kvt")), "the demo's disk tier holds no block"


def test_demo_with_too_short_a_context_says_so_before_it_starts(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", "random:tiny-llama", "--device", "cpu",
                 "--max-model-len", "256"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing of the demo ran
    assert "kvtier demo: error: the demo's long-document prompt has 896 tokens, but " \
           "max_model_len is 256: give --max-model-len 912 or more" in err
