"""engine.tokenizer: parity with transformers (encode, chat template), the GGUF-built tokenizer,
and IncrementalDetokenizer (streaming pieces, stop strings, flush)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer
from engine.weights import default_gguf_path

TEXTS = [
    "Hello, world!",
    "",
    " leading space",
    "   three leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n  indented\r\n",
    "digits 12345 and 3.14159 and 2024-11-24, x=100",
    "unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "special inline<|endoftext|>text<|im_end|>",
    "not special: <|im_start and <im_end|>",
    "I'm sure they'll've done it; it's John's.",
    "mixed\u00a0nbsp and zero\u200bwidth",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name 3 primes."}],
    [{"role": "user", "content": "Hi 😀"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Count: 1 2 3\n  indented"}],
    [{"role": "system", "content": "sys"},
     {"role": "user", "content": "u1"},
     {"role": "assistant", "content": "a1"}],
]


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def hf_tok(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def hf_gguf_tok():
    """transformers' own tokenizer built from the GGUF metadata: an independent check."""
    from transformers import AutoTokenizer

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _ids(result) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list
    return list(result["input_ids"]) if not isinstance(result, list) else result


# ------------------------------------------------------------------------------------- encode


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, hf_tok, text: str) -> None:
    assert tok.encode(text) == hf_tok(text)["input_ids"]
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_tokenizer_matches_transformers_gguf_loader(tok: Tokenizer, hf_gguf_tok,
                                                         text: str) -> None:
    # transformers' GGUF loader uses plain ByteLevel (no Digits split); SmolLM2's vocab has no
    # multi-digit tokens, so the ids agree on digits too.
    assert tok.encode(text) == hf_gguf_tok(text)["input_ids"]


def test_decode_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    ids = tok.encode("<|im_start|>héllo 😀 wörld<|im_end|>  x")
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


def test_known_smollm2_facts(tok: Tokenizer, hf_gguf_tok) -> None:
    assert tok.encode("<|endoftext|><|im_start|><|im_end|>") == [0, 1, 2]
    assert tok.id_to_token(1) == "<|im_start|>" and tok.id_to_token(2) == "<|im_end|>"
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and 2 in tok.eos_token_ids
    assert tok.chat_template == hf_gguf_tok.chat_template
    assert tok.encode("12345") == [33, 34, 35, 36, 37]  # SmolLM2 splits digits one by one


@pytest.mark.parametrize("bos_in_tokenizer_json", [False, True])
def test_eos_ids_union_and_bos_handling(smollm2_dir: Path, tmp_path: Path,
                                        bos_in_tokenizer_json: bool) -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import processors
    from transformers import AutoTokenizer

    raw = RawTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    if bos_in_tokenizer_json:
        raw.post_processor = processors.TemplateProcessing(
            single="<|im_start|>:0 $A:0", special_tokens=[("<|im_start|>", 1)])
    raw.save(str(tmp_path / "tokenizer.json"))
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True  # transformers 5 ignores this when tokenizer.json exists
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 1}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))

    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == (2, 0)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("hi", "<|im_start|>x"):
        assert tok.encode(text) == hf(text)["input_ids"]
    assert (tok.encode("hi")[0] == 1) == bos_in_tokenizer_json
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.encode_chat(msgs) == _ids(hf.apply_chat_template(msgs, add_generation_prompt=True,
                                                                tokenize=True))


def test_gateway_import_is_torch_free() -> None:
    code = ("import sys, engine.tokenizer, engine.weights; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ------------------------------------------------------------------------------ chat template


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok, messages,
                                            add_generation_prompt: bool) -> None:
    text = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == _ids(hf_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True))
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def _with_template(tok: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(tok._tok, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
                     chat_template=template)


def test_chat_template_features(tok: Tokenizer) -> None:
    t = _with_template(tok, "{{ bos_token }}{{ messages | tojson }}{% for m in messages %}"
                            "{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
                            "{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}")
    msgs = [{"role": "user", "content": "<b>&é"}, {"role": "user", "content": "second"}]
    assert t.render_chat(msgs) == '<|im_start|>[{"role": "user", "content": "<b>&é"}, ' \
                                  '{"role": "user", "content": "second"}]<b>&é<|im_end|>'
    year = _with_template(tok, "{{ strftime_now('%Y') }}").render_chat([])
    assert year.isdigit() and len(year) == 4
    gen = _with_template(tok, "{% for m in messages %}{% generation %}{{ m.content }}"
                              "{% endgeneration %}{% endfor %}")
    assert gen.render_chat([{"role": "assistant", "content": "ok"}]) == "ok"


def test_chat_template_errors(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="no chat template"):
        _with_template(tok, None).render_chat([{"role": "user", "content": "x"}])
    strict = _with_template(tok, "{% if messages[0]['role'] != 'user' %}"
                                 "{{ raise_exception('first message must be from the user') }}"
                                 "{% endif %}ok")
    with pytest.raises(ChatTemplateError, match="must be from the user"):
        strict.render_chat([{"role": "assistant", "content": "x"}])
    assert strict.render_chat([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        _with_template(tok, "{% for m in messages %}").render_chat([])
    assert issubclass(ChatTemplateError, ValueError)


# -------------------------------------------------------------------- incremental detokenizer


def _stream(tok: Tokenizer, ids: list[int], stop=(), chunk: int = 1):
    detok = IncrementalDetokenizer(tok, stop=stop)
    pieces, hit = [], False
    for i in range(0, len(ids), chunk):
        piece, hit = detok.add(ids[i:i + chunk])
        pieces.append(piece)
        if hit:
            break
    return detok, pieces, hit


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", [TEXTS[6], TEXTS[7], TEXTS[9], "a 😀b 日本 " * 5])
def test_stream_concatenation_equals_decode(tok: Tokenizer, text: str, chunk: int) -> None:
    ids = tok.encode(text)
    detok, pieces, hit = _stream(tok, ids, chunk=chunk)
    pieces.append(detok.flush())
    assert not hit
    assert "".join(pieces) == tok.decode(ids) == detok.text
    assert all("\ufffd" not in p for p in pieces)  # partial UTF-8 is never emitted


def test_multibyte_char_split_over_tokens_is_held(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1, "expected the emoji to need several byte-level tokens"
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([i])[0] for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == ("😀", False)


def test_stop_string_split_across_tokens_is_cut(tok: Tokenizer) -> None:
    text = "The answer is forty-two. END OF ANSWER and more text"
    ids = tok.encode(text)
    stop = "END OF ANSWER"
    detok, pieces, hit = _stream(tok, ids, stop=[stop, "never"])
    assert hit and detok.stopped
    assert "".join(pieces) == detok.text == "The answer is forty-two. "
    assert len(tok.encode(" " + stop)) > 2, "the stop string should span several tokens"
    # Pieces are append-only, so the concatenation check above proves no part of it leaked.
    assert detok.flush() == "" and detok.add(tok.encode(" more")) == ("", True)


def test_partial_stop_is_held_back_then_released(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["<STOP>"])
    out, hit = detok.add(tok.encode("value <ST"))
    assert (out, hit) == ("value ", False)  # "<ST" could start the stop string
    out, hit = detok.add(tok.encode("AY> done"))
    assert (out, hit) == ("<STAY> done", False)
    out, hit = detok.add(tok.encode(" <"))
    assert (out, hit) == (" ", False)
    assert detok.flush() == "<"
    assert detok.text == "value <STAY> done <"


def test_overlapping_stop_prefixes(tok: Tokenizer) -> None:
    # "abab" after "aba": the held tail must be "aba" (longest), not just "a".
    detok = IncrementalDetokenizer(tok, stop=["abab"])
    text = ""
    for piece in ["x", "a", "b", "a", "b", "y"]:
        out, hit = detok.add(tok.encode(piece))
        text += out
        if hit:
            break
    assert hit and text == detok.text == "x"


def test_stop_in_first_chunk_and_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Hello<|im_end|>STOP trailing")
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    assert detok.add(ids) == ("Hello", True)
    raw = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert raw.add(ids)[0] + raw.flush() == tok.decode(ids, skip_special_tokens=False)
