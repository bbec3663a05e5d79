"""experiment.py: parsing, validation errors that name the field, presets."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kvtier.lab.experiment import (
    ExperimentError,
    engine_flags,
    list_presets,
    load_experiment,
    parse_experiment,
)

VALID = """
name = "demo"
model = "random:tiny-llama"
[bench]
seed = 3
ignore_eos = true
[[servers]]
name = "off"
engine = { num_gpu_blocks_override = 64, enable_prefix_caching = true }
[[servers]]
name = "on"
engine = { num_gpu_blocks_override = 64, kv_tier = ["cpu:64MiB", "disk:/tmp/kv:1GiB"] }
args = ["--max-num-seqs", "4"]
[[servers]]
name = "vllm"
launch = "vllm serve {model} --port {port}"
model = "Qwen/Qwen2.5-1.5B-Instruct"
[[servers]]
name = "remote"
base_url = "http://10.0.0.2:8000"
[[workloads]]
name = "P"
dataset_name = "prefix_repetition"
num_prompts = 8
request_rate = "inf"
prefix_repetition_prefix_len = 128
prefix_repetition_num_prefixes = 4
[[workloads]]
name = "S"
dataset_name = "sharegpt"
num_prompts = 4
request_rate = 2
goodput = ["ttft:500"]
"""


def parse(text: str) -> Any:
    return parse_experiment(tomllib.loads(text), "test.toml")


def with_change(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new, 1)


def test_valid_experiment_parses_every_server_kind_and_shared_bench_fields():
    exp = parse(VALID)
    assert [s.kind for s in exp.servers] == ["kvtier", "kvtier", "launch", "url"]
    off, on, vllm, _ = exp.servers
    assert off.engine == ("--num-gpu-blocks-override", "64", "--enable-prefix-caching")
    assert on.engine == ("--num-gpu-blocks-override", "64", "--kv-tier", "cpu:64MiB", "--kv-tier",
                         "disk:/tmp/kv:1GiB", "--max-num-seqs", "4")
    assert off.model == "random:tiny-llama" and vllm.model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert on.engine_value("num-gpu-blocks-override") == "64"
    p, s = exp.workloads
    assert p.fields["seed"] == 3 and p.fields["ignore_eos"] is True
    assert math.isinf(p.fields["request_rate"]) and s.fields["request_rate"] == 2.0
    assert s.fields["goodput"] == ("ttft:500",)
    assert p.prefix_working_set_tokens() == 4 * 128
    assert s.prefix_working_set_tokens() is None
    config = p.bench_config("http://127.0.0.1:9", label="x")
    assert config.base_url == "http://127.0.0.1:9" and config.prefix_repetition_prefix_len == 128


def test_false_becomes_no_flag_and_host_port_are_refused():
    assert engine_flags({"enable_prefix_caching": False}, "e") == ["--no-enable-prefix-caching"]
    with pytest.raises(ExperimentError, match=r"servers\.engine\.port"):
        engine_flags({"port": 1}, "servers.engine")
    with pytest.raises(ExperimentError, match=r"e\.kv_tier: expected a string"):
        engine_flags({"kv_tier": [{"a": 1}]}, "e")


@pytest.mark.parametrize(("old", "new", "message"), [
    ('name = "demo"', 'name = "demo"\nbogus = 1', r"experiment\.bogus: unknown field"),
    ("num_prompts = 8", "num_prompts = 0", r"workloads\[0\]: num_prompts must be >= 1"),
    ("num_prompts = 8", 'num_prompts = "eight"', r"workloads\[0\]\.num_prompts: expected int"),
    ("num_prompts = 8", "num_promts = 8", r"workloads\[0\]\.num_promts: unknown benchmark"),
    ('dataset_name = "sharegpt"', 'dataset_name = "nope"', r"workloads\[1\]: dataset_name"),
    ("ignore_eos = true", "ignore_eos = 1", r"workloads\[0\]\.ignore_eos: expected bool"),
    ('name = "S"', 'name = "P"', r"workloads\[1\]\.name: 'P' is used twice"),
    ('launch = "vllm serve {model} --port {port}"', 'launch = "vllm serve"',
     r"servers\[2\]\.launch: the command must contain \{port\}"),
    ('base_url = "http://10.0.0.2:8000"', 'base_url = "10.0.0.2:8000"',
     r"servers\[3\]\.base_url: expected http"),
    ('base_url = "http://10.0.0.2:8000"', 'base_url = "http://x:1"\nengine = {}',
     r"servers\[3\]: give one of"),
    ('name = "remote"', 'nmae = "remote"', r"servers\[3\]\.nmae: unknown field"),
    ('args = ["--max-num-seqs", "4"]', "args = [4]", r"servers\[1\]\.args: expected a list"),
    ("[bench]\nseed = 3", "[bench]\nseed = 3\nbase_url = 'x'", r"base_url: unknown benchmark"),
    ('name = "demo"', 'name = "demo"\nrepeats = 0', r"experiment\.repeats: .* got 0"),
    ('name = "demo"', 'name = "demo"\nrepeats = "3"', r"experiment\.repeats: .* got '3'"),
    ('name = "demo"', 'name = "demo"\nrepeats = true', r"experiment\.repeats: .* got True"),
    ('name = "remote"', 'name = "remote"\nstartup_timeout_s = -5',
     r"servers\[3\]\.startup_timeout_s: expected a positive number, got -5"),
    ('name = "remote"', 'name = "remote"\nblock_size = 0',
     r"servers\[3\]\.block_size: expected a positive number, got 0"),
    ('name = "remote"', 'name = "remote"\ndevice_kv_tokens = -1',
     r"servers\[3\]\.device_kv_tokens: expected a positive number, got -1"),
    ('name = "remote"', 'name = "remote"\nenv = { A = [1] }', r"servers\[3\]\.env\.A: expected"),
    ('name = "remote"', 'name = "remote"\nreset_path = "flush_cache"',
     r"servers\[3\]\.reset_path: expected a path such as '/reset_prefix_cache', got "
     r"'flush_cache'"),
    ('name = "remote"', 'name = "remote"\nreset_path = 1',
     r"servers\[3\]\.reset_path: expected str"),
    # literal braces (a JSON option, ${VAR}) used to escape as a KeyError traceback when the
    # lab formatted the command, after the servers before it had run
    ('launch = "vllm serve {model} --port {port}"',
     "launch = \"\"\"vllm serve {model} --port {port} --kv-config '{\"a\": 1}'\"\"\"",
     r"servers\[2\]\.launch: unknown placeholder '\{\"a\": 1\}' .* write \{\{ and \}\} for a "
     r"literal brace"),
    ('launch = "vllm serve {model} --port {port}"',
     'launch = "cd ${HOME} && vllm serve {model} --port {port}"',
     r"servers\[2\]\.launch: .*'\{HOME\}'"),
    ("num_prompts = 8", "num_prompts = 8\nheader = { x-a = 1 }",
     r"workloads\[0\]\.header: expected a table of strings, got \{'x-a': 1\}"),
    # used to escape as an AttributeError traceback from the goodput parser
    ('goodput = ["ttft:500"]', "goodput = [500]",
     r"workloads\[1\]\.goodput: expected a string or a list of strings, got \[500\]"),
])
def test_malformed_experiments_name_the_field(old: str, new: str, message: str):
    with pytest.raises(ExperimentError, match=message):
        parse(with_change(old, new))


def test_missing_sections_and_bad_toml(tmp_path: Path):
    with pytest.raises(ExperimentError, match=r"servers: at least one"):
        parse('name = "x"\n[[workloads]]\nname = "w"\n')
    with pytest.raises(ExperimentError, match=r"workloads\[0\]\.name: required field"):
        parse('[[servers]]\nname = "a"\n[[workloads]]\nnum_prompts = 1\n')
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ExperimentError, match=r"bad\.toml: not valid TOML"):
        load_experiment(str(bad))
    with pytest.raises(ExperimentError, match=r"does not exist"):
        load_experiment(str(tmp_path / "missing.toml"))
    with pytest.raises(ExperimentError, match=r"neither an experiment file nor a preset"):
        load_experiment("no-such-preset")


def test_presets_parse_and_describe_themselves():
    presets = list_presets()
    assert {"seed-cpu", "seed-gpu", "smoke"} <= set(presets)
    assert all(presets.values())
    for name in presets:
        exp = load_experiment(name)
        assert exp.name == name and len(exp.servers) >= 2 and exp.workloads


def test_seed_gpu_is_the_peers_setup():
    exp = load_experiment("seed-gpu")
    off, on = exp.servers
    for spec in (off, on):
        assert spec.model == "random:qwen2.5-1.5b"
        assert spec.engine_value("num-gpu-blocks-override") == "4096"
        assert spec.engine_value("dtype") == "bfloat16"
    assert on.engine_value("kv-tier") == "cpu:16GiB" and off.engine_value("kv-tier") is None
    p, s, q = (w.fields for w in exp.workloads)
    assert (p["prefix_repetition_num_prefixes"], p["prefix_repetition_prefix_len"],
            p["prefix_repetition_suffix_len"], p["prefix_repetition_output_len"],
            p["num_prompts"], p["max_concurrency"]) == (64, 4096, 256, 128, 640, 64)
    assert (s["dataset_name"], s["num_prompts"], math.isinf(s["request_rate"])) == (
        "sharegpt", 1000, True)
    assert (q["prefix_repetition_output_len"], q["num_prompts"], q["max_concurrency"]) == (
        32, 256, 4)


def test_reset_path_defaults_to_none_and_parses():
    assert all(s.reset_path is None for s in parse(VALID).servers)
    changed = with_change('name = "remote"', 'name = "remote"\nreset_path = "/flush_cache"')
    assert parse(changed).servers[3].reset_path == "/flush_cache"


def test_repeats_default_to_one_and_parse():
    assert parse(VALID).repeats == 1
    assert parse(with_change('name = "demo"', 'name = "demo"\nrepeats = 3')).repeats == 3
