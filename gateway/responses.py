"""OpenAI response shapes as plain dicts (object names, `logprobs: null`, `usage`, ...), and the
two logprobs formats: completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and
chat (`content: [{token, logprob, bytes, top_logprobs}]`).

Logprob entries arrive from the replica as `[token_id, logprob, [[alt_id, logprob], ...]]` (or
None for the first prompt token); `token_text(id)` renders one token as text.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

TokenText = Callable[[int], str]


def now_ts() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": model, "object": "model", "created": created, "owned_by": "tandem"}]}


# ---- logprobs --------------------------------------------------------------------------------

class CompletionLogprobs:
    """Builds the completions `logprobs` object, chunk by chunk; `text_offset` continues across
    calls (each token's offset into the choice's text)."""

    def __init__(self, token_text: TokenText) -> None:
        self.token_text = token_text
        self.offset = 0

    def format(self, entries: Sequence[list | None], token_ids: Sequence[int]) -> dict[str, Any]:
        """`entries[i]` describes `token_ids[i]` (None: no logprob, e.g. the first prompt token)."""
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}
        for entry, token_id in zip(entries, token_ids):
            text = self.token_text(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            _, logprob, top = entry
            # As vLLM: the top alternatives plus the chosen token itself.
            alternatives = {self.token_text(t): lp for t, lp in top}
            alternatives.setdefault(text, logprob)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(alternatives)
        return out


def chat_logprobs(entries: Sequence[list], token_text: TokenText) -> dict[str, Any]:
    """The chat `logprobs` object for generated tokens (top_logprobs: exactly the top-k)."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, logprob, top in entries:
        content.append({**item(token_id, logprob),
                        "top_logprobs": [item(t, lp) for t, lp in top]})
    return {"content": content, "refusal": None}


# ---- completions -----------------------------------------------------------------------------

def completion_choice(index: int, text: str, logprobs: dict | None,
                      finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(rid: str, created: int, model: str, choices: list[dict],
                        prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, created: int, model: str, choice: dict,
                     include_usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                             "model": model, "choices": [choice]}
    if include_usage:
        chunk["usage"] = None
    return chunk


# ---- chat ------------------------------------------------------------------------------------

def chat_choice(index: int, text: str, logprobs: dict | None,
                finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_response(rid: str, created: int, model: str, choices: list[dict], prompt_tokens: int,
                  completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, Any],
               logprobs: dict | None, finish_reason: str | None,
               include_usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                     "finish_reason": finish_reason}]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The extra last chunk sent when stream_options.include_usage is set (choices is empty)."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
