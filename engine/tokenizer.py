"""Tokenizer, chat template and incremental detokenization. Imports neither torch nor transformers.

`Tokenizer` wraps a `tokenizers.Tokenizer` loaded from an HF-style model directory and reproduces
what `transformers.AutoTokenizer` does with the same files: `encode` equals `tok(text)["input_ids"]`,
`render_chat`/`encode_chat` equal `apply_chat_template`. `IncrementalDetokenizer` turns sampled
ids into text pieces that are safe to stream, cutting at stop strings.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream


class ChatTemplateError(ValueError):
    """The chat template is missing, invalid, or rejected the messages (`raise_exception`)."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class Tokenizer:
    """An HF fast tokenizer plus the model's special-token ids and chat template."""

    def __init__(self, tok: _HFTokenizer, tokenizer_config: dict[str, Any] | None = None,
                 model_config: dict[str, Any] | None = None,
                 generation_config: dict[str, Any] | None = None,
                 chat_template: str | None = None) -> None:
        self._tok = tok
        cfg = tokenizer_config or {}
        model_config = model_config or {}
        generation_config = generation_config or {}
        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        self.unk_token = _token_content(cfg.get("unk_token"))
        self.pad_token = _token_content(cfg.get("pad_token"))
        self._chat_template = chat_template if chat_template is not None else _pick_template(cfg)
        # Special tokens around the text (BOS/EOS) come from tokenizer.json's post-processor alone:
        # transformers 5 ignores add_bos_token/add_eos_token in tokenizer_config.json whenever a
        # tokenizer.json exists (the GGUF conversion bakes add_bos_token into the post-processor).
        bos_id = self._id_of(self.bos_token)
        self._bos_token_id = bos_id if bos_id is not None else (
            _as_ids(model_config.get("bos_token_id")) or [None])[0]
        eos: list[int] = []
        for ident in (_as_ids(generation_config.get("eos_token_id"))
                      + _as_ids(model_config.get("eos_token_id"))
                      + _as_ids(self._id_of(self.eos_token))):
            if ident not in eos:
                eos.append(ident)
        self._eos_token_ids = tuple(eos)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json, config.json and generation_config.json."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} not found (Tandem needs a fast tokenizer.json)")
        template = None
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():  # newer transformers save the template in its own file
            template = jinja_file.read_text(encoding="utf-8")
        return cls(_HFTokenizer.from_file(str(path)),
                   tokenizer_config=_read_json(model_dir / "tokenizer_config.json"),
                   model_config=_read_json(model_dir / "config.json"),
                   generation_config=_read_json(model_dir / "generation_config.json"),
                   chat_template=template)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # ------------------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: generation_config, config and tokenizer EOS, deduplicated."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    # -------------------------------------------------------------------------------- encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids for `text`, as `AutoTokenizer(text)["input_ids"]` (BOS only if configured)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # --------------------------------------------------------------------------- chat template

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if not self._chat_template:
            raise ChatTemplateError(
                "this model has no chat template (tokenizer_config.json has no `chat_template` and "
                "there is no chat_template.jinja); use a completion request or a model with one")
        try:
            return _jinja_env().from_string(self._chat_template)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"invalid chat template: {e}") from e

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> str:
        """The prompt text for `messages`, rendered like transformers' `apply_chat_template`."""
        variables: dict[str, Any] = {
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "unk_token": self.unk_token, "pad_token": self.pad_token,
        }
        variables = {k: v for k, v in variables.items() if v is not None}
        variables.update(extra)
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> list[int]:
        """Ids of the rendered chat (special tokens are not added again, as in transformers)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False)


def _pick_template(cfg: dict[str, Any]) -> str | None:
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return by_name.get("default") or next(iter(by_name.values()), None)
    return template if isinstance(template, str) else None


# ----------------------------------------------------------------------------------- jinja env


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Unlike jinja2's built-in filter this does not HTML-escape ('<' stays '<').
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used for assistant masks) and renders the
    body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


_ENV: ImmutableSandboxedEnvironment | None = None


def _jinja_env() -> ImmutableSandboxedEnvironment:
    global _ENV
    if _ENV is None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationTag, loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        _ENV = env
    return _ENV


# ------------------------------------------------------------------------- incremental decoding


class IncrementalDetokenizer:
    """Streams text for one request: feed sampled ids, get text that is safe to emit now.

    Text that could still be the start of a stop string is held back until it is ruled out; when
    a stop string appears, the text up to (not including) its first occurrence is released and
    `stop_hit` is reported. `flush()` releases held-back text when the request ends otherwise.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._skip_special = skip_special_tokens
        self._stops = tuple(s for s in dict.fromkeys(stop) if s)
        self._ids: list[int] = []
        self._pending = ""   # decoded but not yet emitted
        self._emitted: list[str] = []
        self._stopped = False
        self._flushed = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Decode `token_ids`; return (text safe to emit now, whether a stop string was hit)."""
        if self._stopped or self._flushed:
            return "", self._stopped
        tok = self._tokenizer._tok
        for token_id in token_ids:
            self._ids.append(int(token_id))
            piece = self._stream.step(tok, int(token_id))
            if piece:
                self._pending += piece
        if not self._stops:
            return self._emit(len(self._pending)), False
        # An occurrence can only start inside `pending`: emitted text never ends with a prefix
        # of a stop string (that tail is held back).
        first = -1
        for stop in self._stops:
            idx = self._pending.find(stop)
            if idx != -1 and (first == -1 or idx < first):
                first = idx
        if first != -1:
            out = self._emit(first)
            self._pending = ""
            self._stopped = True
            return out, True
        return self._emit(len(self._pending) - self._held_back_len()), False

    def _held_back_len(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of a stop string."""
        text = self._pending
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _emit(self, n: int) -> str:
        out, self._pending = self._pending[:n], self._pending[n:]
        if out:
            self._emitted.append(out)
        return out

    def flush(self) -> str:
        """Release held-back text (the request ended without a stop string)."""
        if self._stopped or self._flushed:
            return ""
        self._flushed = True
        # Trailing ids that do not complete a UTF-8 character are still inside the stream; the
        # full decode renders them (as U+FFFD), so take the tail from there.
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special)
        done = self.text + self._pending
        if len(full) > len(done) and full.startswith(done):
            self._pending = full[len(self.text):]
        return self._emit(len(self._pending))
