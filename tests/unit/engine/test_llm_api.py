"""The offline `kvtier.LLM` API against a real tiny engine: the prompt and message shapes
vLLM's `LLM.generate` and `LLM.chat` take."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import LLM, InvalidRequestError, SamplingParams
from kvtier.config import ConfigError

MODEL = "random:tiny-llama"
GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    with LLM(MODEL, max_model_len=128, num_gpu_blocks_override=64) as engine:
        yield engine


def test_vllm_prompt_dicts_are_read_as_their_prompt_not_their_keys(llm: LLM) -> None:
    text = llm.generate("Hello there", GREEDY)[0]
    ids = llm.generate([[5, 6, 7]], GREEDY)[0]
    one = llm.generate({"prompt": "Hello there"}, GREEDY)
    many = llm.generate([{"prompt": "Hello there"}, {"prompt_token_ids": [5, 6, 7]}], GREEDY)
    assert len(one) == 1 and len(many) == 2
    for output, expected in ((one[0], text), (many[0], text), (many[1], ids)):
        assert output.prompt_token_ids == expected.prompt_token_ids
        assert output.outputs[0].token_ids == expected.outputs[0].token_ids
    assert one[0].prompt == "Hello there" and many[1].prompt is None


def test_a_prompt_dict_with_other_keys_is_refused(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        llm.generate({"text": "Hello"}, GREEDY)
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        llm.generate([{"prompt": "a", "prompt_token_ids": [5]}], GREEDY)


def test_chat_takes_openai_text_content_parts(llm: LLM) -> None:
    """vLLM's `LLM.chat` takes a message's content as a list of text parts, joined by
    newlines for a template that reads a string."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                          {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hello\nthere"}]
    out, expected = llm.chat(parts, GREEDY)[0], llm.chat(joined, GREEDY)[0]
    assert out.prompt_token_ids == expected.prompt_token_ids
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids
    with pytest.raises(InvalidRequestError, match="text parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                 GREEDY)


def test_sampling_params_take_vllms_none_for_bad_words(llm: LLM) -> None:
    """vLLM's SamplingParams default `bad_words` is None; passing it means no bad words."""
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, bad_words=None)
    assert params.bad_words == ()
    out = llm.generate([[5, 6, 7]], params)[0]
    assert out.outputs[0].token_ids == llm.generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_an_interrupted_generate_leaves_no_request_in_the_engine(async_scheduling: bool) -> None:
    """Ctrl-C (here raised by the engine's third launch) while generate runs: its requests
    are aborted, their KV blocks freed, and the next call runs its own prompts only."""
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = [list(range(100, 160)), list(range(300, 340))]
    with LLM(MODEL, max_model_len=128, num_gpu_blocks_override=64,
             async_scheduling=async_scheduling) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        engine, launch, launches = llm.engine, llm.engine.launch_step, [0]

        def interrupted_launch():  # type: ignore[no-untyped-def]
            launches[0] += 1
            if launches[0] == 3:
                raise KeyboardInterrupt
            return launch()

        engine.launch_step = interrupted_launch  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, params)
        assert not engine.has_unfinished_requests()
        assert engine.pool.num_free_blocks == engine.pool.num_blocks
        again = llm.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in again] == expected
        assert not engine.has_unfinished_requests()


def test_generate_without_params_samples_as_the_generation_config_says(tmp_path: Path) -> None:
    """As vLLM's `LLM`: no sampling params means `get_default_sampling_params()`, which is
    the generation config (here a folder's, greedy and 4 tokens long) under the overrides."""
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.0, "max_new_tokens": 4, "eos_token_id": 2}))
    with LLM(MODEL, max_model_len=128, num_gpu_blocks_override=64,
             generation_config=str(tmp_path),
             override_generation_config={"repetition_penalty": 1.2}) as llm:
        defaults = llm.get_default_sampling_params()
        assert defaults == SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.2)
        outputs = llm.generate(["Hello there", "Hello there"])
        greedy = llm.generate("Hello there", defaults)[0].outputs[0].token_ids
        assert [o.outputs[0].token_ids for o in outputs] == [greedy, greedy]
        assert 1 <= len(greedy) <= 4


def test_a_bad_generation_config_fails_the_engines_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the folder has no generation_config.json"):
        LLM(MODEL, generation_config=str(tmp_path))


def test_a_cache_salt_shares_cached_kv_only_with_the_same_salt(llm: LLM) -> None:
    """vLLM's `cache_salt`: a salted prompt takes no prefix-cache hit from unsalted or
    other-salt runs of the same tokens, and hits its own salt's; the tokens never change."""
    prompt = list(range(200, 260))  # 3 full blocks of 16 and then some
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.reset_prefix_cache()
    runs = [llm.generate({"prompt_token_ids": prompt, **salt}, params)[0] for salt in (
        {}, {}, {"cache_salt": "tenant-a"}, {"cache_salt": "tenant-a"},
        {"cache_salt": "tenant-b"})]
    assert [r.num_cached_tokens for r in runs] == [0, 48, 0, 48, 0]
    assert len({tuple(r.outputs[0].token_ids) for r in runs}) == 1
    for bad in ("", 7):
        with pytest.raises(InvalidRequestError, match="cache_salt must be a non-empty string"):
            llm.generate({"prompt_token_ids": prompt, "cache_salt": bad}, params)


def test_chat_passes_tools_and_template_kwargs_to_the_template(llm: LLM) -> None:
    template = ("{% if tools %}[{{ tools | length }} tools]{% endif %}"
                "{% if enable_thinking is false %}[no thinking]{% endif %}"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    out = llm.chat([{"role": "user", "content": "hi"}], params, chat_template=template,
                   tools=tools, chat_template_kwargs={"enable_thinking": False})[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode(
        "[1 tools][no thinking]hi", add_special_tokens=False)
