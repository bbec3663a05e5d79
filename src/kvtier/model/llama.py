"""One decoder for the Llama family (Llama 2/3, SmolLM2, Mistral), Qwen2 (q/k/v bias) and
Qwen3 (per-head q/k norms).

Runs a flattened batch: `input_ids` and `positions` are (num_tokens,), every sequence's tokens
concatenated; attention goes through the backend given at construction, which reads and writes
the paged KV cache. Weights arrive with Hugging Face names and are fused on load
(q/k/v -> qkv_proj, gate/up -> gate_up_proj).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from kvtier.attention.base import AttentionBackend, AttentionMetadata
from kvtier.model import onednn
from kvtier.model.layers import (
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    RotaryInputs,
    apply_rotary_qk,
    invariant_linear,
    small_linear_plan,
)
from kvtier.model.spec import ModelLoadError, ModelSpec


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = spec.num_attention_heads
        self.num_kv_heads = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = Linear(spec.hidden_size, self.q_size + 2 * self.kv_size,
                               bias=spec.attention_bias)
        # Llama's and Qwen3's attention_bias cover o_proj too; Qwen2 biases q/k/v only.
        self.o_proj = Linear(self.q_size, spec.hidden_size,
                             bias=spec.attention_bias and spec.model_type != "qwen2")
        # Qwen3: an RMSNorm over each query and key head, between projection and rotary.
        self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.backend = backend

    def project(self, hidden: torch.Tensor, rotary: RotaryInputs,
                qkv_out: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (T, H, D) and keys, values (T, KVH, D): views of one fused
        projection, written into `qkv_out` (T, q_size + 2 * kv_size) when given."""
        qkv = (self.qkv_proj(hidden) if qkv_out is None
               else self.qkv_proj.forward_into(hidden, qkv_out))
        return self.split_and_rotate(qkv, rotary)

    def split_and_rotate(self, qkv: torch.Tensor, rotary: RotaryInputs,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's q, k, v as head views, q and k normalised (with q/k norms)
        and rotated (together: they are adjacent in each row)."""
        qk = qkv[:, :self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads,
                                                      self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat((_norm_heads(self.q_norm, qk[:, :self.num_heads]),
                            _norm_heads(self.k_norm, qk[:, self.num_heads:])), dim=1)
        return (*apply_rotary_qk(qk, self.num_heads, rotary), v)

    @property
    def has_qk_norm(self) -> bool:
        return self.q_norm is not None

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's q (T, H, D), k and v (T, KVH, D), as views."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (q.view(-1, self.num_heads, self.head_dim),
                k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               metadata: AttentionMetadata, out: torch.Tensor | None = None,
               kv_written: bool = False) -> torch.Tensor:
        return self.backend.forward(q, k, v, kv_cache, metadata, self.scale, out=out,
                                    kv_written=kv_written)

    def output(self, attention: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attention.reshape(-1, self.q_size))

    def forward(self, hidden: torch.Tensor, rotary: RotaryInputs, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project(hidden, rotary)
        return self.output(self.attend(q, k, v, kv_cache, metadata))


def _norm_heads(norm: RMSNorm, heads: torch.Tensor) -> torch.Tensor:
    """norm over each head of heads (T, H, D). As rows (T * H, D): the fused CUDA kernel
    takes 2-D input only."""
    return norm(heads.reshape(-1, heads.shape[-1]))[0].view(heads.shape)


FUSIONS = ("qkv", "o", "gate_up", "down", "kv_write")
"""What small CUDA batches can fuse (where `small_linear_plan` has a config for the batch):
the projections named run as `small_linear`; "kv_write": qkv's kernel also stores k and v in
the paged cache (with a backend that `accepts_written_kv`)."""
SMALL_BATCH_FUSIONS = frozenset({"qkv", "o", "down", "kv_write"})
"""The default: what measured faster than cuBLAS with the separate norm, rotary, KV-write and
SiLU kernels, on an H200 at decode batch 1-2 (`scripts/tune_small_linear.py`,
`scripts/gpu_check.py`'s decode A/B; BENCHMARKS.md, eighth, ninth and twelfth sessions).
down (the streamed kernel, taking the SiLU-and-mul) cut the batch-1 step from 1.380 to 1.287
ms; gate_up was slower in every config tried (1.37-1.53 ms). The fused KV write measured
2-3% slower at batch 1 in the eighth session; with down fused it is even there (1.2924
against 1.2930 ms, 1.3015 against 1.3024) and 3-4% faster at batch 2 (1.470 against 1.522,
1.477 against 1.535)."""


class DecoderLayer(nn.Module):
    small_batch_fusions: frozenset[str] = SMALL_BATCH_FUSIONS
    """On CUDA, batches of a few rows run these projections as `small_linear`, with their
    neighbours folded in: qkv with the residual add, norm, bias, rotary (and the KV write,
    with "kv_write"); gate_up with the residual add, norm and SiLU-and-mul; down with the
    SiLU-and-mul when gate_up did not take it. `LlamaForCausalLM.set_small_batch_fusion`
    changes it, for A/B measurements."""

    batch_invariant: bool = False
    """No `small_linear` (`LlamaForCausalLM.set_batch_invariant`)."""

    def __init__(self, spec: ModelSpec, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, backend)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rotary: RotaryInputs,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream kept apart, so each add fuses into the next norm:
        returns (mlp output, residual) whose sum is the layer's output."""
        writes_kv = (self.self_attn.backend.accepts_written_kv
                     and "kv_write" in self.small_batch_fusions
                     and self._small_linear_plan("qkv", hidden,
                                                 self.self_attn.qkv_proj.weight) is not None)
        q, k, v, residual = self.pre_attention(
            hidden, residual, rotary,
            kv_target=(kv_cache, metadata.slot_mapping) if writes_kv else None)
        attention = self.self_attn.attend(q, k, v, kv_cache, metadata, kv_written=writes_kv)
        return self.post_attention(attention, residual)

    # The two halves around attention: piecewise CUDA graphs capture them and run attention,
    # whose launches depend on the batch's composition, eagerly in between.
    def pre_attention(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                      rotary: RotaryInputs, qkv_out: torch.Tensor | None = None,
                      kv_target: tuple[torch.Tensor, torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v, residual) for this layer's attention. kv_target (kv_cache, slot_mapping):
        k and v are also stored there, by the fused projection (the caller checked that
        this batch takes it)."""
        qkv_proj = self.self_attn.qkv_proj
        plan = self._small_linear_plan("qkv", hidden, qkv_proj.weight)
        if plan is None:
            hidden, residual = self.input_layernorm(hidden, residual)
            return (*self.self_attn.project(hidden, rotary, qkv_out), residual)
        ops, config = plan
        norm, attn = self.input_layernorm, self.self_attn
        # On CUDA the rotary inputs are the float32 tables (`RotaryEmbedding.forward`).
        kv_cache, slots = kv_target if kv_target is not None else (None, None)
        epilogue = ops.QKVEpilogue(rotary.positions, rotary.cos, rotary.sin, attn.q_size,
                                   attn.kv_size, attn.head_dim, kv_cache, slots)
        qkv, summed = ops.small_linear(hidden, qkv_proj.weight, qkv_proj.bias,
                                       norm_weight=norm.weight, eps=norm.eps, residual=residual,
                                       qkv=epilogue, out=qkv_out, config=config)
        return *attn.split_heads(qkv), hidden if summed is None else summed

    def post_attention(self, attention: torch.Tensor,
                       residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = attention.reshape(-1, self.self_attn.q_size)
        o_proj = self.self_attn.o_proj
        plan = self._small_linear_plan("o", attention, o_proj.weight)
        if plan is None:
            hidden = o_proj(attention)
        else:
            ops, config = plan
            hidden = ops.small_linear(attention, o_proj.weight, o_proj.bias, config=config)[0]
        return self._mlp(hidden, residual)

    def _mlp(self, hidden: torch.Tensor,
             residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp(norm(hidden + residual)), hidden + residual)."""
        mlp, norm = self.mlp, self.post_attention_layernorm
        plan = self._small_linear_plan("gate_up", hidden, mlp.gate_up_proj.weight)
        if plan is None:
            hidden, residual = norm(hidden, residual)
            gate_up, activated = mlp.gate_up_proj(hidden), False
        else:
            ops, config = plan
            gate_up, summed = ops.small_linear(hidden, mlp.gate_up_proj.weight,
                                               norm_weight=norm.weight, eps=norm.eps,
                                               residual=residual, gated=True, config=config)
            assert summed is not None
            residual, activated = summed, True
        plan = self._small_linear_plan("down", hidden, mlp.down_proj.weight)
        if plan is None:
            activation = gate_up if activated else mlp.activation(gate_up)
            return mlp.down_proj(activation), residual
        ops, config = plan  # the SiLU-and-mul, when not done yet, as down reads its input
        return ops.small_linear(gate_up, mlp.down_proj.weight, gated_input=not activated,
                                config=config)[0], residual

    def _small_linear_plan(self, projection: str, x: torch.Tensor,
                           weight: torch.Tensor) -> tuple[ModuleType, Any] | None:
        if self.batch_invariant or projection not in self.small_batch_fusions:
            return None
        # The fused qkv kernel rotates (and may store K/V) straight after the projection,
        # with no room for q/k norms in between: such models project through nn.Linear.
        if projection == "qkv" and self.self_attn.has_qk_norm:
            return None
        return small_linear_plan(x, weight)


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, backend: AttentionBackend) -> None:
        super().__init__()
        self.spec = spec
        # Given its weight, the embedding skips its random initialisation: on the meta device
        # (`builder`) that went through torch's reference ops, whose first use imports
        # torch._dynamo (3.1 s of a 3.8 s engine build on a 2-core box). The loader fills it.
        self.embed_tokens = nn.Embedding.from_pretrained(
            torch.empty(spec.vocab_size, spec.hidden_size), freeze=False)
        self.layers = nn.ModuleList(DecoderLayer(spec, backend)
                                    for _ in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings,
                                      spec.rope_theta, spec.rope_scaling)
        self.lm_head = (None if spec.tie_word_embeddings
                        else Linear(spec.hidden_size, spec.vocab_size, bias=False))
        self.batch_invariant = False
        self.packed_logits_weight: torch.Tensor | None = None
        """The logits' weight reordered for oneDNN (`pack_for_onednn`)."""

    def set_small_batch_fusion(self, fusions: Iterable[str] = SMALL_BATCH_FUSIONS) -> None:
        """Fuse these (of FUSIONS) in small CUDA batches: the projections named run through
        `small_linear`, the others through nn.Linear and the separate norm, rotary, KV-write
        and SiLU kernels. Capture CUDA graphs after changing it."""
        chosen = frozenset(fusions)
        if not chosen <= set(FUSIONS):
            raise ValueError(f"unknown fusions {sorted(chosen - set(FUSIONS))}; "
                             f"choose from {FUSIONS}")
        for layer in self.layers:
            layer.small_batch_fusions = chosen

    def set_batch_invariant(self, enabled: bool = True) -> None:
        """Compute every row the same way whatever batch it is in: every projection and the
        logits through `layers.invariant_linear`, and no `small_linear` (whose
        numerics differ from the larger batches' kernel). Norms, rotary and SiLU are row-wise
        already; attention needs a backend built batch-invariant too. Capture CUDA graphs
        after changing it."""
        if enabled and self.packed_logits_weight is not None:
            raise RuntimeError("the projections are packed for oneDNN; build the model "
                               "batch-invariant instead")
        self.batch_invariant = enabled
        for module in self.modules():
            if isinstance(module, (Linear, DecoderLayer)):
                module.batch_invariant = enabled

    def pack_for_onednn(self) -> None:
        """On the CPU: every projection, and the logits', through oneDNN with its weight
        reordered once (`kvtier.model.onednn`). A tied embedding stays for the lookup, so
        its packed copy is the one weight kept twice."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_for_onednn()
        self.packed_logits_weight = (onednn.pack(self.embed_tokens.weight)
                                     if self.lm_head is None else self.lm_head.packed_weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> torch.Tensor:
        """Final hidden states (num_tokens, hidden_size), after the last norm."""
        hidden, rotary = self.embed(input_ids, positions)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rotary, kv_cache, metadata)
        return self.norm(hidden, residual)[0]

    def embed(self, input_ids: torch.Tensor,
              positions: torch.Tensor) -> tuple[torch.Tensor, RotaryInputs]:
        hidden = self.embed_tokens(input_ids)
        return hidden, self.rotary(positions, hidden.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, hidden_size) -> float32 logits (n, vocab_size)."""
        if self.packed_logits_weight is not None:
            return onednn.linear(hidden, self.packed_logits_weight, None).float()
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.batch_invariant:
            return invariant_linear(hidden, weight).float()
        return torch.matmul(hidden, weight.t()).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters; every parameter must be covered."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            target = _map_hf_name(hf_name, self.spec)
            if target is None:
                continue
            name, shard = target
            if name not in params:
                raise ModelLoadError(f"weight {hf_name!r} does not fit this model ({name})")
            param = params[name]
            rows = param.data if shard is None else param.data.narrow(0, *shard)
            if rows.shape != tensor.shape:
                raise ModelLoadError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(rows.shape)}")
            rows.copy_(tensor)
            loaded.add(f"{name}:{shard}")
        missing = [n for n in _expected_slots(self.spec, params) if n not in loaded]
        if missing:
            raise ModelLoadError(f"{len(missing)} weights missing from the checkpoint, "
                                 f"e.g. {missing[:3]}")


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _map_hf_name(hf_name: str, spec: ModelSpec) -> tuple[str, tuple[int, int] | None] | None:
    """HF parameter name -> (our parameter, (row offset, rows) within a fused one, or None)."""
    if hf_name == "model.embed_tokens.weight":
        return "embed_tokens.weight", None
    if hf_name == "model.norm.weight":
        return "norm.weight", None
    if hf_name == "lm_head.weight":
        return (None if spec.tie_word_embeddings else ("lm_head.weight", None))
    match = _LAYER_RE.match(hf_name)
    if match is None or "rotary_emb" in hf_name:
        return None
    layer, rest = match.groups()
    prefix = f"layers.{layer}."
    q = spec.num_attention_heads * spec.head_dim
    kv = spec.num_key_value_heads * spec.head_dim
    f = spec.intermediate_size
    fused = {
        "self_attn.q_proj": ("self_attn.qkv_proj", (0, q)),
        "self_attn.k_proj": ("self_attn.qkv_proj", (q, kv)),
        "self_attn.v_proj": ("self_attn.qkv_proj", (q + kv, kv)),
        "mlp.gate_proj": ("mlp.gate_up_proj", (0, f)),
        "mlp.up_proj": ("mlp.gate_up_proj", (f, f)),
    }
    module, _, kind = rest.rpartition(".")
    if module in fused:
        name, shard = fused[module]
        return f"{prefix}{name}.{kind}", shard
    return prefix + rest, None


def _expected_slots(spec: ModelSpec, params: dict[str, nn.Parameter]) -> list[str]:
    """Every (parameter, shard) that a complete checkpoint fills, in `loaded`'s format."""
    q = spec.num_attention_heads * spec.head_dim
    kv = spec.num_key_value_heads * spec.head_dim
    f = spec.intermediate_size
    slots = []
    for name in params:
        if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
            slots += [f"{name}:{s}" for s in ((0, q), (q, kv), (q + kv, kv))]
        elif name.endswith("gate_up_proj.weight"):
            slots += [f"{name}:{s}" for s in ((0, f), (f, f))]
        else:
            slots.append(f"{name}:None")
    return slots
