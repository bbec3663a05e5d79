"""`--chat-template` / `LLM.chat(chat_template=...)`: a template read as vLLM reads it, and a
tokenizer that renders with it while the model's own stays as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.model.chat_template import ChatTemplateError, read_chat_template
from kvtier.model.tokenizer import Tokenizer

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def test_a_file_is_read_and_an_inline_template_has_its_escapes_decoded(tmp_path: Path) -> None:
    file = tmp_path / "t.jinja"
    file.write_text("{{ messages[0]['content'] }}\\n stays as written — é")
    assert read_chat_template(str(file)) == file.read_text()
    assert read_chat_template("{{ x }}\\n→ é 你") == "{{ x }}\n→ é 你"


def test_a_path_that_cannot_be_read_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'no/such.jinja' looks like a file path, but it "
                                         "cannot be read"):
        read_chat_template("no/such.jinja")


def test_the_override_renders_and_the_models_template_stays(
        smollm_tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    own = smollm_tokenizer.apply_chat_template(messages)
    custom = smollm_tokenizer.with_chat_template(TEMPLATE)
    assert custom.apply_chat_template(messages) == "<user>hi"
    assert smollm_tokenizer.apply_chat_template(messages) == own != "<user>hi"
    assert custom.encode("<user>hi") == smollm_tokenizer.encode("<user>hi")


def test_a_template_that_is_not_jinja_is_refused_with_its_line(
        smollm_tokenizer: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match=r"not valid Jinja: .* \(line 2\)"):
        smollm_tokenizer.with_chat_template("ok\n{% for %}")
