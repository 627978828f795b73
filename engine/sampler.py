"""Token sampling: greedy, temperature, top-k, top-p, with reproducible per-request seeds.

A seeded request draws from its own `torch.Generator`, so its tokens do not depend on what else
shares the batch; unseeded requests share the runner's generator.
"""
from __future__ import annotations

import torch

from scheduler.request import SamplingParams


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._shared = torch.Generator().manual_seed(seed)
        self._per_request: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._per_request.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._shared
        g = self._per_request.get(request_id)
        if g is None:
            g = self._per_request[request_id] = torch.Generator().manual_seed(params.seed)
        return g

    def __call__(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> list[int]:
        """logits [N, V] fp32 (one row per request) -> one token id per row."""
        greedy = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            return greedy.tolist()
        rows = torch.tensor(random_rows)
        sub = logits[rows]
        temps = torch.tensor([params[i].temperature for i in random_rows], dtype=sub.dtype)
        sub = sub / temps[:, None]

        sorted_logits, order = sub.sort(dim=-1, descending=True)
        vocab = sub.shape[-1]
        ks = torch.tensor([params[i].top_k if params[i].top_k > 0 else vocab for i in random_rows])
        ranks = torch.arange(vocab)[None, :]
        drop = ranks >= ks[:, None]
        probs_sorted = sorted_logits.softmax(dim=-1)
        top_ps = torch.tensor([params[i].top_p for i in random_rows], dtype=sub.dtype)
        # Drop a token when the mass strictly before it already reaches top_p (the first stays).
        drop |= (probs_sorted.cumsum(dim=-1) - probs_sorted) >= top_ps[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)

        out = greedy.tolist()
        for j, i in enumerate(random_rows):
            g = self._generator(request_ids[i], params[i])
            pick = torch.multinomial(probs[j], 1, generator=g)
            out[i] = int(order[j, pick])
        return out
