"""Piecewise CUDA graphs for steps that carry prefill chunks (mixed, extend, short prefill).

An eager forward launches ~10 kernels per layer from Python; a step of a few hundred tokens
(an extend after a tier load, a short prompt) then costs more host time than GPU time: 12 ms of
launches for 5.8 ms of kernels on an extend of 256 tokens on an H200. Attention cannot join a
graph here, because its launches (grids, splits) follow the batch's composition. So, like
vLLM's piecewise compilation, the model is cut at attention: for each captured token count,
one graph runs embedding .. layer 0's q/k/v, one per layer runs o_proj .. the next layer's
q/k/v, and a last one ends at the final norm; attention runs eagerly between them.

With a backend that `accepts_written_kv` (Triton), each graph also ends with its layer's K/V
write, through a static slot mapping: one launch fewer per layer left outside the graphs,
where each launch costs ~30 us of host time on an H200's host (`scripts/bench_launch_gpu.py`),
about what a layer of a short extend costs the GPU.

Steps are padded to the next captured size. Padding rows hold token 0 at position 0 and slot
-1, so attention skips their K/V write and leaves their output unset; every other operation
is row-wise, so real rows never see them. Static buffers shared by all sizes carry token ids,
positions, slots, the fused q/k/v projection (read by attention right after its graph) and the
attention output (read by the next graph).
"""

from __future__ import annotations

import logging

import torch

from kvtier.attention.base import AttentionMetadata
from kvtier.model.llama import LlamaForCausalLM
from kvtier.model.spec import ModelSpec

logger = logging.getLogger(__name__)

def piecewise_sizes(max_tokens: int) -> list[int]:
    """Captured token counts: fine steps where a step is bound by reading the weights (padding
    is nearly free), coarser ones where it becomes compute-bound."""
    candidates = [8, 16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768,
                  896, 1024, 1280, 1536, 1792, 2048]
    sizes = [s for s in candidates if s <= max_tokens]
    if not sizes or sizes[-1] != max_tokens:
        sizes.append(max_tokens)
    return sizes


def estimate_bytes(spec: ModelSpec, max_tokens: int, element_size: int) -> int:
    """Device memory the graphs keep: the shared static buffers, and per captured size the
    residual stream and final hidden states (temporaries are shared through one pool)."""
    q = spec.num_attention_heads * spec.head_dim
    kv = spec.num_key_value_heads * spec.head_dim
    static = max_tokens * (2 * 8 + (2 * q + 2 * kv) * element_size)
    per_size = sum(piecewise_sizes(max_tokens)) * 2 * spec.hidden_size * element_size
    temporaries = max_tokens * 3 * spec.intermediate_size * element_size
    return static + per_size + temporaries


class PiecewiseGraphs:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor],
                 max_tokens: int) -> None:
        spec = model.spec
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = piecewise_sizes(max_tokens)
        n = self.sizes[-1]
        device = kv_caches[0].device
        dtype = model.embed_tokens.weight.dtype
        attn = model.layers[0].self_attn
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.writes_kv = attn.backend.accepts_written_kv
        # -1 until a step fills it: the warm-up and capture runs write nothing.
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.qkv = torch.zeros(n, attn.q_size + 2 * attn.kv_size, dtype=dtype, device=device)
        # Zeros: padding rows of the first step keep these finite values.
        self.attention = torch.zeros(n, spec.num_attention_heads, spec.head_dim, dtype=dtype,
                                     device=device)
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self._qkv_views: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._hidden: dict[int, torch.Tensor] = {}

    def size_for(self, num_tokens: int) -> int | None:
        """The captured size a step of num_tokens pads to, or None if it is too large."""
        if num_tokens > self.sizes[-1]:
            return None
        return next(s for s in self.sizes if s >= num_tokens)

    def _pieces(self, n: int) -> list:
        """The step's forward for n tokens as callables, each ending where attention starts;
        piece i > 0 reads the attention output of layer i - 1 from the static buffer."""
        model = self.model
        ids, positions = self.input_ids[:n], self.positions[:n]
        qkv, attention, slots = self.qkv[:n], self.attention[:n], self.slot_mapping[:n]
        layers = model.layers
        state: dict = {}

        def written(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
            if self.writes_kv:
                layers[i].self_attn.backend.write_kv(k, v, self.kv_caches[i], slots)
            return q, k, v

        def first() -> tuple:
            hidden, state["rotary"] = model.embed(ids, positions)
            q, k, v, state["residual"] = layers[0].pre_attention(hidden, None, state["rotary"],
                                                                qkv)
            return written(0, q, k, v)

        def middle(i: int):  # noqa: ANN202
            def piece() -> tuple:
                hidden, residual = layers[i - 1].post_attention(attention, state["residual"])
                q, k, v, state["residual"] = layers[i].pre_attention(hidden, residual,
                                                                    state["rotary"], qkv)
                return written(i, q, k, v)
            return piece

        def last() -> torch.Tensor:
            hidden, residual = layers[-1].post_attention(attention, state["residual"])
            return model.norm(hidden, residual)[0]

        return [first, *(middle(i) for i in range(1, len(layers))), last]

    @torch.inference_mode()
    def capture(self, pool: object | None = None) -> None:
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        for n in reversed(self.sizes):  # largest first: smaller sizes reuse its memory
            pieces = self._pieces(n)
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its kernels
                for piece in pieces:
                    piece()
            torch.cuda.synchronize()
            graphs, views = [], []
            for piece in pieces:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    result = piece()
                graphs.append(graph)
                if isinstance(result, tuple):
                    views.append(result)
                else:
                    self._hidden[n] = result
            self._graphs[n] = graphs
            self._qkv_views[n] = views
        torch.cuda.synchronize()
        logger.info("captured piecewise CUDA graphs for step sizes %s", self.sizes)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: AttentionMetadata) -> torch.Tensor:
        """Forward of a step padded to a captured size: input_ids and positions have that
        many rows, metadata.slot_mapping too (-1 for padding). Returns the final hidden states
        (size, hidden_size), valid until the next run."""
        n = input_ids.shape[0]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        if self.writes_kv:
            self.slot_mapping[:n].copy_(metadata.slot_mapping)
        graphs = self._graphs[n]
        attention = self.attention[:n]
        for layer, graph, (q, k, v), kv_cache in zip(self.model.layers, graphs,
                                                     self._qkv_views[n], self.kv_caches,
                                                     strict=False):
            graph.replay()
            layer.self_attn.attend(q, k, v, kv_cache, metadata, out=attention,
                                   kv_written=self.writes_kv)
        graphs[-1].replay()
        return self._hidden[n]
