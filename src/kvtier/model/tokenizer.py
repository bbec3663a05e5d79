"""Text <-> token ids for a model directory, with transformers' semantics but without transformers.

Owns: reading `tokenizer.json` / `tokenizer_config.json` (plus eos ids from `config.json` and
`generation_config.json`), encoding and decoding through the `tokenizers` library, rendering the
model's jinja chat template exactly the way `transformers.PreTrainedTokenizer.apply_chat_template`
does, and streaming detokenization (`IncrementalDetokenizer`).

Parity with `AutoTokenizer` is what the tests check; where transformers has a rule that changes ids
(it rebuilds the post-processor when `add_bos_token`/`add_eos_token` are stated), it is copied here.
"""

from __future__ import annotations

import codecs
import copy
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import tokenizers
from tokenizers import processors

from kvtier.model.chat_template import (
    ChatTemplateError,
    check_chat_template,
    compile_chat_template,
)
from kvtier.model.piece_cache import PieceIdsCache
from kvtier.model.spec import ModelLoadError

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                        "cls_token", "mask_token")
_REPLACEMENT_CHAR = "\ufffd"

QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
"""The pre-tokenizer regex of Qwen2/2.5/3: every digit is a piece of its own."""
PARALLEL_MIN_CHARS = 4096
"""Texts at least this long are cut into pieces tokenised in parallel (when that is exact)."""
PARALLEL_CHUNK_CHARS = 2048
_CUT_AFTER = re.compile(r"[A-Za-z](?= )|[0-9](?=[\x00-\x7f])")
"""An ASCII letter followed by a space, or an ASCII digit followed by an ASCII character:
see `cut_pieces`."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the few settings from `tokenizer_config.json` that matter.

    Takes ownership of `backend` (its post-processor may be rebuilt, as transformers does).
    Its settings are fixed at construction, and it is safe to share between threads (the
    piece cache locks). `eos_token_id` is the tokenizer config's eos (as in transformers);
    when that is unset it falls back to the smallest of `eos_token_ids`, the set a
    generation loop should stop on.
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: Mapping[str, Any],
                 extra_eos_token_ids: Iterable[int] = ()) -> None:
        self.backend = backend
        self._token_bytes_tables: dict[bool, list[bytes | None]] = {}
        """Per skip_special_tokens: the byte table `token_bytes` builds once."""
        self.chat_template: str | None = _pick_chat_template(config.get("chat_template"))
        self._compiled_template: jinja2.Template | None = None
        self.special_tokens = {name: token for name in _SPECIAL_TOKEN_NAMES
                               if (token := _token_content(config.get(name))) is not None}
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._special_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            # transformers' TokenizersBackend rebuilds the post-processor in exactly this case.
            self._set_post_processor(bool(config.get("add_bos_token", False)),
                                     bool(config.get("add_eos_token", False)))
        self.cuts_into_pieces = piece_cuts_are_exact(backend)
        """Long texts are tokenised as pieces in parallel (see `cut_pieces`)."""
        self.piece_ids = PieceIdsCache()
        """Ids of earlier long texts' pieces (used when `cuts_into_pieces`)."""
        self.bos_token_id = self._token_id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self._token_id(self.special_tokens.get("eos_token"))
        eos_ids = {int(i) for i in extra_eos_token_ids}
        if self.eos_token_id is not None:
            eos_ids.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        if self.eos_token_id is None and eos_ids:
            self.eos_token_id = min(eos_ids)

    @staticmethod
    def from_dir(path: str | Path, *, chat_template: str | None = None,
                 extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Load `path/tokenizer.json` and friends.

        `chat_template` is used only when the directory has none (e.g. a base model's tokenizer
        serving a random-weight model); `extra_eos_token_ids` adds stop ids that a config
        outside the directory declares.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust error type is not importable
            raise ModelLoadError(f"{tokenizer_file}: cannot be parsed: {exc}") from exc
        config = dict(_read_json(path / "tokenizer_config.json") or {})
        template_file = path / "chat_template.jinja"
        if not config.get("chat_template") and template_file.is_file():
            try:
                config["chat_template"] = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelLoadError(f"{template_file}: cannot be read: {exc}") from exc
        if not config.get("chat_template") and chat_template is not None:
            config["chat_template"] = chat_template
        eos_ids = set(extra_eos_token_ids)
        for name in ("config.json", "generation_config.json"):
            eos = (_read_json(path / name) or {}).get("eos_token_id")
            try:
                eos_ids.update(_as_id_list(eos))
            except (TypeError, ValueError):
                raise ModelLoadError(f"{path / name}: eos_token_id must be a token id or a list "
                                     f"of them, got {eos!r}") from None
        return Tokenizer(backend, config, eos_ids)

    # -- ids ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included (= len(HF tok))."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of added tokens flagged special; `decode(skip_special_tokens=True)` drops these."""
        return self._special_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, not encode: the same ids, but it releases the GIL while it runs
        # (~23 ms for a 4,300-token prompt). The server tokenises on worker threads; with
        # encode, each long prompt froze its event loop, and every stream with it. A long
        # prompt's pre-tokenizer regex dominates that time and runs on one core, so where it
        # is exact, the text goes in pieces that the library's threads encode at once, and
        # pieces an earlier text already had are not encoded again.
        if self.cuts_into_pieces and len(text) >= PARALLEL_MIN_CHARS:
            return self._encode_pieces(text, add_special_tokens)
        return self._encode_batch([text], add_special_tokens, text)[0].ids  # a fresh list

    def _encode_pieces(self, text: str, add_special_tokens: bool) -> list[int]:
        # Under `cuts_into_pieces` the post-processor adds no ids, so a piece's ids do not
        # depend on `add_special_tokens` nor on where the piece stands: the text is the key.
        # The last piece is looked up but not kept: what follows a known part of a prompt
        # is rarely repeated as such.
        pieces = cut_pieces(text, PARALLEL_CHUNK_CHARS)
        ids: list[list[int] | None] = [self.piece_ids.get(p) for p in pieces[:-1]] + [None]
        missing = [i for i, known in enumerate(ids) if known is None]
        encodings = self._encode_batch([pieces[i] for i in missing], add_special_tokens, text)
        for i, encoding in zip(missing, encodings, strict=True):
            ids[i] = encoding.ids
            if i < len(pieces) - 1:
                self.piece_ids.put(pieces[i], encoding.ids)
        return [token for piece in ids for token in piece or ()]

    def _encode_batch(self, pieces: list[str], add_special_tokens: bool,
                      text: str) -> list[tokenizers.Encoding]:
        try:
            return self.backend.encode_batch(pieces, add_special_tokens=add_special_tokens)
        except TypeError:
            # tokenizers refuses a str that is not valid Unicode (a lone surrogate, which JSON
            # can carry as an escape) with an opaque TypeError: name the character instead.
            bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
            if bad is None:
                raise
            raise ValueError(f"the text is not valid Unicode: a lone surrogate "
                             f"(U+{ord(text[bad]):04X}) at character {bad}") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids the tokenizer does not know (e.g. a model's padded vocab rows) decode to nothing."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._clean_up(text)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Vocabulary spelling of each id (byte-level BPE shows a space as 'Ġ'); None if unknown."""
        return [self.backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        decoder = self.backend.decoder
        text = decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)
        return self._clean_up(text)

    # -- chat ---------------------------------------------------------------------------------

    def with_chat_template(self, template: str) -> Tokenizer:
        """This tokenizer, rendering chats with `template` instead of the model's (vLLM's
        `--chat-template`); a template that is not valid Jinja raises ChatTemplateError."""
        check_chat_template(template)
        other = copy.copy(self)  # shares the backend and its caches; only the template differs
        other.chat_template, other._compiled_template = template, None
        return other

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, *,
                            continue_final_message: bool = False,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            template_kwargs: Mapping[str, Any] | None = None) -> str:
        """Render `messages` as transformers' `apply_chat_template(..., tokenize=False)` would.

        Keys whose value is None are dropped from each message first (as transformers does), so
        OpenAI-style `{"content": None, "tool_calls": [...]}` messages render correctly.
        `continue_final_message` ends the text right after the last message's content (no
        end-of-turn), so the model continues that message, e.g. an assistant answer begun by
        the client; it excludes `add_generation_prompt`.
        Raises ModelLoadError when the model has no template, ValueError for the two flags
        together or a final message the rendering does not contain, and ChatTemplateError (a
        ValueError and a jinja2.TemplateError) when the template is not valid Jinja, fails to
        render, or rejects the conversation (its `raise_exception`).
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each "
                             "other: set add_generation_prompt to false")
        if not self.chat_template:
            raise ModelLoadError("this model's tokenizer has no chat template; use the completions "
                                 "API with a raw prompt instead")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        variables: dict[str, Any] = dict(self.special_tokens)
        variables.update(template_kwargs or {})
        if self._compiled_template is None:  # compiling costs milliseconds; rendering does not
            try:
                self._compiled_template = compile_chat_template(self.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise ChatTemplateError(f"the model's chat template is not valid Jinja: "
                                        f"{exc.message} (line {exc.lineno})") from exc
        try:
            rendered = self._compiled_template.render(
                messages=chat, tools=list(tools) if tools is not None else None,
                documents=None, add_generation_prompt=add_generation_prompt, **variables)
        except ChatTemplateError as exc:  # the template's raise_exception: its own words
            raise ChatTemplateError(f"the model's chat template refused the conversation: "
                                    f"{exc}") from None
        except Exception as exc:  # an undefined name, a sandbox refusal, a TypeError...
            raise ChatTemplateError(f"the model's chat template failed on this conversation: "
                                    f"{type(exc).__name__}: {exc}") from exc
        if continue_final_message:
            rendered = _cut_after_final_message(rendered, chat[-1].get("content"))
        return rendered

    # -- internals ----------------------------------------------------------------------------

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        return None if token_id is None else int(token_id)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos = self.special_tokens.get("bos_token")
        eos = self.special_tokens.get("eos_token")
        add_bos = add_bos and bos is not None and self._token_id(bos) is not None
        add_eos = add_eos and eos is not None and self._token_id(eos) is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        second_bos = f" {bos}:1" if add_bos else ""
        second_eos = f" {eos}:1" if add_eos else ""
        pair = f"{single}{second_bos} $B:1{second_eos}"
        special = [(t, self._token_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special)

    def token_bytes(self, skip_special_tokens: bool = True) -> list[bytes | None] | None:
        """The UTF-8 bytes each id decodes to, for byte-level BPE tokenizers (GPT-2 style:
        Qwen, Llama 3, SmolLM2); None for others. Special tokens map to None, or with
        `skip_special_tokens` false to their text. Built once each."""
        table = self._token_bytes_tables.get(skip_special_tokens)
        if table is None:
            if skip_special_tokens:
                table = _byte_level_table(self.backend, self._special_ids)
            else:  # the same table with the special ids filled in: no second pass over all
                table = _with_special_tokens(self.backend, self.token_bytes(True) or [],
                                             self._special_ids)
            self._token_bytes_tables[skip_special_tokens] = table
        return table or None

    def _clean_up(self, text: str) -> str:
        # transformers ignores clean_up_tokenization_spaces for BPE models: it corrupts them.
        if not self.clean_up_tokenization_spaces or isinstance(self.backend.model,
                                                               tokenizers.models.BPE):
            return text
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                              (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                              (" 're", "'re")):
            text = text.replace(before, after)
        return text


def _cut_after_final_message(rendered: str, content: Any) -> str:
    """The rendering up to the end of the final message's content (transformers' rule: its
    last occurrence, else that of its stripped text, which templates often trim)."""
    if isinstance(content, list | tuple):  # OpenAI content parts: the last one's text
        content = content[-1].get("text", "") if content else ""
    if not isinstance(content, str) or not content.strip():
        raise ValueError("continue_final_message needs a final message with text to continue")
    for text in (content, content.strip()):
        at = rendered.rfind(text)
        if at != -1:
            return rendered[:at + len(text)]
    raise ValueError("continue_final_message is set, but the chat template does not render "
                     "the final message's text")


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas without re-decoding the whole output.

    vLLM's prefix/read-offset scheme over the vocabulary spellings of the ids:

        tokens:  ... | prefix_offset ......... read_offset ......... len(tokens)
                       \\__ already emitted __/ \\__ not yet emitted __/

    Each `add` decodes tokens[prefix_offset:] and tokens[prefix_offset:read_offset]; the
    difference is new text. It is held back while it ends in U+FFFD (a UTF-8 sequence split across
    tokens), so a multi-byte character is emitted whole. The work per call is bounded by the
    window, not by the output length.

    The last few prompt tokens seed the window, so a decoder that drops a leading space at the
    start of a text (sentencepiece) still streams it; for byte-level BPE the concatenated deltas
    plus `finish()` equal `tokenizer.decode(output_ids)`. As in vLLM, a run of bytes that never
    forms valid UTF-8 holds text back until a later token resolves it (or `finish()`); with
    real vocabularies this is at most a couple of tokens. Not thread-safe: one per request.
    """

    _NUM_PROMPT_CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Byte-level BPE: each id is a fixed byte string, so an incremental UTF-8 decoder gives
        # the same text as decode() at O(1) per token (the window scheme below is general).
        table = tokenizer.token_bytes(skip_special_tokens)
        self._bytes = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        context = self._to_tokens(prompt_token_ids[-self._NUM_PROMPT_CONTEXT_TOKENS:])
        if tokenizer.convert_tokens_to_string(context).endswith(_REPLACEMENT_CHAR):
            # A prompt that ends mid-character would swallow the first output bytes; start clean.
            context = []
        self._tokens: list[str] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)
        self._pieces: list[str] = []
        self._num_fast_tokens = 0

    @property
    def text(self) -> str:
        """Output text emitted so far (the concatenation of every delta returned)."""
        return "".join(self._pieces)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append newly generated ids; return the text that became stable (often "")."""
        if self._bytes is not None:
            table, size = self._bytes, len(self._bytes)
            if len(token_ids) == 1:  # the usual decode step
                data = (table[token_ids[0]] if 0 <= token_ids[0] < size else None) or b""
            else:
                data = b"".join(b for b in (table[i] if 0 <= i < size else None
                                            for i in token_ids) if b is not None)
            delta = self._utf8.decode(data)
            if delta:
                self._pieces.append(delta)
            self._num_fast_tokens += len(token_ids)
            return delta
        self._tokens.extend(self._to_tokens(token_ids))
        to_string = self._tokenizer.convert_tokens_to_string
        prefix_text = to_string(self._tokens[self._prefix_offset:self._read_offset])
        new_text = to_string(self._tokens[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        self._pieces.append(delta)
        return delta

    def finish(self) -> str:
        """Emit whatever `add` held back (an incomplete character decodes as U+FFFD)."""
        if self._bytes is not None:
            delta = self._utf8.decode(b"", final=True)
            if delta:
                self._pieces.append(delta)
            return delta
        to_string = self._tokenizer.convert_tokens_to_string
        prefix_text = to_string(self._tokens[self._prefix_offset:self._read_offset])
        new_text = to_string(self._tokens[self._prefix_offset:])
        delta = new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self._tokens)
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def num_output_tokens(self) -> int:
        """Output tokens seen (ids unknown to the tokenizer or skipped as special not counted)."""
        return len(self._tokens) - self._num_context + self._num_fast_tokens

    def _to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        special = self._tokenizer.special_token_ids if self._skip_special else frozenset()
        tokens = self._tokenizer.convert_ids_to_tokens(
            [i for i in token_ids if i not in special])
        return [t for t in tokens if t is not None]


def _byte_level_table(backend: tokenizers.Tokenizer,
                      special_ids: frozenset[int]) -> list[bytes | None]:
    """Per-id bytes for a byte-level BPE tokenizer, or [] when the tokenizer is not one (or has
    a normalizer/decoder step that a byte table cannot reproduce). Special ids map to None."""
    if not isinstance(backend.decoder, tokenizers.decoders.ByteLevel) \
            or not isinstance(backend.model, tokenizers.models.BPE):
        return []
    spell = _speller(backend)
    table: list[bytes | None] = []
    for token_id in range(backend.get_vocab_size(with_added_tokens=True)):
        try:
            table.append(None if token_id in special_ids else spell(token_id))
        except KeyError:
            return []  # not a pure byte-level vocabulary: use the general path
    return table


def _with_special_tokens(backend: tokenizers.Tokenizer, table: list[bytes | None],
                         special_ids: frozenset[int]) -> list[bytes | None]:
    """`_byte_level_table`'s table with the special ids spelled out too (or [] where one of
    them cannot be)."""
    if not table:
        return []
    spell = _speller(backend)
    full = list(table)
    for token_id in special_ids:
        if token_id < len(full):
            try:
                full[token_id] = spell(token_id)
            except KeyError:
                return []
    return full


def _speller(backend: tokenizers.Tokenizer) -> Callable[[int], bytes | None]:
    """An id's bytes in a byte-level vocabulary (added tokens as written); KeyError where its
    spelling is not byte-level."""
    byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
    added = {token.content for token in backend.get_added_tokens_decoder().values()}

    def spell(token_id: int) -> bytes | None:
        token = backend.id_to_token(token_id)
        if token is None:
            return None
        if token in added:
            return token.encode()
        return bytes(byte_of[char] for char in token)

    return spell


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


# -- config helpers -----------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """tokenizer_config writes a special token as a string or as a serialised AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_chat_template(value: Any) -> str | None:
    """A template is a string, or a list of {"name", "template"} of which "default" is used."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def _as_id_list(value: Any) -> list[int]:
    """Token ids as JSON writes them: null, an id, or a list of ids (ValueError otherwise)."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(((isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, float) and v.is_integer())) and v >= 0 for v in values):
        raise ValueError(f"not a token id or a list of them: {value!r}")
    return [int(v) for v in values]


def cut_pieces(text: str, chunk_chars: int) -> list[str]:
    r"""`text` in pieces of about `chunk_chars` (fewer where no cut is found), each cut right
    after an ASCII letter that a space follows or after an ASCII digit that an ASCII character
    follows.

    Under `piece_cuts_are_exact` tokenizers the ids of the pieces, concatenated, are the ids
    of the text. The Qwen2 regex has no lookbehind, so matching right of a piece boundary
    depends on nothing left of it; both cuts are such boundaries, whatever surrounds them:
    no alternative matches a letter and a following space together (letters only run in
    `\p{L}+` or a contraction), none matches a digit with anything else (`\p{N}` is alone),
    and every alternative ending at the cut stops there alike whether the space (or the ASCII
    character) or the end of the text follows. NFC never composes an ASCII character with
    what precedes it.
    """
    pieces = []
    start = 0
    while len(text) - start > chunk_chars:
        found = _CUT_AFTER.search(text, start + chunk_chars)
        if found is None:
            break
        pieces.append(text[start:found.end()])
        start = found.end()
    pieces.append(text[start:])
    return pieces


def piece_cuts_are_exact(backend: tokenizers.Tokenizer) -> bool:
    """Whether `cut_pieces` pieces encode to exactly the ids of the whole text: an NFC (or
    no) normalizer, the Qwen2 split regex then byte-level mapping, no added token holding a
    digit or a space (none can span a cut), and a post-processor that adds no ids."""
    # Each component's own JSON: the whole tokenizer's would serialise its vocabulary and
    # merges (4.6 MB and ~0.35 s for Qwen) on every load.
    normalizer = _component_json(backend.normalizer)
    if normalizer is not None and normalizer.get("type") != "NFC":
        return False
    pre = _component_json(backend.pre_tokenizer) or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) != 2:
        return False
    split, byte_level = steps
    if (split.get("type") != "Split" or split.get("pattern") != {"Regex": QWEN2_SPLIT_PATTERN}
            or split.get("behavior") != "Isolated" or split.get("invert")
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex")
            or byte_level.get("add_prefix_space")):
        return False
    if any(re.search(r"[0-9 ]", token.content)
           for token in backend.get_added_tokens_decoder().values()):
        return False
    probe = "a1 b"
    return (backend.encode(probe, add_special_tokens=True).ids
            == backend.encode(probe, add_special_tokens=False).ids)


def _component_json(component: Any) -> dict[str, Any] | None:
    """A normalizer's or pre-tokenizer's settings, as tokenizer.json spells them."""
    return None if component is None else json.loads(component.__getstate__())
