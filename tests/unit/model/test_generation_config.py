"""Requests' default sampling from the model's generation_config.json, as vLLM's
`--generation-config` / `--override-generation-config`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from kvtier.config import ConfigError, EngineConfig
from kvtier.engine.args import add_engine_args, engine_kwargs
from kvtier.model.generation_config import SamplingDefaults, load_sampling_defaults
from kvtier.types import SamplingParams

# Qwen2.5-1.5B-Instruct's file: sampling fields among token ids and HF-only fields.
QWEN_INSTRUCT = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                 "eos_token_id": [151645, 151643], "repetition_penalty": 1.1,
                 "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                 "transformers_version": "4.37.0"}


def model_dir(tmp_path: Path, config: Any) -> Path:
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return tmp_path


def test_auto_reads_the_sampling_fields_of_the_models_file(tmp_path: Path) -> None:
    defaults = load_sampling_defaults("auto", model_dir(tmp_path, QWEN_INSTRUCT))
    assert defaults.items() == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                "repetition_penalty": 1.1}
    assert defaults.source == str(tmp_path / "generation_config.json")
    assert defaults.sampling_params() == SamplingParams(temperature=0.7, top_p=0.8, top_k=20,
                                                        repetition_penalty=1.1)


def test_auto_without_a_file_or_a_directory_sets_nothing(tmp_path: Path) -> None:
    assert load_sampling_defaults("auto", tmp_path).items() == {}
    assert load_sampling_defaults("auto", None).items() == {}
    assert load_sampling_defaults("auto", None).sampling_params() == SamplingParams()


def test_vllm_ignores_the_file_but_not_the_overrides(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, QWEN_INSTRUCT)
    assert load_sampling_defaults("vllm", directory).items() == {}
    assert load_sampling_defaults("vllm", directory, {"temperature": 0}).items() == {
        "temperature": 0.0}


def test_overrides_are_merged_over_the_file(tmp_path: Path) -> None:
    defaults = load_sampling_defaults("auto", model_dir(tmp_path, QWEN_INSTRUCT),
                                      {"top_k": 5, "min_p": 0.1})
    assert defaults.items() == {"temperature": 0.7, "top_p": 0.8, "top_k": 5, "min_p": 0.1,
                                "repetition_penalty": 1.1}
    assert defaults.source.endswith("generation_config.json and override_generation_config")


def test_a_folder_replaces_the_models_file(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "mine").mkdir()
    directory, folder = model_dir(tmp_path / "model", QWEN_INSTRUCT), tmp_path / "mine"
    model_dir(folder, {"temperature": 0.2, "max_new_tokens": 64})
    defaults = load_sampling_defaults(str(folder), directory)
    assert defaults.items() == {"temperature": 0.2, "max_tokens": 64}


def test_max_new_tokens_is_the_default_and_cap_of_max_tokens() -> None:
    defaults = SamplingDefaults(max_tokens=64)
    assert defaults.cap_max_tokens(16) == 16 and defaults.cap_max_tokens(500) == 64
    assert SamplingDefaults().cap_max_tokens(500) == 500
    assert defaults.pick("temperature", None, 1.0) == 1.0
    assert SamplingDefaults(temperature=0.5).pick("temperature", None, 1.0) == 0.5
    assert SamplingDefaults(temperature=0.5).pick("temperature", 0.0, 1.0) == 0.0


@pytest.mark.parametrize(("mode", "message"), [
    ("no/such/folder", "is not 'auto', 'vllm' or a folder"),
    ("{empty}", "the folder has no generation_config.json"),
])
def test_a_bad_mode_is_refused_by_name(tmp_path: Path, mode: str, message: str) -> None:
    mode = mode.replace("{empty}", str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        load_sampling_defaults(mode, None)


@pytest.mark.parametrize(("config", "message"), [
    ({"temperature": "hot"}, "temperature 'hot' must be a finite number"),
    ({"top_k": 2.5}, "top_k 2.5 must be an integer"),
    ({"top_k": True}, "top_k True must be an integer"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"max_new_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty nan must be a finite number"),
])
def test_a_bad_value_in_the_file_names_the_file_and_field(tmp_path: Path, config: Any,
                                                          message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        load_sampling_defaults("auto", model_dir(tmp_path, config))
    assert str(tmp_path / "generation_config.json") in str(raised.value)


def test_a_bad_override_names_the_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="override_generation_config: min_p must be in"):
        load_sampling_defaults("auto", model_dir(tmp_path, QWEN_INSTRUCT), {"min_p": 2})
    with pytest.raises(ConfigError, match="'temprature' is not one of temperature"):
        load_sampling_defaults("vllm", None, {"temprature": 0.5})


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_an_unreadable_file_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ConfigError, match="generation_config.json: (cannot be read as JSON|"
                                          "must hold a JSON object)"):
        load_sampling_defaults("auto", tmp_path)


def test_engine_config_takes_the_mode_and_a_dict_of_overrides() -> None:
    config = EngineConfig.from_kwargs(generation_config="vllm",
                                      override_generation_config={"temperature": 0.5})
    assert config.model.generation_config == "vllm"
    assert config.model.override_generation_config == {"temperature": 0.5}
    with pytest.raises(ConfigError, match="must be a dict of field names"):
        EngineConfig.from_kwargs(override_generation_config="temperature=0.5")
    with pytest.raises(ConfigError, match="generation_config is empty"):
        EngineConfig.from_kwargs(generation_config="")


def test_the_flags_reach_the_engine_config(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--generation-config", "vllm",
                              "--override-generation-config", '{"temperature": 0.5}'])
    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    assert (config.model.generation_config, config.model.override_generation_config) == (
        "vllm", {"temperature": 0.5})
    assert EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args([]))).model \
        .generation_config == "auto"
    for bad, message in (("{temperature: 0.5}", "is not JSON"), ("[0.5]", "is not a JSON object")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--override-generation-config", bad])
        assert f"--override-generation-config: {bad!r} {message}" in capsys.readouterr().err
