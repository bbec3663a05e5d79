"""Sampling filters keep a valid distribution for every value validation lets through."""

from __future__ import annotations

import pytest
import torch

from kvtier.runner.logprobs import step_logprobs
from kvtier.runner.sampler import Sampler
from kvtier.types import SamplingParams


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46, 1e-45, 1e-6])
def test_a_vanishing_top_p_keeps_the_most_likely_token(top_p: float) -> None:
    """A top_p that rounds to 0 in float32 used to drop every token: multinomial then failed
    the whole engine step, and every request in it. Now the nucleus is the top token alone;
    a row sampled beside it (another request) is unaffected."""
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=1.0, top_p=top_p, seed=1),
              SamplingParams(temperature=0.0)]
    tokens = Sampler(torch.device("cpu"), seed=0).sample_async(logits, ["a", "b"], params)
    assert tokens.tolist() == [1, 0]


def reference_penalties(logits: list[float], prompt: list[int], output: list[int],
                        params: SamplingParams) -> list[float]:
    """vLLM's formulas, token by token: repetition over prompt and output, then frequency
    (per occurrence) and presence (once) over the output."""
    result = list(logits)
    for token in set(prompt) | set(output):
        value = result[token]
        result[token] = (value / params.repetition_penalty if value > 0
                         else value * params.repetition_penalty)
    for token in set(output):
        result[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return result


@pytest.mark.parametrize("kwargs", [
    {"repetition_penalty": 1.3}, {"repetition_penalty": 0.7}, {"presence_penalty": 1.5},
    {"frequency_penalty": -0.5}, {"frequency_penalty": 0.8, "presence_penalty": 0.4,
                                  "repetition_penalty": 1.2}])
def test_penalties_follow_vllms_formulas(kwargs: dict) -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 50, generator=generator)
    prompt, output = [1, 2, 2, 7, 30], [7, 7, 9, 41, 9, 7]
    params = SamplingParams(temperature=0.0, **kwargs)
    expected = reference_penalties(logits[1].tolist(), prompt, output, params)
    others = logits[[0, 2]].clone()
    Sampler(torch.device("cpu"), seed=0).sample_async(
        logits, ["a", "b", "c"], [SamplingParams(temperature=0.0), params,
                                  SamplingParams(temperature=0.0)],
        [None, (prompt, output), None])
    assert torch.allclose(logits[1], torch.tensor(expected), atol=1e-6)
    assert torch.equal(logits[[0, 2]], others)  # rows without penalties are untouched


def test_a_greedy_row_with_a_repetition_penalty_avoids_its_seen_top_token() -> None:
    logits = torch.tensor([[4.0, 3.0, 0.5, -1.0]])
    sampler = Sampler(torch.device("cpu"), seed=0)
    plain = sampler.sample_async(logits.clone(), ["a"], [SamplingParams(temperature=0.0)])
    penalized = sampler.sample_async(
        logits.clone(), ["a"], [SamplingParams(temperature=0.0, repetition_penalty=2.0)],
        [([0], [])])
    assert plain.tolist() == [0] and penalized.tolist() == [1]  # 4 / 2 < 3


def test_penalties_without_the_tokens_seen_are_refused() -> None:
    with pytest.raises(ValueError, match="token context"):
        Sampler(torch.device("cpu"), seed=0).sample_async(
            torch.zeros(1, 4), ["a"], [SamplingParams(presence_penalty=1.0)])


def test_min_p_samples_only_tokens_within_its_ratio_of_the_top() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.25 keeps tokens at >= 0.125, so 0, 1 and 2.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(2000, 4).contiguous()
    params = [SamplingParams(temperature=1.0, min_p=0.25)] * 2000  # the shared generator
    tokens = Sampler(torch.device("cpu"), seed=0).sample_async(
        logits, [f"r{i}" for i in range(2000)], params)
    counts = torch.bincount(tokens, minlength=4).tolist()
    assert counts[3] == 0 and min(counts[:3]) > 100


@pytest.mark.parametrize("kwargs, message", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": float("nan")}, "min_p"),
])
def test_bad_penalties_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("repetition_penalty", [1e-39, 1e-300, 1e39, 1e300])
def test_extreme_repetition_penalties_keep_the_step_alive(repetition_penalty: float) -> None:
    # A penalty near 0 made the seen positive logits infinite (and a huge one made 0 * inf
    # NaN): multinomial then failed the whole step, every live request with it.
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [1.0, 2.0, 3.0, 4.0]])
    params = [SamplingParams(temperature=0.7, repetition_penalty=repetition_penalty, seed=3),
              SamplingParams(temperature=0.0)]
    tokens = Sampler(torch.device("cpu"), seed=0).sample_async(
        logits, ["a", "b"], params, [([0, 1, 2], []), None])
    assert torch.isfinite(logits).all()
    assert 0 <= int(tokens[0]) < 4 and int(tokens[1]) == 3


def test_penalty_state_stays_on_the_device_between_steps(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    # The prompt's ids go up once; each sampled token is then folded in on the device, so a
    # long prompt costs nothing per step. The result equals the formulas over the lists.
    import kvtier.runner.sampler as sampler_module
    uploads: list[int] = []
    upload = sampler_module._upload

    def counting_upload(values: list[int], device: torch.device) -> torch.Tensor:
        uploads.append(len(values))
        return upload(values, device)

    monkeypatch.setattr(sampler_module, "_upload", counting_upload)
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=0.5,
                            frequency_penalty=0.7)
    prompt, output = [3, 4, 4, 9], []
    generator = torch.Generator().manual_seed(5)
    for step in range(6):
        logits = torch.randn(1, 12, generator=generator)
        expected = reference_penalties(logits[0].tolist(), prompt, output, params)
        token = int(sampler.sample_async(logits, ["r"], [params], [(prompt, output)])[0])
        assert torch.allclose(logits[0], torch.tensor(expected), atol=1e-6), step
        assert token == max(range(12), key=lambda t: expected[t])
        output.append(token)
    assert uploads == [3]  # the prompt's distinct ids, once
    output.extend([0, 0])  # the lists moved on without the sampler: built again from them
    logits = torch.randn(1, 12, generator=generator)
    expected = reference_penalties(logits[0].tolist(), prompt, output, params)
    sampler.sample_async(logits, ["r"], [params], [(prompt, output)])
    assert torch.allclose(logits[0], torch.tensor(expected), atol=1e-6)
    sampler.forget(["r"])
    assert not sampler._penalties


def test_penalties_edit_inference_tensors_whichever_mode_the_caller_runs_in() -> None:
    # The decode graphs' logits are inference tensors (captured under inference mode) and
    # are sampled outside it; a penalty state built on an eager step (inside inference mode)
    # is updated on a later graph step (outside). Both used to raise "Inplace update to
    # inference tensor outside InferenceMode", failing every request in the step.
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5)
    prompt: list[int] = [1, 2, 3]
    with torch.inference_mode():  # an eager step builds the state
        first = int(sampler.sample_async(torch.randn(1, 8), ["r"], [params],
                                         [(prompt, [])])[0])
    with torch.inference_mode():
        graph_logits = torch.randn(1, 8)  # a graph's static output buffer
    before = graph_logits.clone()
    sampler.sample_async(graph_logits, ["r"], [params], [(prompt, [first])])
    expected = reference_penalties(before[0].tolist(), prompt, [first], params)
    assert torch.allclose(graph_logits[0], torch.tensor(expected), atol=1e-6)


def test_suppressed_ids_are_never_sampled() -> None:
    # min_tokens: EOS and stop token ids are out of reach, greedy or sampled.
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(500, 1)
    params = [SamplingParams(temperature=0.0)] + [SamplingParams(temperature=2.0)] * 499
    tokens = Sampler(torch.device("cpu"), seed=0).sample_async(
        logits, [f"r{i}" for i in range(500)], params, None, [(0,)] * 500)
    assert int(tokens[0]) == 1 and 0 not in tokens.tolist()


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)"))]


@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias_shifts_its_rows_logits_before_penalties_and_sampling(device: str) -> None:
    # +100 makes a token certain, greedy or sampled; -100 takes the top token out of a greedy
    # row's reach; a row without a bias beside them is untouched. The bias comes before the
    # repetition penalty (vLLM's order): 3 + 2 = 5, then / 2 = 2.5.
    logits = torch.tensor([[5.0, 4.0, 0.0, 3.0]], device=device).repeat(4, 1)
    params = [SamplingParams(temperature=0.0, logit_bias={2: 100.0}),
              SamplingParams(temperature=1.5, seed=3, logit_bias={2: 100.0}),
              SamplingParams(temperature=0.0, logit_bias={0: -100.0}),
              SamplingParams(temperature=0.0, logit_bias={3: 2.0}, repetition_penalty=2.0)]
    tokens = Sampler(torch.device(device), seed=0).sample_async(
        logits, ["a", "b", "c", "d"], params, [None, None, None, ([3], [])])
    assert tokens.tolist() == [2, 2, 1, 0]
    assert logits[2, 0] == -95.0 and logits[3, 3] == 2.5
    plain = torch.tensor([[5.0, 4.0, 0.0, 3.0]], device=device)
    Sampler(torch.device(device), seed=0).sample_async(plain, ["e"],
                                                       [SamplingParams(temperature=0.0)])
    assert plain.tolist() == [[5.0, 4.0, 0.0, 3.0]]


@pytest.mark.parametrize("device", DEVICES)
def test_allowed_token_ids_are_all_a_row_may_pick(device: str) -> None:
    # Greedy and sampled rows pick only allowed ids, even where the others' logits are far
    # higher; a bias then applies among them.
    logits = torch.tensor([[9.0, 8.0, 0.0, 1.0, -2.0]], device=device).repeat(300, 1)
    params = ([SamplingParams(temperature=0.0, allowed_token_ids=(2, 3))]
              + [SamplingParams(temperature=1.0, allowed_token_ids=(2, 3, 4))] * 298
              + [SamplingParams(temperature=0.0, allowed_token_ids=(3, 4),
                                logit_bias={4: 10.0})])
    tokens = Sampler(torch.device(device), seed=0).sample_async(
        logits, [f"r{i}" for i in range(300)], params).tolist()
    assert tokens[0] == 3 and tokens[-1] == 4
    assert set(tokens[1:-1]) <= {2, 3, 4} and len(set(tokens[1:-1])) == 3


@pytest.mark.parametrize("allowed", [(), (-1,), (True,), ("3",), 5, "3"])
def test_bad_allowed_token_ids_are_refused(allowed: tuple) -> None:
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=allowed)


@pytest.mark.parametrize(("bias", "message"), [
    ({-1: 1.0}, "logit_bias keys"), ({True: 1.0}, "logit_bias keys"),
    ({"3": 1.0}, "logit_bias keys"), ({3: 100.5}, "in \\[-100, 100\\]"),
    ({3: float("nan")}, "logit_bias values"), (((3, 1.0), (3, 2.0)), "twice"),
    (((3,),), "logit_bias keys"), ((5,), "logit_bias keys"), ({"a": 1.0, 2: 1.0}, "keys"),
])
def test_bad_logit_biases_name_the_value(bias: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_words_ban_the_token_that_would_complete_them(device: str) -> None:
    """A one-token bad word is never sampled; a longer one's last token only where the output
    so far ends with its other tokens (vLLM's rule), greedy or sampled, beside a row without
    bad words."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 8.0]], device=device).repeat(4, 1)
    words = ((3,), (1, 4), (2, 1, 4))
    params = [SamplingParams(temperature=0.0, bad_words_token_ids=words)] * 3 + [
        SamplingParams(temperature=0.0)]
    contexts = [([7], [0, 1]), ([7], [2, 0]), ([7], []), None]
    tokens = Sampler(torch.device(device), seed=0).sample_async(
        logits, ["ends-1", "ends-0", "empty", "free"], params, contexts).tolist()
    # 3 is banned everywhere it is a bad word; 4 only after a 1.
    assert tokens == [2, 4, 4, 3]
    sampled = torch.tensor([[0.0, 0.0, 0.0, 5.0, 6.0]], device=device).repeat(200, 1)
    many = Sampler(torch.device(device), seed=0).sample_async(
        sampled, [f"r{i}" for i in range(200)],
        [SamplingParams(temperature=1.0, bad_words_token_ids=((1, 4),))] * 200,
        [([], [1])] * 200).tolist()
    assert 4 not in many and 3 in many


def test_bad_word_state_follows_the_sampled_tokens_without_the_host() -> None:
    """Under async scheduling the host's output list lags the device by the token in flight:
    the state folds each sampled token in itself, so the ban after it holds."""
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = [SamplingParams(temperature=0.0, bad_words_token_ids=((3, 4), (4, 4)))]
    first = sampler.sample_async(torch.tensor([[0.0, 0.0, 0.0, 9.0, 1.0]]), ["r"], params,
                                 [([5], [])], num_output_tokens=[0])
    assert first.tolist() == [3]
    # The host has not read token 3 yet (its output list is still empty).
    second = sampler.sample_async(torch.tensor([[0.0, 0.0, 2.0, 0.0, 9.0]]), ["r"], params,
                                  [([5], [])], num_output_tokens=[1])
    assert second.tolist() == [2]
    third = sampler.sample_async(torch.tensor([[0.0, 0.0, 2.0, 0.0, 9.0]]), ["r"], params,
                                 [([5], [3, 2])], num_output_tokens=[2])
    assert third.tolist() == [4]
    with pytest.raises(RuntimeError, match="bad-word state"):
        Sampler(torch.device("cpu"), seed=0).sample_async(
            torch.zeros(1, 5), ["new"], params, [([5], [])], num_output_tokens=[1])
    with pytest.raises(ValueError, match="no token context"):
        Sampler(torch.device("cpu"), seed=0).sample_async(torch.zeros(1, 5), ["x"], params)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bad_words": ("",)}, "bad_words must be strings"),
    ({"bad_words": ("  ",)}, "bad_words must be strings"),
    ({"bad_words": (3,)}, "bad_words must be strings"),
    ({"bad_words": 3}, "bad_words must be a list"),
    ({"bad_words": ("a\ud800",)}, "bad_words must be valid Unicode"),  # tokenizers refuse it
    ({"bad_words_token_ids": ((),)}, "non-empty lists"),
    ({"bad_words_token_ids": ((1, -2),)}, "non-empty lists"),
    ({"bad_words_token_ids": ((True,),)}, "non-empty lists"),
    ({"bad_words_token_ids": 5}, "bad_words_token_ids must be a list"),
])
def test_bad_bad_words_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_words_lists_become_tuples() -> None:
    params = SamplingParams(bad_words=["a", "b c"], bad_words_token_ids=[[1, 2], (3,)])
    assert params.bad_words == ("a", "b c") and params.bad_words_token_ids == ((1, 2), (3,))
    assert SamplingParams(bad_words="word").bad_words == ("word",)
    assert not SamplingParams(bad_words_token_ids=((3,),)).needs_token_context
    assert SamplingParams(bad_words_token_ids=((3, 4),)).needs_token_context


def test_suppressed_ids_past_the_logits_are_ignored() -> None:
    # An EOS id beyond a model's logits (a tokenizer larger than the head) must not fail
    # the step.
    tokens = Sampler(torch.device("cpu"), seed=0).sample_async(
        torch.tensor([[1.0, 3.0, 2.0]]), ["a"], [SamplingParams(temperature=0.0)], None,
        [(1, 7)])
    assert tokens.tolist() == [2]


def test_step_logprobs_are_the_raw_log_softmax_whatever_the_sampler_does() -> None:
    """Rows asking for logprobs get log-softmax of the logits as the model gave them, even
    when penalties change those logits in place; ranks count ties; other rows get none."""
    logits = torch.tensor([[2.0, 1.0, 1.0, -3.0], [0.5, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    raw = logits.clone()
    params = [SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=9.0),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=0)]
    logprobs = step_logprobs(logits, params)
    assert logprobs is not None
    tokens = Sampler(torch.device("cpu"), seed=0).sample_async(
        logits, ["a", "b", "c"], params, [([0], []), None, None])
    assert tokens.tolist() == [1, 1, 0]  # the penalty moved row 0 off its top token
    logprobs.attach(tokens)
    per_row = logprobs.per_row(tokens.tolist())
    assert sorted(per_row) == [0, 2]
    expected = raw.log_softmax(-1)
    first = per_row[0]
    assert first.token_id == 1 and first.rank == 3  # ties with token 2
    assert first.logprob == pytest.approx(expected[0, 1].item())
    assert first.top[0][0] == 0 and first.top[1][0] in (1, 2)  # 1 and 2 tie: either
    assert [lp for _, lp in first.top] == pytest.approx([expected[0, 0].item(),
                                                         expected[0, 1].item()])
    assert per_row[2].top == () and per_row[2].rank == 4  # four equal logits
    assert per_row[2].logprob == pytest.approx(-1.3862944)
    assert step_logprobs(raw, [SamplingParams()] * 3) is None


LOGITS = [2.0, 1.6, 1.2, 0.9, 0.5, 0.0, -0.4, -1.0, -2.5, -4.0]


def reference_distribution(params: SamplingParams,
                           logits: list[float] = LOGITS) -> list[float]:
    """vLLM's filters, written plainly in float64: temperature, min-p, top-k (every token tied
    with the k-th best stays, as in vLLM and HF), top-p (a token stays while the mass of those
    before it is below top_p; the tokens tied with the last one kept stay with it)."""
    scaled = [v / params.temperature for v in logits]
    total = sum(2.718281828459045 ** v for v in scaled)
    probs = [2.718281828459045 ** v / total for v in scaled]
    keep = [p >= params.min_p * max(probs) for p in probs]
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i])
    if 0 < params.top_k < len(probs):
        kth = probs[ranked[params.top_k - 1]]
        keep = [k and p >= kth for p, k in zip(probs, keep, strict=True)]
    kept = [i for i in ranked if keep[i]]
    mass = sum(probs[i] for i in kept)
    before, floor = 0.0, probs[kept[0]]
    for i in kept:
        if before >= params.top_p:
            break
        floor = probs[i]
        before += probs[i] / mass
    keep = [k and p >= floor for p, k in zip(probs, keep, strict=True)]
    mass = sum(p for p, k in zip(probs, keep, strict=True) if k)
    return [p / mass if k else 0.0 for p, k in zip(probs, keep, strict=True)]


FILTERS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=6, top_p=0.9),
    SamplingParams(temperature=2.0, min_p=0.05),
    SamplingParams(temperature=0.9, min_p=0.1, top_k=5, top_p=0.95),
]


def test_batched_sampling_draws_each_rows_filtered_distribution() -> None:
    """Every filter combination in one batch (rows of different top-k widths and top-p),
    4,000 rows each: each row's token frequencies match its own filtered distribution, and
    filtered-out tokens never come up."""
    rows = 4000
    params = [p for p in FILTERS for _ in range(rows)]
    logits = torch.tensor([LOGITS] * len(params))
    tokens = Sampler(torch.device("cpu"), seed=0).sample_async(
        logits, [f"r{i}" for i in range(len(params))], params).view(len(FILTERS), rows)
    for config, drawn in zip(FILTERS, tokens, strict=True):
        expected = reference_distribution(config)
        counts = torch.bincount(drawn, minlength=len(LOGITS)).tolist()
        for token, (count, p) in enumerate(zip(counts, expected, strict=True)):
            if p == 0.0:
                assert count == 0, (config, token)
            else:  # five standard deviations of a binomial frequency
                tolerance = 5 * (p * (1 - p) / rows) ** 0.5 + 1e-3
                assert abs(count / rows - p) < tolerance, (config, token, count / rows, p)


TIED = [3.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0]


@pytest.mark.parametrize("config", [
    SamplingParams(temperature=1.0, top_k=2),  # token 2 ties with the 2nd best
    SamplingParams(temperature=1.0, top_k=4),  # tokens 4 and 5 tie with the 4th best
    SamplingParams(temperature=1.0, top_k=4, top_p=0.99),
    SamplingParams(temperature=1.0, top_p=0.7),  # the cut falls between tokens 1 and 2
    SamplingParams(temperature=1.0, top_k=5, top_p=0.93),  # between 4 and 5, tied
], ids=lambda p: f"top_k={p.top_k},top_p={p.top_p}")
def test_tokens_tied_with_the_last_one_kept_are_kept_too(config: SamplingParams) -> None:
    """Tied logits are common in bf16. Top-k kept exactly k candidates, so a token tied with
    the k-th best was cut or kept by where the sort put it (logits [3, 1, 1, ...] at top-k 2
    never gave token 2, where vLLM and HF give tokens 1 and 2 alike). Now every token at or
    above the last one kept stays, beside rows of other settings."""
    rows = 4000
    params = [config] * rows + [SamplingParams(temperature=1.0, top_k=1)] * 8
    tokens = Sampler(torch.device("cpu"), seed=2).sample_async(
        torch.tensor([TIED] * len(params)), [f"r{i}" for i in range(len(params))],
        params)[:rows]
    expected = reference_distribution(config, TIED)
    counts = torch.bincount(tokens, minlength=len(TIED)).tolist()
    for token, (count, p) in enumerate(zip(counts, expected, strict=True)):
        tolerance = 5 * (p * (1 - p) / rows) ** 0.5 + 1e-3
        assert (count == 0) if p == 0.0 else abs(count / rows - p) < tolerance, (token, p)


def test_greedy_rows_beside_random_rows_take_their_argmax() -> None:
    logits = torch.tensor([LOGITS, LOGITS[::-1], LOGITS])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=2),
              SamplingParams(temperature=0.0)]
    tokens = Sampler(torch.device("cpu"), seed=0).sample_async(logits, ["a", "b", "c"], params)
    assert tokens[0] == 0 and tokens[2] == 0
    assert tokens[1] in (len(LOGITS) - 1, len(LOGITS) - 2)


def test_a_seeded_rows_token_ignores_its_batch() -> None:
    """The same seeded request, sampled beside rows that widen the candidate list (top-k 9
    against its 4), beside unseeded or other seeded rows, or alone: the same token stream."""
    seeded = SamplingParams(temperature=1.5, top_k=4, top_p=0.9, seed=42)
    batches = [
        [seeded],
        [SamplingParams(temperature=1.0, top_k=9), seeded],
        [SamplingParams(temperature=1.0, seed=7), seeded, SamplingParams(temperature=0.0)],
        [seeded, SamplingParams(temperature=1.0, min_p=0.2)],
    ]
    streams = []
    for batch in batches:
        sampler = Sampler(torch.device("cpu"), seed=len(streams))
        row = batch.index(seeded)
        ids = [f"other{i}" for i in range(len(batch))]
        ids[row] = "seeded"
        logits = torch.tensor([LOGITS] * len(batch))
        streams.append([int(sampler.sample_async(logits.clone(), ids, batch)[row])
                        for _ in range(30)])
    assert all(stream == streams[0] for stream in streams)
    assert len(set(streams[0])) > 1  # it samples: not stuck on one token


@pytest.mark.parametrize("config", FILTERS, ids=lambda p: repr(p)[:60])
def test_a_batch_sharing_one_setting_draws_its_distribution(config: SamplingParams) -> None:
    """The usual batch, every row with the same setting (its factors stay Python scalars)."""
    rows = 3000
    tokens = Sampler(torch.device("cpu"), seed=1).sample_async(
        torch.tensor([LOGITS] * rows), [f"r{i}" for i in range(rows)], [config] * rows)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).tolist()
    for token, (count, p) in enumerate(zip(counts, reference_distribution(config),
                                           strict=True)):
        tolerance = 5 * (p * (1 - p) / rows) ** 0.5 + 1e-3
        assert (count == 0) if p == 0.0 else abs(count / rows - p) < tolerance, (token, p)


def test_penalties_of_a_mixed_batch_follow_each_rows_own_settings() -> None:
    """Rows with different penalties (and one with none) in one step: each row gets its own
    formulas over its own tokens, the others are untouched."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 50, generator=generator) * 2
    settings = [{}, {"repetition_penalty": 1.3},
                {"presence_penalty": 1.5, "frequency_penalty": 0.8},
                {"repetition_penalty": 1.2, "presence_penalty": 0.4, "frequency_penalty": -0.5},
                {"repetition_penalty": 0.7}]
    contexts = [None, ([1, 2, 3], [4, 4]), ([5], [6, 6, 6, 7]), ([8, 9, 9], [8, 10, 10]),
                ([11, 12], [13])]
    params = [SamplingParams(temperature=0.0, **kwargs) for kwargs in settings]
    expected = [logits[0].tolist()] + [
        reference_penalties(logits[i].tolist(), *contexts[i], params[i]) for i in range(1, 5)]
    Sampler(torch.device("cpu"), seed=0).sample_async(
        logits, [f"r{i}" for i in range(5)], params, contexts)
    assert torch.allclose(logits, torch.tensor(expected), atol=1e-6)
