"""Tokenizer, chat template and incremental detokenizer.

One `Tokenizer` wraps a `tokenizers.Tokenizer` (Rust, fast) loaded from either
a Hugging Face checkpoint directory (`tokenizer.json`, optionally
`tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`) or a
GGUF file, whose vocabulary and merges are turned into a byte-level BPE
directly. Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM, ...) and
SentencePiece-style ones (Llama 2, Mistral, Gemma: ``model.sentencepiece``) are
supported: the detokenizer works on the raw bytes of each token.

Chat templates are rendered the way `transformers` renders them (sandboxed
Jinja, `trim_blocks`/`lstrip_blocks`, `raise_exception`, `strftime_now`, a
`tojson` that does not escape HTML), within the bounds of `model.chat_template`.
A checkpoint without a template gets `DEFAULT_CHAT_TEMPLATE` (ChatML). Text a
user supplies never becomes control tokens: `encode` parses no special tokens
unless asked, and `encode_chat` keeps the template's markers apart from the
messages.
"""

from __future__ import annotations

import codecs
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from model.chat_template import (
    ChatTemplate,
    FinalMessageNotShown,
    TemplateError,
    mark_user_text,
    special_pattern,
    unmark,
)
from model.loading.errors import ModelFileError
from model.loading.gguf_format import read_gguf_header
from model.sentencepiece import (
    GEMMA_ARCHS,
    SentencePieceError,
    from_gguf_vocab,
    is_sentencepiece,
    piece_bytes,
    strips_first_space,
)

logger = logging.getLogger(__name__)

# Used when a checkpoint ships no template: ChatML, which most small chat models
# (SmolLM, Qwen) were tuned on and which needs no special-token names.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format, for Gemma files that ship no template (the GGUF exports
# often do not): the system prompt goes before the first user turn, the
# assistant's role is called "model", the text starts with BOS.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set offset = 0 %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set offset = 1 %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages[offset:] %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Special tokens that end a turn in the chat formats we know. Generation must
# stop on them even when the checkpoint names another token as its EOS.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
)

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as the models define them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# These use GPT-2's own regex (the ByteLevel pre-tokenizer's); no warning for them.
_GPT2_LIKE_PRE = frozenset({"default", "gpt-2", "gpt2", "smollm"})


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or a chat template failed."""


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-to-unicode table: printable bytes stand for themselves, the
    rest are shifted to code points from 256 up, so every token is printable text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return table


_BYTE_TO_CHAR = _byte_to_char()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_BYTE_ALPHABET = frozenset(_CHAR_TO_BYTE)


class Tokenizer:
    """Text <-> token ids, special tokens, the chat template. Thread-safe for reads."""

    def __init__(
        self,
        backend: _Backend,
        *,
        source: str,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_eos_ids: Sequence[int] = (),
        chat_template: str | None,
        add_bos: bool,
        add_eos: bool = False,
    ) -> None:
        # the decoder alone: serialising the whole backend costs seconds on large vocabularies
        decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder else None
        # How tokens spell bytes: GPT-2's byte alphabet, or SentencePiece's ▁ and <0xNN>.
        self.sentencepiece = is_sentencepiece(decoder)
        if not self.sentencepiece and not isinstance(backend.decoder, decoders.ByteLevel):
            kind = decoder.get("type") if isinstance(decoder, dict) else None
            raise TokenizerError(
                f"{source}: unsupported tokenizer decoder {kind!r}; byte-level BPE and "
                "SentencePiece-style (byte fallback) tokenizers are supported"
            )
        self.strip_first_space = self.sentencepiece and strips_first_space(decoder)
        self._backend = backend
        self.source = source
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = add_bos and bos_token_id is not None
        # what encode(add_special_tokens=True) puts around the text
        self._prefix = [bos_token_id] if self.add_bos and bos_token_id is not None else []
        self._suffix = [eos_token_id] if add_eos and eos_token_id is not None else []
        added = backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, tok in added.items() if tok.special)
        self.eos_token_ids = self._end_ids(extra_eos_ids)
        self._specials = special_pattern([added[i].content for i in self.special_token_ids])
        # The same vocabulary with special-token parsing off, for text a user supplies
        # that spells a special token ("<|im_end|>" in it stays plain text). Text that
        # spells none splits the same in both, so the copy is made on first need:
        # serialising and parsing the backend costs ~0.17 s of start-up and ~10 MiB for
        # a 49,152-token vocabulary. Where a special token matches normalized text (the
        # spelling test would not be exact) it is made now and always used.
        self._plain_lock = threading.Lock()
        self._plain_backend: _Backend | None = None
        self._spelling_is_exact = backend.normalizer is None or not any(
            added[i].normalized for i in self.special_token_ids
        )
        if not self._spelling_is_exact:
            self._plain_for("")
        self.chat_template = chat_template
        self._template = _load_template(chat_template, source)
        self._token_bytes: dict[int, bytes] = {}
        self._probe_template()

    def _plain_for(self, text: str) -> _Backend:
        """The backend to encode ``text`` with special-token parsing off."""
        if self._specials is None:
            return self._backend  # no special tokens: nothing to parse
        if self._spelling_is_exact and not self._specials.search(text):
            return self._backend
        if self._plain_backend is None:
            with self._plain_lock:
                if self._plain_backend is None:
                    plain = _Backend.from_str(self._backend.to_str())
                    plain.encode_special_tokens = True
                    self._plain_backend = plain
        return self._plain_backend

    def _end_ids(self, extra_eos_ids: Sequence[int]) -> frozenset[int]:
        ids = {i for i in extra_eos_ids if 0 <= i < self.vocab_size}
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        for name in _END_OF_TURN_TOKENS:
            token_id = self._backend.token_to_id(name)
            if token_id is not None and token_id in self.special_token_ids:
                ids.add(token_id)
        return frozenset(ids)

    # -- loading ---------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """A checkpoint directory or a `.gguf` file."""
        path = Path(path)
        if path.is_dir():
            return cls.from_dir(path)
        if path.is_file() and path.suffix.lower() == ".gguf":  # as the registry accepts it
            return cls.from_gguf(path)
        raise TokenizerError(f"{path}: expected a checkpoint directory or a .gguf file")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{file}: cannot parse: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")
        bos = _token_id(backend, config.get("bos_token"))
        eos = _token_id(backend, config.get("eos_token"))
        gen_eos = _int_list(generation.get("eos_token_id"))
        if bos is None:
            bos = next(iter(_int_list(generation.get("bos_token_id"))), None)
        if eos is None and gen_eos:
            eos = gen_eos[0]
        add_bos, add_eos = _special_token_policy(backend, config, bos, eos)
        return cls(
            backend,
            source=str(path),
            bos_token_id=bos,
            eos_token_id=eos,
            extra_eos_ids=gen_eos,
            chat_template=_dir_chat_template(path, config),
            add_bos=add_bos,
            add_eos=add_eos,
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        start = time.perf_counter()
        meta = _read_gguf_metadata(Path(path))
        kind = meta.get("tokenizer.ggml.model")
        if kind is None:
            raise TokenizerError(f"{path}: no tokenizer metadata (tokenizer.ggml.model)")
        if kind not in ("gpt2", "llama"):
            raise TokenizerError(
                f"{path}: tokenizer model {kind!r} unsupported; 'gpt2' (byte-level BPE) "
                "and 'llama' (SentencePiece) are"
            )
        tokens = _meta_list(meta, "tokenizer.ggml.tokens", str, path)
        types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
        arch = meta.get("general.architecture")
        template = meta.get("tokenizer.chat_template")
        if kind == "llama":
            backend = _sentencepiece(meta, tokens, types, str(arch), path)
            if template is None and arch in GEMMA_ARCHS:
                template = GEMMA_CHAT_TEMPLATE
        else:
            merges = _meta_list(meta, "tokenizer.ggml.merges", str, path)
            backend = _byte_level_bpe(tokens, merges, types, meta.get("tokenizer.ggml.pre"), path)
        extra = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        tokenizer = cls(
            backend,
            source=str(path),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            extra_eos_ids=[i for i in extra if isinstance(i, int)],
            chat_template=template,
            # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        )
        logger.debug("tokenizer from %s in %.3f s", path, time.perf_counter() - start)
        return tokenizer

    # -- export ----------------------------------------------------------------

    def save_pretrained(self, path: str | Path, model_max_length: int | None = None) -> list[Path]:
        """Write a Hugging Face tokenizer directory (``tokenizer.json``,
        ``tokenizer_config.json`` with the chat template, ``special_tokens_map.json``) that
        ``transformers.AutoTokenizer`` loads to the same ids as ``encode``. Returns the files."""
        from tokenizers import processors

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        backend = _Backend.from_str(self._backend.to_str())
        if self._prefix or self._suffix:  # what encode(add_special_tokens=True) adds
            before = [self._token_text(i) for i in self._prefix]
            after = [self._token_text(i) for i in self._suffix]
            pieces = {(self._token_text(i), i) for i in [*self._prefix, *self._suffix]}
            backend.post_processor = processors.TemplateProcessing(
                single=" ".join([*before, "$A", *after]), special_tokens=sorted(pieces)
            )
        files = [out / "tokenizer.json", out / "tokenizer_config.json"]
        backend.save(str(files[0]))
        special = {
            key: self._token_text(token_id)
            for key, token_id in (
                ("bos_token", self.bos_token_id),
                ("eos_token", self.eos_token_id),
            )
            if token_id is not None
        }
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "add_bos_token": self.add_bos,
            "add_eos_token": bool(self._suffix),
            "model_max_length": model_max_length or 1_000_000_000,
            "chat_template": self.chat_template or DEFAULT_CHAT_TEMPLATE,
            **special,
        }
        files[0].parent.joinpath("tokenizer_config.json").write_text(json.dumps(config, indent=2))
        files.append(out / "special_tokens_map.json")
        files[2].write_text(json.dumps(special, indent=2))
        return files

    # -- text <-> ids ----------------------------------------------------------

    def encode(
        self, text: str, add_special_tokens: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Token ids of ``text``. Special-token spellings in it (e.g. "<|im_start|>")
        stay plain text unless ``parse_special``: text from users must never forge
        control tokens. ``add_special_tokens`` adds the model's BOS/EOS around it."""
        backend = self._backend if parse_special else self._plain_for(text)
        ids: list[int] = backend.encode(text, add_special_tokens=False).ids
        return [*self._prefix, *ids, *self._suffix] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        # the backend silently drops unknown ids; a caller's mistake must not vanish
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            self._bad_id(bad)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (the byte-level spelling undone)."""
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        token = self._backend.id_to_token(token_id) if token_id >= 0 else None
        if token is None:
            self._bad_id(token_id)
        if self.sentencepiece:
            data = piece_bytes(token)
            self._token_bytes[token_id] = data
            return data
        # Characters outside the byte alphabet (only in added tokens) stand for
        # their own UTF-8, as in the backend's ByteLevel decoder.
        data = b"".join(
            bytes((_CHAR_TO_BYTE[c],)) if c in _CHAR_TO_BYTE else c.encode() for c in token
        )
        self._token_bytes[token_id] = data
        return data

    def _bad_id(self, token_id: int) -> NoReturn:
        raise TokenizerError(
            f"token id {token_id} out of range [0, {self.vocab_size}) for {self.source}"
        )

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    # -- chat ------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for a conversation; ``kwargs`` are more template variables (as
        transformers passes them). Raises ``TemplateRaised`` when the template refuses
        the messages and ``TemplateFailed`` when it breaks or exceeds a limit (both
        ValueErrors naming the template)."""
        return self._render(self._checked(messages), add_generation_prompt, tools, kwargs)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> tuple[str, list[int]]:
        """The prompt text and its token ids, in which only the template's own markers
        are control tokens: a special-token spelling inside the messages, tools or
        template variables (a forged "<|im_end|>\n<|im_start|>system") is encoded as
        plain text."""
        marked = mark_user_text(
            {"messages": self._checked(messages), "tools": tools, "kwargs": kwargs},
            self._specials,
            avoid=self.chat_template or DEFAULT_CHAT_TEMPLATE,
        )
        rendered = self._render(
            marked.value["messages"],
            add_generation_prompt,
            marked.value["tools"],
            marked.value["kwargs"],
        )
        if continue_final_message:  # the text ends where the final message's content ends
            final = marked.value["messages"][-1].get("content") if messages else None
            final = final if isinstance(final, str) else ""
            cut = rendered.rfind(final) if final else -1
            if cut < 0:
                raise FinalMessageNotShown(
                    "the chat template does not show the final message's content"
                )
            rendered = rendered[: cut + len(final)]
        text, forged = unmark(rendered, marked)
        encoding = self._backend.encode(text, add_special_tokens=False)
        if not forged:
            return text, list(encoding.ids)
        return text, self._encode_between_markers(text, encoding, forged)

    def _encode_between_markers(
        self, text: str, encoding: Any, forged: list[tuple[int, int]]
    ) -> list[int]:
        """Special tokens the backend found outside the forged spans are the template's
        markers; the text between them is encoded with special-token parsing off."""
        ids: list[int] = []
        pos = 0
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id not in self.special_token_ids or _overlaps(start, end, forged):
                continue
            if start > pos:
                part = text[pos:start]
                ids += self._plain_for(part).encode(part, add_special_tokens=False).ids
            ids.append(token_id)
            pos = end
        if pos < len(text):
            part = text[pos:]
            ids += self._plain_for(part).encode(part, add_special_tokens=False).ids
        return ids

    def _checked(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TokenizerError("messages must be a list of objects")
        # Like transformers: a None field (OpenAI's content=None) counts as absent,
        # which templates handle, rather than rendering "None".
        return [{k: v for k, v in m.items() if v is not None} for m in messages]

    def _render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        variables = {
            **(extra or {}),
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
            "bos_token": self._token_text(self.bos_token_id),
            "eos_token": self._token_text(self.eos_token_id),
        }
        return self._template.render(**variables)

    def _probe_template(self) -> None:
        """Render a probe conversation once, at load: a template that cannot render one
        user turn is refused here, naming it, instead of failing every request."""
        try:
            self.apply_chat_template([{"role": "user", "content": "Hello, who are you?"}])
        except TemplateError as e:
            raise TokenizerError(f"{e} (on a probe conversation, at load)") from e

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self._backend.id_to_token(token_id) or "")


class IncrementalDetokenizer:
    """Token ids in, text deltas out, each valid UTF-8 and O(1) amortised per token.

    Works on token bytes through an incremental UTF-8 decoder: the bytes of a
    character split across tokens are held back (at most 3) until it completes.
    Bytes that can never become valid are replaced by U+FFFD at once, as
    `Tokenizer.decode` does; an incomplete tail becomes U+FFFD only in `flush`.
    Concatenated deltas equal `decode(ids)` for the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []
        # SentencePiece decoders drop the space prepended to the text: the first one out.
        self._strip = tokenizer.strip_first_space

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        return self._emit(self._decoder.decode(self._tokenizer.token_bytes(token_id)))

    def flush(self) -> str:
        return self._emit(self._decoder.decode(b"", final=True))

    @property
    def text(self) -> str:
        """Everything emitted so far (O(length): read it at the end, not per token)."""
        joined = "".join(self._pieces)
        self._pieces = [joined]
        return joined

    def _emit(self, delta: str) -> str:
        if delta and self._strip:
            self._strip = False
            delta = delta.removeprefix(" ")
        if delta:
            self._pieces.append(delta)
        return delta


# -- chat template -------------------------------------------------------------


def _load_template(source: str | None, origin: str) -> ChatTemplate:
    try:
        return ChatTemplate(source or DEFAULT_CHAT_TEMPLATE, origin)
    except TemplateError as e:
        raise TokenizerError(str(e)) from e


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return any(start < b and a < end for a, b in spans)


def _dir_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


# -- checkpoint directory ------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{file}: cannot read: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{file}: expected a JSON object")
    return data


def _token_id(backend: _Backend, token: Any) -> int | None:
    if isinstance(token, dict):  # older configs spell special tokens as AddedToken dicts
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _int_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _special_token_policy(
    backend: _Backend, config: dict[str, Any], bos: int | None, eos: int | None
) -> tuple[bool, bool]:
    """Whether encode adds BOS / EOS: the config's flags when it has them (they
    override the post-processor in transformers), else what the post-processor does."""
    probe = backend.encode("", add_special_tokens=True).ids
    add_bos = config.get("add_bos_token", bos is not None and probe[:1] == [bos])
    add_eos = config.get("add_eos_token", eos is not None and probe[-1:] == [eos])
    return bool(add_bos), bool(add_eos)


# -- GGUF ----------------------------------------------------------------------


def _byte_level_bpe(
    tokens: list[str], merges: list[str], types: list[int], pre: Any, path: Path | str
) -> _Backend:
    # A token not spelled in the byte alphabet is stored as plain text: respell
    # its UTF-8 bytes so BPE can find it (as transformers' GGUF import does). One
    # test over all the text first: most vocabularies need no respelling, and token
    # by token the test takes ~35 ms of start-up for 49,152 tokens.
    if set("".join(tokens)) <= _BYTE_ALPHABET:
        vocab = dict(zip(tokens, range(len(tokens)), strict=True))
    else:
        vocab = {
            t if set(t) <= _BYTE_ALPHABET else "".join(_BYTE_TO_CHAR[b] for b in t.encode()): i
            for i, t in enumerate(tokens)
        }
    pairs = [_merge_pair(m, path) for m in merges]
    try:
        backend = _Backend(BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    except Exception as e:  # the Rust side raises a bare Exception
        raise TokenizerError(f"{path}: invalid vocabulary or merges: {e}") from e
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are matched whole and are special; a
    # control token outside the byte alphabet is a converter mislabel: skipped.
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _CONTROL and set(t) <= _BYTE_ALPHABET
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types, strict=False)
            if kind == _USER_DEFINED and t in vocab
        ]
    )
    return backend


def _sentencepiece(
    meta: dict[str, Any], tokens: list[str], types: list[int], arch: str, path: Path | str
) -> _Backend:
    scores = meta.get("tokenizer.ggml.scores")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    try:
        return from_gguf_vocab(
            tokens,
            scores if isinstance(scores, list) else None,
            types,
            arch,
            unk if isinstance(unk, int) else None,
        )
    except SentencePieceError as e:
        raise TokenizerError(f"{path}: {e}") from e


def _merge_pair(merge: str, path: Path | str) -> tuple[str, str]:
    left, _, right = merge.partition(" ")
    if not left or not right or " " in right:
        raise TokenizerError(f"{path}: merge {merge!r} is not two tokens separated by a space")
    return left, right


def _pre_tokenizer(pre: Any) -> pre_tokenizers.PreTokenizer:
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM's own tokenizer.json: digits one by one, then GPT-2's regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    split = _PRE_SPLITS.get(pre) if isinstance(pre, str) else None
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre is not None and pre not in _GPT2_LIKE_PRE:
        logger.warning("unknown GGUF pre-tokenizer %r: using GPT-2's split regex", pre)
    return gpt2


def _meta_list(meta: dict[str, Any], key: str, kind: type, path: Path | str) -> list[Any]:
    value = meta.get(key)
    # by exact type, in C: a vocabulary is tens of thousands of items
    if not isinstance(value, list) or not set(map(type, value)) <= {kind}:
        raise TokenizerError(f"{path}: {key} missing or not a list of {kind.__name__}")
    return value


def _read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The key-value metadata of a GGUF file, through the loader's bounded reader.

    Numeric arrays come back as numpy arrays; the tokenizer wants plain lists.
    """
    try:
        header = read_gguf_header(path)
    except ModelFileError as e:
        raise TokenizerError(str(e)) from e
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in header.metadata.items()}
