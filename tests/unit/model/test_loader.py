"""resolve_model: every --model form, random architectures, and every error it promises."""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvtier.attention.torch_ref import TorchAttentionBackend
from kvtier.model.architectures import ARCHITECTURES
from kvtier.model.llama import LlamaForCausalLM
from kvtier.model.loader import cache_dir, expected_weight_shapes, resolve_model
from kvtier.model.spec import ModelLoadError, ModelSpec
from tests.unit.model.conftest import write_tiny_model_dir

CPU = torch.device("cpu")
QWEN_REFERENCE_CONFIG = Path(__file__).parents[2] / "data" / "qwen2.5-1.5b-config.json"
"""Qwen2.5-1.5B-Instruct's config.json as published (copied from shared/peer-vllm/tools)."""
REAL_PARAMETER_COUNTS = {
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008, "llama-3.1-8b": 8_030_261_248,
    "qwen3-0.6b": 596_049_920}  # transformers' Qwen3ForCausalLM of its config counts this


@pytest.fixture()
def tiny_dir(tmp_path: Path, smollm_dir: Path) -> Path:
    return write_tiny_model_dir(tmp_path / "tiny-model", smollm_dir)


def test_embedded_model_and_its_gguf_path_resolve_to_smollm2(gguf_path: Path,
                                                             smollm_dir: Path) -> None:
    """--model unset and --model <the .gguf> give SmolLM2-135M-Instruct from the cache, with
    the same stable model_id; a warm resolve takes well under two seconds."""
    started = time.perf_counter()
    source = resolve_model(None)
    assert time.perf_counter() - started < 2.0
    assert source.name == "SmolLM2-135M-Instruct"
    assert source.path == smollm_dir
    assert source.spec.num_hidden_layers == 30 and source.spec.tie_word_embeddings
    assert source.tokenizer.eos_token_ids == {2}
    by_path = resolve_model(str(gguf_path))
    assert by_path.name == source.name
    assert by_path.model_id == source.model_id and source.model_id.startswith(source.name + "@")


def test_embedded_weights_stream_with_hf_names_in_the_requested_dtype() -> None:
    source = resolve_model(None)
    weights = dict(source.iter_weights(CPU, torch.bfloat16))
    assert set(weights) == set(expected_weight_shapes(source.spec))
    assert "lm_head.weight" not in weights  # tied
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_hf_directory_single_file_and_sharded_load_the_written_weights(
        tmp_path: Path, smollm_dir: Path, num_shards: int) -> None:
    """A directory with model.safetensors, or shards + model.safetensors.index.json, yields
    exactly the tensors that were saved; name is the directory name."""
    directory = write_tiny_model_dir(tmp_path / "my-model", smollm_dir, num_shards)
    source = resolve_model(str(directory))
    assert source.name == "my-model"
    assert len(source.weight_files) == num_shards
    expected = dict(resolve_model("random:tiny-llama", seed=3).iter_weights(CPU, torch.float32))
    got = dict(source.iter_weights(CPU, torch.float32))
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_model_id_changes_with_config_or_weights(tiny_dir: Path) -> None:
    """model_id goes into KV-cache hashes, so a changed config or weight file must change it."""
    first = resolve_model(str(tiny_dir)).model_id
    assert resolve_model(str(tiny_dir)).model_id == first
    config = json.loads((tiny_dir / "config.json").read_text())
    config["rope_theta"] = 5000.0
    (tiny_dir / "config.json").write_text(json.dumps(config))
    assert resolve_model(str(tiny_dir)).model_id != first


def test_model_id_names_the_weights_not_the_directory(tmp_path: Path, smollm_dir: Path) -> None:
    """Two checkpoints of one shape in directories of one name (a/final, b/final), or one
    rewritten in place with same-sized weights, get different ids: sharing one would load
    one model's KV from a tier as the other's. A copy of the same weights shares the id."""
    first = write_tiny_model_dir(tmp_path / "a" / "final", smollm_dir)
    copy = write_tiny_model_dir(tmp_path / "c" / "final", smollm_dir)
    other = write_tiny_model_dir(tmp_path / "b" / "final", smollm_dir)
    weights = dict(resolve_model("random:tiny-llama", seed=4).iter_weights(CPU, torch.float32))
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert (other / "model.safetensors").stat().st_size == (
        first / "model.safetensors").stat().st_size
    first_id = resolve_model(str(first)).model_id
    assert resolve_model(str(copy)).model_id == first_id
    assert resolve_model(str(other)).model_id != first_id
    save_file(weights, str(first / "model.safetensors"), metadata={"format": "pt"})
    assert resolve_model(str(first)).model_id != first_id


@pytest.mark.parametrize("name", sorted(REAL_PARAMETER_COUNTS))
def test_random_architectures_have_the_real_models_shapes(name: str) -> None:
    """Parameter counts equal the published ones, so memory and KV sizing are realistic."""
    spec = ARCHITECTURES[name].spec
    shapes = expected_weight_shapes(spec)
    assert sum(math.prod(s) for s in shapes.values()) == REAL_PARAMETER_COUNTS[name]
    assert spec.num_parameters == REAL_PARAMETER_COUNTS[name]
    assert ("lm_head.weight" in shapes) == (not spec.tie_word_embeddings)


def test_the_parameter_count_is_the_checkpoints_with_attention_biases() -> None:
    """A Llama with attention_bias has an o_proj bias too (before, num_parameters left it
    out and disagreed with the weights the checkpoint must hold)."""
    spec = ModelSpec.from_hf_config({**TINY_CONFIG, "attention_bias": True})
    shapes = expected_weight_shapes(spec)
    assert "model.layers.0.self_attn.o_proj.bias" in shapes
    assert spec.num_parameters == sum(math.prod(s) for s in shapes.values())


def test_qwen3_has_per_head_q_and_k_norms_and_its_own_head_dim() -> None:
    """random:qwen3-0.6b is Qwen3-0.6B's shape: 16 heads of 128 in a 1,024-wide model, one
    q_norm and one k_norm of head_dim per layer, no biases, tied logits, 40,960 positions.
    Only the Qwen3 shapes have q/k norms."""
    spec = ARCHITECTURES["qwen3-0.6b"].spec
    assert spec.qk_norm and spec.head_dim == 128 != spec.hidden_size // spec.num_attention_heads
    shapes = expected_weight_shapes(spec)
    for layer in (0, 27):
        for norm in ("q_norm", "k_norm"):
            assert shapes[f"model.layers.{layer}.self_attn.{norm}.weight"] == (128,)
    assert not any(name.endswith(".bias") for name in shapes)
    assert spec.tie_word_embeddings and spec.max_context_len == 40960
    assert spec.eos_token_ids == (151645,) and spec.rms_norm_eps == 1e-6
    assert {name for name, arch in ARCHITECTURES.items() if arch.spec.qk_norm} == {
        "qwen3-0.6b", "tiny-qwen3"}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_a_spec_round_trips_through_its_hf_config(name: str) -> None:
    """to_hf_config writes what from_hf_config reads back: the same spec, q/k norms (Qwen3's,
    named by its architecture and model_type) and other keys included."""
    spec = ARCHITECTURES[name].spec
    config = spec.to_hf_config()
    again = ModelSpec.from_hf_config(config)
    assert again == spec and again.extra == spec.extra and again.qk_norm == spec.qk_norm
    assert (config["architectures"] == ["Qwen3ForCausalLM"]) == spec.qk_norm


def test_qwen25_15b_config_is_the_real_one() -> None:
    """random:qwen2.5-1.5b carries Qwen2.5-1.5B-Instruct's config.json values exactly."""
    real = json.loads(QWEN_REFERENCE_CONFIG.read_text())
    real.pop("transformers_version")
    assert dict(ARCHITECTURES["qwen2.5-1.5b"].config) == real


def test_llama31_8b_has_llama3_rope_scaling() -> None:
    spec = ARCHITECTURES["llama-3.1-8b"].spec
    assert spec.rope_scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert (spec.rope_theta, spec.max_position_embeddings) == (500000.0, 131072)
    assert spec.eos_token_ids == (128001, 128008, 128009)


def test_random_weights_are_seeded_per_tensor_and_initialised_like_hf() -> None:
    """Same seed -> same values; another seed -> other values; norms are ones, biases zeros,
    matrices N(0, 0.02); shapes and names as the architecture requires."""
    source = resolve_model("random:tiny-qwen2", seed=7)
    assert source.path is None and source.name == "random:tiny-qwen2"
    first = dict(source.iter_weights(CPU, torch.float32))
    again = dict(source.iter_weights(CPU, torch.float32))
    other = dict(replace(source, seed=8).iter_weights(CPU, torch.float32))
    assert {n: tuple(t.shape) for n, t in first.items()} == expected_weight_shapes(source.spec)
    assert all(torch.equal(first[n], again[n]) for n in first)
    embed = first["model.embed_tokens.weight"]
    assert not torch.equal(embed, other["model.embed_tokens.weight"])
    assert abs(embed.std().item() - 0.02) < 0.001
    assert torch.equal(first["model.norm.weight"], torch.ones(64))
    assert torch.equal(first["model.layers.1.self_attn.k_proj.bias"], torch.zeros(32))
    assert resolve_model("random:tiny-llama", seed=8).model_id != resolve_model(
        "random:tiny-llama", seed=7).model_id
    half = dict(source.iter_weights(CPU, torch.float16))
    assert torch.equal(half["lm_head.weight"], first["lm_head.weight"].half())
    qwen3 = dict(resolve_model("random:tiny-qwen3", seed=7).iter_weights(CPU, torch.float32))
    assert torch.equal(qwen3["model.layers.1.self_attn.q_norm.weight"], torch.ones(32))
    assert torch.equal(qwen3["model.layers.1.self_attn.k_norm.weight"], torch.ones(32))


def test_a_qwen3_checkpoint_without_a_q_norm_weight_is_refused(tmp_path: Path,
                                                                qwen_dir: Path) -> None:
    """At resolve, naming the weight; and by the model's own check of what it was given."""
    directory = write_tiny_model_dir(tmp_path / "qwen3", qwen_dir, architecture="tiny-qwen3")
    weights = load_file(directory / "model.safetensors")
    del weights["model.layers.1.self_attn.q_norm.weight"]
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError,
                       match="weight model.layers.1.self_attn.q_norm.weight is missing"):
        resolve_model(str(directory))
    model = LlamaForCausalLM(ARCHITECTURES["tiny-qwen3"].spec, TorchAttentionBackend())
    with pytest.raises(ModelLoadError, match=(
            "1 weights missing from the checkpoint, e.g. "
            "\\['layers.1.self_attn.q_norm.weight:None'\\]")):
        model.load_weights(weights.items())


def test_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("KVTIER_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "kvtier"


# -- errors ---------------------------------------------------------------------------------------

def test_missing_path_and_unknown_architecture_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="unknown architecture 'gpt-5'.*qwen2.5-1.5b"):
        resolve_model("random:gpt-5")
    with pytest.raises(ModelLoadError, match="model '' is empty"):
        resolve_model("")  # before: the current directory, "not a model directory"
    with pytest.raises(ModelLoadError, match="~no-such-user-kvtier/m: no such file"):
        resolve_model("~no-such-user-kvtier/m")  # before: RuntimeError from expanduser
    text_file = tmp_path / "weights.txt"
    text_file.write_text("hello")
    with pytest.raises(ModelLoadError, match="expected an HF model directory or a .gguf"):
        resolve_model(str(text_file))


def test_directory_without_config_weights_or_tokenizer_is_rejected(tiny_dir: Path) -> None:
    (tiny_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        resolve_model(str(tiny_dir))
    (tiny_dir / "model.safetensors").rename(tiny_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors.*pytorch_model.bin"):
        resolve_model(str(tiny_dir))
    (tiny_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tiny_dir))


def test_unsupported_model_type_and_wrong_shapes_are_rejected(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not supported"):
        resolve_model(str(tiny_dir))
    (tiny_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ModelLoadError, match="gate_proj.weight has shape"):
        resolve_model(str(tiny_dir))
    (tiny_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="model.layers.2.* is missing"):
        resolve_model(str(tiny_dir))


TINY_CONFIG = dict(ARCHITECTURES["tiny-llama"].config)


@pytest.mark.parametrize(("edit", "message"), [
    ([1, 2], "config.json: expected a JSON object, got list"),
    (None, "config.json: expected a JSON object, got NoneType"),
    ({"hidden_size": None}, "config.json: hidden_size is missing"),
    ({"num_hidden_layers": None}, "config.json: num_hidden_layers is missing"),
    ({"hidden_size": "abc"}, "config.json: hidden_size must be an integer, got 'abc'"),
    ({"hidden_size": 64.5}, "config.json: hidden_size must be an integer, got 64.5"),
    ({"hidden_size": -64}, "config.json: hidden_size must be a positive integer, got -64"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"num_attention_heads": 3},
     "hidden_size 64 is not a multiple of num_attention_heads 3, and there is no head_dim"),
    ({"num_key_value_heads": 3},
     "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"head_dim": 15}, "head_dim must be even, got 15"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a number, got 'tiny'"),
    ({"rope_scaling": "linear"}, "rope_scaling must be an object or null, got 'linear'"),
    ({"rope_parameters": [1]}, "rope_parameters must be an object, got \\[1\\]"),
    ({"eos_token_id": "</s>"}, "eos_token_id must be a token id or a list of them"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"model_type": None},
     "model_type is missing \\(supported: llama, qwen2, qwen3, mistral\\)"),
    ({"torch_dtype": "int8"}, "config.json: torch_dtype 'int8' is not supported \\(supported: "
                              "float16, bfloat16, float32, float64, auto\\)"),
    ({"torch_dtype": None, "dtype": "bool"}, "config.json: dtype 'bool' is not supported"),
    ({"torch_dtype": "float8"}, "config.json: torch_dtype 'float8' is not supported"),
    ({"torch_dtype": 16}, "config.json: torch_dtype 16 is not supported"),
])
def test_bad_config_json_values_are_named_with_the_file(tmp_path: Path, edit: object,
                                                         message: str) -> None:
    """config.json is checked key by key before any weight is looked at: a value of the wrong
    type, a size that is not positive, or heads that do not divide raise ModelLoadError naming
    the file and the key. (Before, a list raised AttributeError, a zero layer count built a
    model without layers, 64.5 was truncated, "false" meant true, "abc" was reported
    without its key or file, and an int8 or unknown torch_dtype meant bfloat16.)"""
    config = {**TINY_CONFIG, **edit} if isinstance(edit, dict) else edit
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(("config", "declared"), [
    ({"torch_dtype": "float16"}, "float16"), ({"dtype": "bfloat16"}, "bfloat16"),
    ({"torch_dtype": "float64"}, "float64"), ({"torch_dtype": "auto"}, "auto"), ({}, "float32")])
def test_a_float_or_auto_torch_dtype_is_read(config: dict, declared: str) -> None:
    """transformers 4 writes torch_dtype, 5 dtype; without either HF's default is float32."""
    base = {k: v for k, v in TINY_CONFIG.items() if k not in ("torch_dtype", "dtype")}
    assert ModelSpec.from_hf_config({**base, **config}).torch_dtype == declared


@pytest.mark.parametrize("architectures", [["MixtralForCausalLM"], ["FooBarForCausalLM"],
                                           ["LlamaForSequenceClassification"]])
def test_an_unsupported_architecture_is_named_with_the_supported_ones(
        tmp_path: Path, architectures: list[str]) -> None:
    """As in vLLM, `architectures` decides: a Mixtral, a made-up class or a classifier whose
    model_type is llama is refused by name (before, each loaded as a causal Llama)."""
    config = {**TINY_CONFIG, "architectures": architectures}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=(
            f"config.json: model architectures \\['{architectures[0]}'\\] are not supported "
            "\\(supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
            "Qwen3ForCausalLM\\)")):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": "Llama"}))
    with pytest.raises(ModelLoadError, match="architectures must be a list"):
        resolve_model(str(tmp_path))


def test_an_activation_other_than_silu_is_refused(tmp_path: Path) -> None:
    """The MLP computes SiLU whatever config.json says; a gelu checkpoint is refused, as vLLM's
    LlamaMLP refuses it (before, it loaded and generated with the wrong activation)."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, "hidden_act": "gelu"}))
    with pytest.raises(ModelLoadError,
                       match="config.json: hidden_act 'gelu' is not supported \\(supported: silu"):
        resolve_model(str(tmp_path))


def test_an_mlp_bias_is_refused_at_resolve(tmp_path: Path) -> None:
    """The MLP here has no bias; a Llama with mlp_bias true was accepted by the resolve
    (its biases were even expected in the checkpoint) and failed only when the weights were
    copied, with "weight 'model.layers.0.mlp.down_proj.bias' does not fit this model"."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, "mlp_bias": True}))
    with pytest.raises(ModelLoadError, match="config.json: mlp_bias true is not supported"):
        resolve_model(str(tmp_path))
    assert "model.layers.0.mlp.down_proj.bias" not in expected_weight_shapes(
        ModelSpec.from_hf_config({**TINY_CONFIG, "mlp_bias": False}))


def test_attention_bias_is_read_only_where_transformers_reads_it() -> None:
    """transformers' Qwen2 always has q/k/v biases and Mistral never has any, whatever
    config.json says; Llama and Qwen3 read attention_bias. Before, a Qwen2 config stating
    attention_bias false dropped the checkpoint's biases without a word (wrong logits), and
    a Mistral one stating true asked for biases its checkpoint does not have."""
    qwen = json.loads(QWEN_REFERENCE_CONFIG.read_text())
    assert ModelSpec.from_hf_config({**qwen, "attention_bias": False}).attention_bias
    mistral = {**TINY_CONFIG, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
               "attention_bias": True}
    assert not ModelSpec.from_hf_config(mistral).attention_bias
    assert ModelSpec.from_hf_config({**TINY_CONFIG, "attention_bias": True}).attention_bias
    # Qwen3 reads it, for q/k/v and o_proj alike (Qwen3-0.6B's is false).
    qwen3 = dict(ARCHITECTURES["qwen3-0.6b"].config)
    assert not ModelSpec.from_hf_config(qwen3).attention_bias
    biased = ModelSpec.from_hf_config({**qwen3, "attention_bias": True})
    assert {n.rsplit(".", 2)[1] for n in expected_weight_shapes(biased) if n.endswith(".bias")} == {
        "q_proj", "k_proj", "v_proj", "o_proj"}
    assert biased.num_parameters == sum(math.prod(s)
                                        for s in expected_weight_shapes(biased).values())


def test_qwen3_slides_its_window_only_where_use_sliding_window_says_so() -> None:
    """As Qwen2: Qwen3's configs carry use_sliding_window false (sliding_window null or a
    number, unused); on, the layers from max_window_layers on slide."""
    qwen3 = dict(ARCHITECTURES["qwen3-0.6b"].config)
    assert ModelSpec.from_hf_config({**qwen3, "sliding_window": 4096}).sliding_window is None
    on = {**qwen3, "use_sliding_window": True, "sliding_window": 4096}
    assert ModelSpec.from_hf_config({**on, "max_window_layers": 20}).max_context_len == 4096
    assert ModelSpec.from_hf_config({**on, "max_window_layers": 28}).sliding_window is None


@pytest.mark.parametrize(("rope_scaling", "message"), [
    ({"rope_type": "yarn", "factor": 4.0},
     "rope_scaling type 'yarn' is not supported \\(supported: llama3, or none\\)"),
    ({"rope_type": "llama3"}, "rope_scaling's factor must be a positive number, got None"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
     "rope_scaling.s low_freq_factor 4.0 must be below its high_freq_factor 4.0"),
])
def test_unsupported_or_incomplete_rope_scaling_is_named_at_resolve(
        tmp_path: Path, rope_scaling: dict, message: str) -> None:
    """Before, yarn was refused only when the model was built, without the file, and a llama3
    scaling without its factor raised KeyError('factor') from the rotary table."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG,
                                                      "rope_scaling": rope_scaling}))
    with pytest.raises(ModelLoadError, match="config.json: " + message):
        resolve_model(str(tmp_path))


def test_a_sliding_window_caps_the_context(tiny_dir: Path) -> None:
    """Attention here always sees the whole context, which is Mistral's sliding-window
    attention only while the context fits the window: a longer max_model_len is refused naming
    the window, and the default is the window (as vLLM's --disable-sliding-window does).
    Before, Mistral-7B-v0.1 (window 4096 of 32768 positions) ran past its window, silently
    computing other attention than the model's."""
    from kvtier import LLM
    from kvtier.config import ConfigError
    config = json.loads((tiny_dir / "config.json").read_text())
    mistral = {**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
               "sliding_window": 64}
    (tiny_dir / "config.json").write_text(json.dumps(mistral))
    assert resolve_model(str(tiny_dir)).spec.max_context_len == 64
    with pytest.raises(ConfigError, match="max_model_len 256 is more than the model's "
                                          "sliding_window 64 \\(sliding-window attention"):
        LLM(str(tiny_dir), max_model_len=256, device="cpu", num_gpu_blocks_override=64)
    with LLM(str(tiny_dir), device="cpu", num_gpu_blocks_override=64) as llm:
        assert llm.engine.max_model_len == 64
    qwen = json.loads(QWEN_REFERENCE_CONFIG.read_text())  # sliding_window 32768, but off
    spec = ModelSpec.from_hf_config(qwen)
    assert spec.sliding_window is None and spec.max_context_len == 32768
    on = {**qwen, "use_sliding_window": True, "sliding_window": 4096}
    assert ModelSpec.from_hf_config(on).max_context_len == 4096
    # Qwen2 slides only from layer max_window_layers on: none of 28 layers at 28.
    assert ModelSpec.from_hf_config({**on, "max_window_layers": 28}).sliding_window is None
    full = {**on, "layer_types": ["full_attention"] * 28}  # as transformers 5 writes them
    assert ModelSpec.from_hf_config(full).sliding_window is None
    assert ModelSpec.from_hf_config({**mistral, "sliding_window": None}).sliding_window is None


def test_truncated_and_corrupt_safetensors_are_detected_at_resolve(tiny_dir: Path) -> None:
    """A download cut short, a garbage header, or a file too short for its header all fail
    when resolving, before any tensor is read."""
    weights = tiny_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1000])
    with pytest.raises(ModelLoadError, match="truncated safetensors file"):
        resolve_model(str(tiny_dir))
    weights.write_bytes(struct.pack("<Q", 20) + b"{this is not json!!}" + data[28:])
    with pytest.raises(ModelLoadError, match="corrupt safetensors header"):
        resolve_model(str(tiny_dir))
    weights.write_bytes(data[:5])
    with pytest.raises(ModelLoadError, match="truncated"):
        resolve_model(str(tiny_dir))


def _rewrite_header(weights: Path, header: object) -> None:
    data = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    encoded = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + header_len:])


def test_malformed_safetensors_header_entries_are_named(tiny_dir: Path) -> None:
    """A header that is JSON but not safetensors' shape (a list, an entry without
    data_offsets, an entry that is a number) fails at resolve naming the file and tensor;
    before, these raised TypeError and KeyError from the size check."""
    weights = tiny_dir / "model.safetensors"
    data = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    _rewrite_header(weights, [1, 2])
    with pytest.raises(ModelLoadError, match="corrupt safetensors header: not a JSON object"):
        resolve_model(str(tiny_dir))
    without_offsets = {"dtype": "F32", "shape": [64]}
    for entry in (without_offsets, 5, {**header["model.norm.weight"], "shape": "64"}):
        weights.write_bytes(data)
        _rewrite_header(weights, {**header, "model.norm.weight": entry})
        with pytest.raises(ModelLoadError, match="model.safetensors: corrupt safetensors header: "
                                                 "tensor 'model.norm.weight' needs a dtype"):
            resolve_model(str(tiny_dir))


UP_PROJ = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize(("dtype", "name"), [(torch.float8_e4m3fn, "F8_E4M3"),
                                             (torch.int64, "I64"), (torch.bool, "BOOL"),
                                             (None, "X9")])
def test_a_weight_of_a_dtype_kvtier_cannot_load_is_named_at_resolve(
        tiny_dir: Path, dtype: torch.dtype | None, name: str) -> None:
    """Before, FP8, integer and bool weights were cast to floats without a word (an FP8
    checkpoint without its scales, a bool mask as 0/1), and a dtype safetensors does not know
    failed only while streaming, with its list of twenty-odd variants."""
    weights_file = tiny_dir / "model.safetensors"
    weights = load_file(weights_file)
    if dtype is not None:
        weights[UP_PROJ] = weights[UP_PROJ].to(dtype)
        save_file(weights, str(weights_file), metadata={"format": "pt"})
    else:
        data = weights_file.read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
        _rewrite_header(weights_file, {**header, UP_PROJ: {**header[UP_PROJ], "dtype": name}})
    with pytest.raises(ModelLoadError, match=(
            f"model.safetensors: tensor '{UP_PROJ}' has dtype {name}, which kvtier cannot load "
            "\\(supported: BF16, F16, F32, F64\\)")):
        resolve_model(str(tiny_dir))


def test_float64_weights_load_and_unused_integer_tensors_are_skipped(tiny_dir: Path) -> None:
    """F64 casts to the model's dtype as it is; a tensor the model does not use (an int64
    buffer some exporters keep) may have any dtype."""
    weights_file = tiny_dir / "model.safetensors"
    weights = load_file(weights_file)
    expected = weights[UP_PROJ].clone()
    weights[UP_PROJ] = weights[UP_PROJ].double()
    weights["model.position_ids"] = torch.arange(8)
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    loaded = dict(resolve_model(str(tiny_dir)).iter_weights(CPU, torch.float32))
    assert "model.position_ids" not in loaded
    assert torch.equal(loaded[UP_PROJ], expected)


@pytest.mark.parametrize("weight_map", [[1], {"model.norm.weight": 1}, {}])
def test_an_index_whose_weight_map_is_malformed_is_named(tmp_path: Path, smollm_dir: Path,
                                                         weight_map: object) -> None:
    """Before: AttributeError (a list), TypeError (a number for a file name) and IndexError
    (an empty map) from deep in the loader."""
    directory = write_tiny_model_dir(tmp_path / "sharded", smollm_dir, num_shards=2)
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match="index.json: not a valid safetensors index: "
                                             "weight_map must map tensor names to shard"):
        resolve_model(str(directory))


def test_unreadable_tensor_data_fails_while_streaming_weights(tiny_dir: Path) -> None:
    """A header whose offsets are inconsistent passes the size check but fails in
    iter_weights with the file named."""
    weights = tiny_dir / "model.safetensors"
    data = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    name = "model.norm.weight"
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end - 4]  # 255 floats' bytes for 256 floats
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    weights.write_bytes(data[:8] + encoded + data[8 + header_len:])
    source = resolve_model(str(tiny_dir))
    with pytest.raises(ModelLoadError, match="model.safetensors: cannot read weights"):
        dict(source.iter_weights(CPU, torch.float32))


def test_index_naming_a_missing_shard_is_rejected(tmp_path: Path, smollm_dir: Path) -> None:
    directory = write_tiny_model_dir(tmp_path / "sharded", smollm_dir, num_shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing: model-00002-of-00002.safetensors"):
        resolve_model(str(directory))


def test_corrupt_gguf_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "broken-Q4_0.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="broken-Q4_0.gguf: corrupt or truncated GGUF"):
        resolve_model(str(bad))
    assert not list((cache_dir() / "gguf").glob("broken*"))
