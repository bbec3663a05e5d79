"""Piecewise CUDA graphs (model captured around attention) against the eager forward.

On a GPU: `pytest -m gpu tests/gpu/test_piecewise_graphs.py`; skipped elsewhere (graphs need
CUDA).
"""

from __future__ import annotations

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.types import ScheduledRequest, SchedulerOutput

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODEL = "random:qwen2.5-1.5b"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, dtype="bfloat16", max_num_batched_tokens=2048, max_num_seqs=32,
               num_gpu_blocks_override=2048, max_cudagraph_capture_size=512)


def _mixed_step(block_size: int) -> SchedulerOutput:
    """3 decodes over written contexts, an extend of 200 after 700 cached, a fresh 40-token
    prefill: 243 tokens, padded to 256."""
    gen = torch.Generator().manual_seed(0)
    requests, next_block = [], 0
    shapes = [(300, 1), (1000, 1), (37, 1), (700, 200), (0, 40)]
    for i, (cached, new) in enumerate(shapes):
        blocks = -(-(cached + new) // block_size)
        ids = list(range(next_block, next_block + blocks))
        next_block += blocks
        tokens = torch.randint(1000, 30_000, (new,), generator=gen).tolist()
        requests.append(ScheduledRequest(f"r{i}", tokens, cached, ids, True,
                                         SamplingParams(temperature=0.0), 0))
    return SchedulerOutput(requests, sum(new for _, new in shapes))


def test_graphs_match_the_eager_forward(llm: LLM) -> None:
    """Same step, same cache: the final hidden states of real rows agree with the eager
    forward's within bf16 rounding (GEMMs over 256 vs 243 rows may pick other kernels), and
    the greedy token of every sequence is the same."""
    runner = llm.engine.runner
    graphs = runner.piecewise
    assert graphs is not None and graphs.sizes[-1] == 512
    step = _mixed_step(runner.block_size)
    runner.kv_cache.normal_()  # the cached contexts: random K/V
    padded = graphs.size_for(step.num_scheduled_tokens)
    assert padded == 256
    with torch.inference_mode():
        ids, positions, metadata = runner._prepare_inputs(step, padded)
        assert ids.shape[0] == 256 and metadata.slot_mapping[243:].eq(-1).all()
        graph_hidden = graphs.run(ids, positions, metadata)[:243].clone()
        ids, positions, metadata = runner._prepare_inputs(step)
        eager_hidden = runner.model(ids, positions, runner.kv_caches, metadata)
    torch.testing.assert_close(graph_hidden, eager_hidden, atol=5e-2, rtol=5e-2)
    last = torch.tensor(metadata.query_start_loc_cpu[1:]) - 1
    model = runner.model
    assert torch.equal(model.compute_logits(graph_hidden[last]).argmax(-1),
                       model.compute_logits(eager_hidden[last]).argmax(-1))


def test_padding_rows_leave_the_cache_alone(llm: LLM) -> None:
    """Padding rows write no K/V: every block outside the step's own slots is unchanged."""
    runner = llm.engine.runner
    graphs = runner.piecewise
    assert graphs is not None
    step = _mixed_step(runner.block_size)
    runner.kv_cache.normal_()
    before = runner.kv_cache.clone()
    with torch.inference_mode():
        ids, positions, metadata = runner._prepare_inputs(step, 256)
        graphs.run(ids, positions, metadata)
    torch.cuda.synchronize()
    written = torch.zeros(runner.kv_cache.shape[2] * runner.block_size, dtype=torch.bool)
    written[metadata.slot_mapping[:243].cpu()] = True
    changed = (runner.kv_cache != before).any(dim=(0, 1, 4, 5)).flatten().cpu()
    assert not (changed & ~written).any()
    assert changed[written].all()


def test_graphs_store_the_kv_the_eager_forward_stores(llm: LLM) -> None:
    """With the Triton backend each layer's graph ends with its K/V write (no write launched
    between graphs): the step's slots then hold what the eager forward writes there, in every
    layer, to bf16 rounding (GEMMs over 256 vs 243 rows), and a zeroed slot shows any miss."""
    runner = llm.engine.runner
    graphs = runner.piecewise
    assert graphs is not None and graphs.writes_kv
    step = _mixed_step(runner.block_size)
    runner.kv_cache.normal_()
    context = runner.kv_cache.clone()
    stored = []
    with torch.inference_mode():
        for padded in (256, None):
            runner.kv_cache.copy_(context)
            ids, positions, metadata = runner._prepare_inputs(step, padded)
            slots = metadata.slot_mapping[:243]
            flat = runner.kv_cache.view(*runner.kv_cache.shape[:2], -1,
                                        *runner.kv_cache.shape[4:])
            flat[:, :, slots] = 0
            if padded:
                graphs.run(ids, positions, metadata)
            else:
                runner.model(ids, positions, runner.kv_caches, metadata)
            stored.append(flat[:, :, slots].clone())
    graph_kv, eager_kv = stored
    assert graph_kv.ne(0).any(dim=(0, 1, 3, 4)).all(), "every slot written in some layer"
    torch.testing.assert_close(graph_kv, eager_kv, atol=5e-2, rtol=5e-2)


def test_engine_outputs_agree_with_eager_steps(llm: LLM) -> None:
    """Greedy generation through the engine, prompts sharing a prefix (extend steps) and one
    longer than the largest captured size (eager): the same tokens with piecewise graphs off."""
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(1000, 30_000, (600,), generator=gen).tolist()
    prompts = [prefix + torch.randint(1000, 30_000, (n,), generator=gen).tolist()
               for n in (5, 120, 300)] + [torch.randint(1000, 30_000, (900,),
                                                        generator=gen).tolist()]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine = llm.engine
    engine.reset_prefix_cache()
    with_graphs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    saved, engine.runner.piecewise = engine.runner.piecewise, None
    try:
        engine.reset_prefix_cache()
        eager = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        engine.runner.piecewise = saved
    assert with_graphs == eager


def test_decode_graph_block_tables_follow_changing_batches(llm: LLM) -> None:
    """Decode-graph replays whose rows change between steps: a request that leaves (later
    rows shift up), one whose block list grew, one re-admitted with a new list, a new one.
    Each replay's logits match the eager forward of the same batch."""
    runner = llm.engine.runner
    graphs = runner.graphs
    assert graphs is not None
    bs = runner.block_size
    runner.kv_cache.normal_()
    free = torch.randperm(runner.num_blocks, generator=torch.Generator().manual_seed(3)).tolist()

    def blocks(n: int) -> list[int]:
        return [free.pop() for _ in range(n)]

    def eager(step: SchedulerOutput) -> torch.Tensor:
        ids, positions, metadata = runner._prepare_inputs(step)
        return runner.model.compute_logits(runner.model(ids, positions, runner.kv_caches,
                                                        metadata))

    lists = {"a": blocks(10), "b": blocks(5), "c": blocks(20), "d": blocks(3)}
    steps = [[("a", 150), ("b", 70), ("c", 300)],
             [("a", 160), ("c", 301), ("d", 40)]]
    lists_after_first = {"a": lists["a"]}
    for step_index, batch in enumerate([*steps, [("a", 90), ("c", 302)]]):
        if step_index == 1:
            lists["a"].append(free.pop())  # grew by a block: the same list object
        if step_index == 2:
            lists["a"] = blocks(6)  # re-admitted: a new list
            assert lists["a"] is not lists_after_first["a"]
        requests = [ScheduledRequest(name, [1000 + pos], pos, lists[name], True,
                                     SamplingParams(temperature=0.0), 1)
                    for name, pos in batch]
        step = SchedulerOutput(requests, len(requests))
        with torch.inference_mode():
            graph_logits = graphs.run(
                token_ids=[r.token_ids[0] for r in requests],
                positions=[r.num_computed_tokens for r in requests],
                slots=[r.block_ids[r.num_computed_tokens // bs] * bs
                       + r.num_computed_tokens % bs for r in requests],
                block_tables=[r.block_ids for r in requests],
                seq_lens=[r.num_computed_tokens + 1 for r in requests]).clone()
            eager_logits = eager(step)
            # Control: the last request reading another request's context (a stale row):
            # every block but the one its new token goes to is replaced.
            last = requests[-1]
            own = last.num_computed_tokens // bs
            stale = [b if j == own else free.pop() for j, b in enumerate(last.block_ids)]
            wrong_logits = eager(SchedulerOutput(
                [*requests[:-1], ScheduledRequest(last.request_id, last.token_ids,
                                                  last.num_computed_tokens, stale, True,
                                                  last.sampling_params, 1)], len(requests)))
        # Logits are bf16 products (ulp 0.06 at 8-16): decode splits laid out for the graph's
        # longest context vs this batch's round differently, a row then differs by ~0.03 on
        # average on an H200; a wrong block-table entry moves its row by far more.
        noise = (graph_logits - eager_logits).abs().mean(-1)
        control = (wrong_logits[-1] - eager_logits[-1]).abs().mean()
        assert (noise < 0.1).all() and control > 0.2, (step_index, noise, control)


def test_penalties_run_through_the_decode_graphs(llm: LLM) -> None:
    """Penalised sampling edits the decode graphs' logits buffer and the request's penalty
    state (both inference tensors) on every graph step: once, that failed every request in
    the step. A repetition penalty of 1e6 leaves greedy decoding only unseen tokens (a random
    model's 152k logits always hold positive unseen ones), so every token is new."""
    assert llm.engine.runner.graphs is not None
    prompt = list(range(1000, 1040))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                            repetition_penalty=1e6, frequency_penalty=2.0)
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([prompt, prompt[:20]], [params, plain])
    tokens = outputs[0].outputs[0].token_ids
    assert len(tokens) == 24 and len(set(tokens)) == 24 and not set(tokens) & set(prompt)
    assert len(outputs[1].outputs[0].token_ids) == 24


def test_logprobs_from_the_decode_graphs_equal_the_prefills(llm: LLM) -> None:
    """Logprobs are taken from the decode graphs' logits buffer before the sampler edits it
    (a penalty here) and copied back with the tokens. Teacher-forced: each output position's
    logprobs again as the first token of a prefill of the prompt and the outputs before it
    (no decode graph), which must agree to bf16 noise."""
    assert llm.engine.runner.graphs is not None
    prompt = list(range(2000, 2030))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=20,
                            repetition_penalty=1.5)
    graphed = llm.generate([prompt, prompt[:10]], [params, SamplingParams(max_tokens=8)])
    ours = graphed[0].outputs[0]
    assert ours.logprobs is not None and graphed[1].outputs[0].logprobs is None
    tokens = ours.token_ids
    forced = llm.generate([prompt + tokens[:i] for i in range(len(tokens))],
                          SamplingParams(max_tokens=1, temperature=0.0, logprobs=20))
    for i, (got, output) in enumerate(zip(ours.logprobs, forced, strict=True)):
        top = output.outputs[0].logprobs[0].top  # type: ignore[index]
        want = dict(top)
        assert got.token_id == tokens[i] and got.token_id in want, i  # raw rank <= 20
        assert abs(got.logprob - want[got.token_id]) < 0.05, i
        assert abs(got.top[0][1] - top[0][1]) < 0.05, i
        assert got.rank >= 1


def test_logprobs_reach_the_host_through_pinned_copies() -> None:
    """The step's one synchronisation is the event after the token copy: logprobs must be
    copied into pinned memory before it, never read back from the device on their own."""
    from kvtier.runner.logprobs import step_logprobs
    from kvtier.runner.model_runner import PendingOutput
    from kvtier.runner.sampler import Sampler

    logits = torch.randn(3, 1000, device="cuda")
    params = [SamplingParams(temperature=0.0, logprobs=5), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=0)]
    logprobs = step_logprobs(logits, params)
    assert logprobs is not None
    tokens = Sampler(logits.device, seed=0).sample_async(logits, ["a", "b", "c"], params)
    logprobs.attach(tokens)
    pending = PendingOutput(["a", "b", "c"], tokens, logprobs)
    scores = logprobs.scores
    assert scores is not None and scores.values.is_pinned()
    assert scores.ranks.is_pinned() and scores.top_ids.is_pinned()
    output = pending.result()
    assert sorted(output.logprobs) == ["a", "c"]
    assert output.logprobs["a"].rank == 1 and len(output.logprobs["a"].top) == 5


def test_prompt_logprobs_through_piecewise_graphs_equal_an_eager_engines(llm: LLM) -> None:
    """Prompt logprobs read the prefill's hidden states, which the piecewise graphs produce
    padded to a captured size; the entries must match an eager engine's to bf16 noise, and
    the prompt is computed whole even when cached."""
    assert llm.engine.runner.piecewise is not None
    prompt = list(range(3000, 3400))  # one 400-token step: a piecewise graph (<= 512)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=5)
    llm.generate([prompt], SamplingParams(max_tokens=1))  # cache the prompt first
    graphed = llm.generate([prompt], params)[0]
    assert graphed.num_cached_tokens == 0
    eager = LLM(MODEL, dtype="bfloat16", enforce_eager=True, num_gpu_blocks_override=256,
                max_model_len=1024).generate([prompt], params)[0]
    assert graphed.prompt_logprobs is not None and eager.prompt_logprobs is not None
    assert len(graphed.prompt_logprobs) == len(prompt) and graphed.prompt_logprobs[0] is None
    diffs = [abs(g.logprob - e.logprob) for g, e in  # type: ignore[union-attr]
             zip(graphed.prompt_logprobs[1:], eager.prompt_logprobs[1:], strict=True)]
    assert max(diffs) < 0.1 and sum(diffs) / len(diffs) < 0.02
