"""GGUF -> HF conversion, cross-checked against transformers' own GGUF support."""

from __future__ import annotations

import functools
import json
import os
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from kvtier.model import gguf_convert
from kvtier.model.gguf_convert import ensure_converted, unpermute_rotary_rows
from kvtier.model.spec import ModelLoadError
from kvtier.model.tokenizer import Tokenizer
from tests.unit.model.test_tokenizer import TEXTS


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF order -> GGUF order)."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def test_weights_equal_transformers_gguf_loader(smollm_dir: Path, gguf_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor we write (names, shapes, float32 values, Q/K un-permuted) is bit-identical
    to what transformers' load_gguf_checkpoint produces for the same GGUF, and nothing is
    missing or extra."""
    # transformers rebuilds gguf's name table once per submodule (~15 s); memoise it.
    monkeypatch.setattr(gguf, "get_tensor_name_map",
                        functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(smollm_dir)))
    expected = load_gguf_checkpoint(str(gguf_path), return_tensors=True,
                                    model_to_load=model)["tensors"]
    ours = load_file(str(smollm_dir / "model.safetensors"))
    assert sorted(ours) == sorted(expected)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name


def test_config_matches_gguf_metadata_and_ties_embeddings(smollm_dir: Path) -> None:
    """config.json carries SmolLM2-135M's shape; no output.weight means tied embeddings."""
    config = json.loads((smollm_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["vocab_size"]) == (30, 576, 1536, 9, 3, 64, 49152)
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "lm_head.weight" not in load_file(str(smollm_dir / "model.safetensors"))


def test_unpermute_inverts_llama_cpp_rotary_permutation() -> None:
    """unpermute(permute(W)) == W for q (all heads) and k (fewer KV heads), weights and biases."""
    rng = np.random.default_rng(0)
    for heads, head_dim in ((9, 64), (3, 64), (4, 8)):
        weight = rng.standard_normal((heads * head_dim, 5)).astype(np.float32)
        assert np.array_equal(unpermute_rotary_rows(_llama_cpp_permute(weight, heads), heads),
                              weight)
        bias = rng.standard_normal(heads * head_dim).astype(np.float32)
        assert np.array_equal(unpermute_rotary_rows(_llama_cpp_permute(bias, heads), heads), bias)


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(gguf_path: Path):
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_tokenizer_ids_equal_transformers_gguf_tokenizer(smollm_tokenizer: Tokenizer,
                                                         hf_gguf_tokenizer) -> None:
    """On code, unicode, digits and chat markup our converted tokenizer gives transformers'
    GGUF tokenizer's ids and text, and the same special tokens and chat template."""
    comparable = [t for t in TEXTS if not _splits_numbers_differently(t)]
    assert len(comparable) >= 10
    for text in comparable + ["x**2 + 3.14 = 12345", "<|im_start|>user\n1 2 3<|im_end|>"]:
        assert smollm_tokenizer.encode(text) == hf_gguf_tokenizer.encode(text), text
        ids = smollm_tokenizer.encode(text)
        assert smollm_tokenizer.decode(ids, skip_special_tokens=False) == hf_gguf_tokenizer.decode(
            ids)
    assert smollm_tokenizer.vocab_size == len(hf_gguf_tokenizer)
    assert (smollm_tokenizer.bos_token_id, smollm_tokenizer.eos_token_id) == (
        hf_gguf_tokenizer.bos_token_id, hf_gguf_tokenizer.eos_token_id)
    assert smollm_tokenizer.chat_template == hf_gguf_tokenizer.chat_template
    assert smollm_tokenizer.special_token_ids == set(range(17))


def _splits_numbers_differently(text: str) -> bool:
    """Where the "smollm" digit split changes ids: a number (\\p{N}) after two whitespace
    characters, or a non-ASCII number (½, ², ...) after one."""
    for i in range(1, len(text)):
        after_space = text[i - 1].isspace() and unicodedata.category(text[i]).startswith("N")
        if after_space and (not text[i].isascii() or (i >= 2 and text[i - 2].isspace())):
            return True
    return False


def test_whitespace_before_digits_follows_llama_cpp_smollm_split(
        smollm_tokenizer: Tokenizer, hf_gguf_tokenizer) -> None:
    """Known divergence: transformers ignores tokenizer.ggml.pre == "smollm" (every \\p{N}
    split off first, as llama.cpp and SmolLM2's own tokenizer.json do), so the space before a
    number sticks to it: "a  12" -> a,Ġ,Ġ,1,2 and "a ½" -> a,ĠÂ,½ there; llama.cpp and we
    give a,ĠĠ,1,2 and a,Ġ,Â½."""
    cases = {"a  12": ["a", "ĠĠ", "1", "2"], "a ½": ["a", "Ġ", "Â½"]}
    theirs = {"a  12": ["a", "Ġ", "Ġ", "1", "2"], "a ½": ["a", "ĠÂ", "½"]}
    for text, tokens in cases.items():
        assert smollm_tokenizer.convert_ids_to_tokens(smollm_tokenizer.encode(text)) == tokens
        assert hf_gguf_tokenizer.convert_ids_to_tokens(hf_gguf_tokenizer.encode(text)) == (
            theirs[text])


def test_second_conversion_reuses_the_cache_without_rewriting(smollm_dir: Path,
                                                              gguf_path: Path,
                                                              model_cache_dir: Path) -> None:
    """ensure_converted on an already-converted GGUF returns the same directory in well under
    a second and leaves the files untouched."""
    weights = smollm_dir / "model.safetensors"
    before = weights.stat()
    started = time.perf_counter()
    again = ensure_converted(gguf_path, model_cache_dir)
    assert time.perf_counter() - started < 1.0
    after = weights.stat()
    assert again == smollm_dir
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_crash_during_conversion_leaves_no_cache_entry(gguf_path: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry appears only by an atomic rename: a failure midway leaves neither the
    target directory nor a temporary one behind, so the next run converts again."""
    def crash(path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(gguf_convert, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_converted(gguf_path, tmp_path)
    assert os.listdir(tmp_path / "gguf") == []


def _write_small_gguf(path: Path) -> None:
    """A valid two-tensor GGUF, small enough to parse in milliseconds."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_foreign_and_truncated_gguf_files_raise_model_load_error(tmp_path: Path) -> None:
    """A file that is not GGUF, a GGUF cut inside its tensor data, and one cut inside its
    header each fail with a message naming the file."""
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelLoadError, match="foreign.gguf: not a GGUF file"):
        gguf_convert.open_gguf(foreign)
    whole = tmp_path / "whole.gguf"
    _write_small_gguf(whole)
    assert len(gguf_convert.open_gguf(whole).tensors) == 2
    data = whole.read_bytes()
    cut_data = tmp_path / "cut-data.gguf"
    cut_data.write_bytes(data[:-24])  # the last 16 bytes are alignment padding
    with pytest.raises(ModelLoadError, match="cut-data.gguf: .*truncated"):
        gguf_convert.open_gguf(cut_data)
    cut_header = tmp_path / "cut-header.gguf"
    cut_header.write_bytes(data[:40])
    with pytest.raises(ModelLoadError, match="cut-header.gguf: corrupt or truncated"):
        gguf_convert.open_gguf(cut_header)


def test_unknown_tensor_names_are_rejected() -> None:
    assert gguf_convert.hf_tensor_name("blk.3.attn_q.weight") == (
        "model.layers.3.self_attn.q_proj.weight")
    assert gguf_convert.hf_tensor_name("rope_freqs.weight") is None
    with pytest.raises(ModelLoadError, match="no known HF name"):
        gguf_convert.hf_tensor_name("blk.0.ffn_gate_exps.weight")


def _write_tiny_llama_gguf(path: Path, skip: tuple[str, ...] = (),
                           extra_tensors: tuple[str, ...] = (),
                           metadata: dict[str, int | float | str] | None = None,
                           tensor_types: dict[str, gguf.GGMLQuantizationType] | None = None,
                           arrays: dict[str, np.ndarray] | None = None) -> Path:
    """A complete one-layer llama GGUF (64 wide, 4 heads, 2 KV heads, 260 byte-level ids)
    that converts in milliseconds; `skip` leaves tensors out, `metadata` overrides keys,
    `tensor_types` stores tensors as zero bytes of another type than F32, `arrays` adds
    tensors with the given values."""
    writer = gguf.GGUFWriter(str(path), "llama")
    values: dict[str, int | float | str] = {
        "llama.block_count": 1, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.context_length": 256, **(metadata or {})}
    for key, value in values.items():
        add = (writer.add_string if isinstance(value, str)
               else writer.add_float32 if isinstance(value, float) else writer.add_uint32)
        add(key, value)
    writer.add_tokenizer_model("gpt2")
    alphabet = gguf_convert.byte_level_alphabet()
    writer.add_token_list([alphabet[b] for b in range(256)] + ["<s>", "</s>", "ab", "cd"])
    writer.add_token_merges(["a b", "c d"])
    writer.add_token_types([1] * 256 + [3, 3, 1, 1])
    writer.add_eos_token_id(257)
    shapes = {"token_embd.weight": (260, 64), "output_norm.weight": (64,),
              "blk.0.attn_norm.weight": (64,), "blk.0.ffn_norm.weight": (64,),
              "blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (32, 64),
              "blk.0.attn_v.weight": (32, 64), "blk.0.attn_output.weight": (64, 64),
              "blk.0.ffn_gate.weight": (128, 64), "blk.0.ffn_up.weight": (128, 64),
              "blk.0.ffn_down.weight": (64, 128), **{name: (4, 64) for name in extra_tensors}}
    for name, shape in shapes.items():
        if name in (tensor_types or {}):
            qtype = tensor_types[name]
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            row_bytes = shape[-1] // block_size * type_size
            writer.add_tensor(name, np.zeros((*shape[:-1], row_bytes), dtype=np.uint8),
                              raw_dtype=qtype)
        elif name not in skip:
            writer.add_tensor(name, np.full(shape, 0.01, dtype=np.float32))
    for name, array in (arrays or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_missing_a_tensor_is_named_and_leaves_no_cache_entry(tmp_path: Path) -> None:
    """Checked while converting: the message names the GGUF (before, the converted copy in the
    cache, which stayed there, broken)."""
    assert (ensure_converted(_write_tiny_llama_gguf(tmp_path / "whole.gguf"), tmp_path / "c")
            / "model.safetensors").is_file()
    gguf_file = _write_tiny_llama_gguf(tmp_path / "holed.gguf", skip=("blk.0.ffn_up.weight",))
    with pytest.raises(ModelLoadError, match="holed.gguf: the GGUF has no tensor for "
                                             "model.layers.0.mlp.up_proj.weight"):
        ensure_converted(gguf_file, tmp_path / "c")
    assert [p.name.split("-")[0] for p in (tmp_path / "c" / "gguf").iterdir()] == ["whole"]


def test_a_mixture_of_experts_gguf_and_unknown_tensors_are_named(tmp_path: Path) -> None:
    """llama.cpp writes Mixtral as general.architecture = llama with experts: refused by what
    it is, naming the file (before: "GGUF tensor 'blk.0.ffn_gate_exps.weight' has no known HF
    name", without the file)."""
    moe = _write_tiny_llama_gguf(tmp_path / "moe.gguf", metadata={"llama.expert_count": 8},
                                 extra_tensors=("blk.0.ffn_gate_exps.weight",))
    with pytest.raises(ModelLoadError, match="moe.gguf: a mixture-of-experts GGUF "
                                             "\\(llama.expert_count = 8\\) is not supported"):
        ensure_converted(moe, tmp_path / "c")
    odd = _write_tiny_llama_gguf(tmp_path / "odd.gguf",
                                 extra_tensors=("blk.0.ffn_gate_exps.weight",))
    with pytest.raises(ModelLoadError, match="odd.gguf: GGUF tensor 'blk.0.ffn_gate_exps.weight' "
                                             "has no known HF name"):
        ensure_converted(odd, tmp_path / "c")


def test_a_qwen3_gguf_is_refused_naming_its_architecture(tmp_path: Path) -> None:
    """Qwen3 loads from an HF directory, not from a GGUF: the converter (llama only) refuses
    llama.cpp's qwen3 architecture by name, before reading a tensor or leaving a cache
    entry (its per-head blk.N.attn_q_norm tensors have no mapping here)."""
    path = tmp_path / "Qwen3-0.6B-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q_norm.weight", np.ones(2, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="Qwen3-0.6B-Q8_0.gguf: GGUF architecture 'qwen3' "
                                             "is not supported \\(supported: llama\\)"):
        ensure_converted(path, tmp_path / "c")
    assert list((tmp_path / "c" / "gguf").iterdir()) == []


@pytest.mark.parametrize("qtype", ["I32", "F64", "Q8_1"])
def test_a_tensor_type_gguf_cannot_dequantise_is_named_and_leaves_no_cache_entry(
        tmp_path: Path, qtype: str) -> None:
    """Checked before any tensor is dequantised, with the types that can be (before: gguf's
    "Dequantization for Q8_1 is not yet implemented", once the tensors before it were
    dequantised)."""
    bad = _write_tiny_llama_gguf(tmp_path / "bad.gguf", tensor_types={
        "blk.0.ffn_up.weight": gguf.GGMLQuantizationType[qtype]})
    with pytest.raises(ModelLoadError, match=(
            f"bad.gguf: tensor 'blk.0.ffn_up.weight' has type {qtype}, which kvtier cannot "
            "dequantise \\(supported: F32, F16, Q4_0, .*Q8_0, .*BF16")):
        ensure_converted(bad, tmp_path / "c")
    assert list((tmp_path / "c" / "gguf").iterdir()) == []


@pytest.mark.parametrize(("metadata", "message"), [
    ({"llama.attention.head_count": 0},
     "GGUF metadata: num_attention_heads must be a positive integer, got 0"),
    ({"llama.attention.head_count_kv": 3},
     "GGUF metadata: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"llama.block_count": "two"}, "GGUF metadata has a value of the wrong type"),
])
def test_gguf_metadata_out_of_range_or_of_the_wrong_type_is_named(
        tmp_path: Path, metadata: dict[str, int | str], message: str) -> None:
    """Before: ZeroDivisionError, a reshape error from the q/k unpermutation, and int()'s
    ValueError, none naming the file."""
    bad = _write_tiny_llama_gguf(tmp_path / "bad.gguf", metadata=metadata)
    with pytest.raises(ModelLoadError, match="bad.gguf: " + message):
        ensure_converted(bad, tmp_path / "c")


def test_an_unwritable_conversion_cache_is_named(tmp_path: Path) -> None:
    """KVTIER_CACHE_DIR naming a file (or a full or read-only disk): ModelLoadError naming the
    GGUF, the cache and the variable (before: NotADirectoryError's traceback from mkdir)."""
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    whole = _write_tiny_llama_gguf(tmp_path / "whole.gguf")
    with pytest.raises(ModelLoadError, match="whole.gguf: cannot write its conversion to "
                                             ".*a-file/gguf: .*KVTIER_CACHE_DIR"):
        ensure_converted(whole, not_a_dir)


def _hf_llama3_rope_factors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """What llama.cpp's converter stores as rope_freqs.weight for an HF Llama 3 config: each
    frequency's divisor, taken here from transformers' own llama3 rope parameters."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim,
                         rope_theta=theta, rope_scaling=dict(scaling),  # it adds keys
                         max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return (plain / scaled).numpy().astype(np.float32)


def test_a_llama3_gguf_keeps_its_rope_scaling_and_other_scalings_are_refused(
        tmp_path: Path) -> None:
    """A Llama 3.x GGUF carries its rope scaling only as the factors in rope_freqs.weight.
    Before, the converter dropped that tensor and wrote no rope_scaling, so the converted model
    rotated queries and keys unscaled (other logits than the GGUF's at every position); a
    linear or yarn scaling in the metadata was ignored the same way."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    factors = _hf_llama3_rope_factors(500000.0, 16, scaling)
    assert 1.0 < factors[4] < 8.0  # one frequency in the smoothed band, to check it too
    llama3 = _write_tiny_llama_gguf(tmp_path / "llama3.gguf",
                                    metadata={"llama.rope.freq_base": 500000.0},
                                    arrays={"rope_freqs.weight": factors})
    config = json.loads((ensure_converted(llama3, tmp_path / "c") / "config.json").read_text())
    assert config["rope_scaling"] == scaling
    odd = _write_tiny_llama_gguf(tmp_path / "odd.gguf", arrays={
        "rope_freqs.weight": np.linspace(1, 3, 8, dtype=np.float32)})
    with pytest.raises(ModelLoadError, match="odd.gguf: the GGUF's rope_freqs.weight holds "
                                             "rope frequency factors that are not Llama 3's"):
        ensure_converted(odd, tmp_path / "c")
    yarn = _write_tiny_llama_gguf(tmp_path / "yarn.gguf", metadata={
        "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(ModelLoadError, match="yarn.gguf: GGUF rope scaling 'yarn' \\(factor "
                                             "4.0\\) is not supported"):
        ensure_converted(yarn, tmp_path / "c")
    assert [p.name.split("-")[0] for p in (tmp_path / "c" / "gguf").iterdir()] == ["llama3"]


def test_what_a_killed_conversion_left_is_removed_by_the_next_one(tmp_path: Path) -> None:
    """A converter killed mid-write (SIGKILL, the OOM killer: its `finally` never runs) left
    its temporary directory, as large as the model, and nothing ever removed it; an entry
    without its config.json (half deleted) made every later conversion fail on the rename."""
    whole = _write_tiny_llama_gguf(tmp_path / "whole.gguf")
    entry = tmp_path / "c" / "gguf" / f"whole-{gguf_convert.gguf_digest(whole)}"
    left = entry.parent / f".tmp-{entry.name}-killed"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"half" * 1000)
    entry.mkdir()
    (entry / "model.safetensors").write_bytes(b"half")
    assert ensure_converted(whole, tmp_path / "c") == entry
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]
    assert (entry / "config.json").is_file()


def test_concurrent_first_conversions_of_one_gguf_convert_it_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes (here threads) starting on an unconverted GGUF: the second waits for the
    first's entry instead of converting it again (before, both did: twice the time, memory
    and disk of a conversion)."""
    whole = _write_tiny_llama_gguf(tmp_path / "whole.gguf")
    calls = []
    convert = gguf_convert.convert_gguf

    def slow_convert(path: Path, out_dir: Path) -> object:
        calls.append(path)
        time.sleep(0.3)
        return convert(path, out_dir)

    monkeypatch.setattr(gguf_convert, "convert_gguf", slow_convert)
    with ThreadPoolExecutor(2) as pool:
        entries = list(pool.map(lambda _: ensure_converted(whole, tmp_path / "c"), range(2)))
    assert entries[0] == entries[1] and (entries[0] / "config.json").is_file()
    assert len(calls) == 1
