"""The shape of a decoder model (Llama family, with the switches Qwen2 needs), read from HF config.

`ModelSpec` is what the model, the runner (KV layout) and the KV-size arithmetic need; it is built
from a Hugging Face `config.json` dict and can be written back as one (so a converted or random
model is an ordinary HF directory that transformers can load too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


class ModelLoadError(ValueError):
    """A model cannot be loaded; the message names the path or value at fault."""


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    """HF model_type: llama, qwen2 or mistral."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    """q/k/v projections carry a bias (Qwen2)."""
    rope_scaling: dict[str, Any] | None = None
    """Llama-3 style frequency scaling ({"rope_type": "llama3", ...}) or None."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    """The dtype the checkpoint declares (used by --dtype auto on CUDA)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Other config.json keys, kept so to_hf_config round-trips."""

    @staticmethod
    def from_hf_config(config: dict[str, Any]) -> ModelSpec:
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        try:
            num_heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            eos = config.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            # transformers 5 folds rope_theta and rope_scaling into `rope_parameters`.
            rope_parameters = config.get("rope_parameters") or {}
            rope_theta = config.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))
            rope_scaling = config.get("rope_scaling") or rope_parameters or None
            if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
                    "default", None):
                rope_scaling = None
            return ModelSpec(
                model_type=model_type,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=num_heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or num_heads),
                head_dim=int(config.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
                rope_scaling=rope_scaling,
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
                extra={k: v for k, v in config.items() if k not in _OWN_KEYS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json is missing or has a bad value: {exc}") from exc

    def to_hf_config(self) -> dict[str, Any]:
        architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                        "mistral": "MistralForCausalLM"}[self.model_type]
        config: dict[str, Any] = dict(self.extra)
        config.update({
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) != 1
                             else self.eos_token_ids[0]),
        })
        if self.model_type != "qwen2":
            config["attention_bias"] = self.attention_bias
        if self.rope_scaling:
            config["rope_scaling"] = dict(self.rope_scaling)
        return config

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    @property
    def num_parameters(self) -> int:
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + h


_OWN_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "rope_theta", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
    "rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id", "torch_dtype", "dtype",
    "hidden_act",
}
