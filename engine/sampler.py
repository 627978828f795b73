"""Token sampling, vectorised over the batch: penalties, greedy / temperature, top-k, top-p, min-p,
reproducible per-request seeds, and logprobs.

Order (as vLLM): penalties on the raw logits -> temperature -> top-k -> top-p -> min-p -> draw.
Greedy requests get the penalties too (argmax of the penalised logits).

- presence / frequency penalty (OpenAI): `logit -= presence * (count > 0) + frequency * count`,
  where count is the token's number of occurrences in the *output* so far;
- repetition penalty (HF / vLLM): a token seen in the prompt *or* the output gets `logit / p` if
  its logit is positive, `logit * p` otherwise (p > 1 discourages it);
- min_p: after temperature, drop tokens whose probability is below `min_p * max_prob`.

A seeded request draws from its own `torch.Generator`, so its tokens do not depend on what else
shares the batch; unseeded requests share the runner's generator.

Logprobs follow vLLM: they are of the *raw* model distribution, `log_softmax(logits)` before
penalties, temperature and truncation, so they describe the model rather than the sampling knobs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.step_batch import SampleSpec
from scheduler.request import SamplingParams

LOGPROB_FLOOR = -9999.0
"""Logprobs are clamped here so JSON never sees -inf."""

LogprobEntry = tuple[int, float, list[list]]
"""(token id, its logprob, [[alternative id, logprob], ...] most likely first)."""


@dataclass
class SamplerOutput:
    tokens: list[int]
    logprobs: list[LogprobEntry | None] = field(default_factory=list)
    """Per row: the entry for the sampled token, or None when the request did not ask."""


def top_logprob_entries(logprobs: torch.Tensor, chosen: torch.Tensor,
                        ks: Sequence[int]) -> list[LogprobEntry]:
    """Rows of a [R, V] log-softmax -> one entry per row: the chosen token's logprob and its
    row's top `ks[i]` alternatives."""
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1).clamp_min(LOGPROB_FLOOR).tolist()
    k_max = max(ks) if ks else 0
    top_ids: list[list[int]] = [[] for _ in ks]
    top_lps: list[list[float]] = [[] for _ in ks]
    if k_max > 0:
        vals, idx = logprobs.topk(k_max, dim=-1)
        top_lps, top_ids = vals.clamp_min(LOGPROB_FLOOR).tolist(), idx.tolist()
    ids = chosen.tolist()
    return [(ids[i], chosen_lp[i], [[t, lp] for t, lp in zip(top_ids[i][:k], top_lps[i][:k])])
            for i, k in enumerate(ks)]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._shared = torch.Generator().manual_seed(seed)
        self._per_request: dict[str, torch.Generator] = {}
        self._counts: dict[str, list] = {}
        """request id -> [output tokens counted so far, counts tensor [V]] (penalised requests)."""
        self._prompt_seen: dict[str, torch.Tensor] = {}
        """request id -> bool [V]: tokens of the prompt (requests with a repetition penalty)."""

    def release(self, request_id: str) -> None:
        self._per_request.pop(request_id, None)
        self._counts.pop(request_id, None)
        self._prompt_seen.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._shared
        g = self._per_request.get(request_id)
        if g is None:
            g = self._per_request[request_id] = torch.Generator().manual_seed(params.seed)
        return g

    def _output_counts(self, request: SampleSpec, vocab: int) -> torch.Tensor:
        """Occurrences of each token in the request's output, kept up to date incrementally
        (outputs only grow, even across preemption)."""
        entry = self._counts.get(request.request_id)
        if entry is None:
            entry = self._counts[request.request_id] = [0, torch.zeros(vocab)]
        done, counts = entry
        new = request.output_token_ids[done:]
        if new:
            counts.index_add_(0, torch.tensor(new, dtype=torch.int64), torch.ones(len(new)))
            entry[0] = done + len(new)
        return counts

    def _prompt_mask(self, request: SampleSpec, vocab: int) -> torch.Tensor:
        mask = self._prompt_seen.get(request.request_id)
        if mask is None:
            mask = self._prompt_seen[request.request_id] = torch.zeros(vocab, dtype=torch.bool)
            mask[torch.tensor(request.prompt_token_ids, dtype=torch.int64)] = True
        return mask

    # ---- penalties ------------------------------------------------------------------------
    def apply_penalties(self, logits: torch.Tensor, requests: Sequence[SampleSpec]) -> torch.Tensor:
        """Return logits [N, V] with every request's penalties applied (rows without any are
        untouched; the input is not modified)."""
        rows = [i for i, r in enumerate(requests) if r.sampling.has_penalties]
        if not rows:
            return logits
        vocab = logits.shape[1]
        reqs = [requests[i] for i in rows]
        idx = torch.tensor(rows)
        sub = logits[idx]
        counts = torch.stack([self._output_counts(r, vocab) for r in reqs]).to(sub.dtype)
        rep = torch.tensor([r.sampling.repetition_penalty for r in reqs], dtype=sub.dtype)
        if bool((rep != 1.0).any()):
            seen = torch.stack([self._prompt_mask(r, vocab) for r in reqs]) | (counts > 0)
            rep = rep[:, None]
            penalised = torch.where(sub > 0, sub / rep, sub * rep)
            sub = torch.where(seen, penalised, sub)
        freq = torch.tensor([r.sampling.frequency_penalty for r in reqs], dtype=sub.dtype)
        pres = torch.tensor([r.sampling.presence_penalty for r in reqs], dtype=sub.dtype)
        sub = sub - freq[:, None] * counts - pres[:, None] * (counts > 0).to(sub.dtype)
        out = logits.clone()
        out[idx] = sub
        return out

    # ---- sampling -------------------------------------------------------------------------
    def __call__(self, logits: torch.Tensor, requests: Sequence[SampleSpec]) -> SamplerOutput:
        """logits [N, V] (one row per request, same order) -> one token per row (+ logprobs)."""
        logits = logits.float()
        params = [r.sampling for r in requests]
        penalised = self.apply_penalties(logits, requests)
        tokens = penalised.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            drawn = self._draw(penalised, requests, random_rows)
            tokens[torch.tensor(random_rows)] = torch.tensor(drawn)
        out = SamplerOutput(tokens=tokens.tolist(), logprobs=[None] * len(requests))
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if lp_rows:
            idx = torch.tensor(lp_rows)
            raw = logits[idx].log_softmax(dim=-1)  # the raw model distribution (see docstring)
            entries = top_logprob_entries(raw, tokens[idx], [params[i].logprobs for i in lp_rows])
            for i, entry in zip(lp_rows, entries):
                out.logprobs[i] = entry
        return out

    def _draw(self, logits: torch.Tensor, requests: Sequence[SampleSpec],
              rows: list[int]) -> list[int]:
        params = [requests[i].sampling for i in rows]
        sub = logits[torch.tensor(rows)]
        temps = torch.tensor([p.temperature for p in params], dtype=sub.dtype)
        sub = sub / temps[:, None]

        sorted_logits, order = sub.sort(dim=-1, descending=True)
        vocab = sub.shape[-1]
        ranks = torch.arange(vocab)[None, :]
        ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
        sorted_logits = sorted_logits.masked_fill(ranks >= ks[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        top_ps = torch.tensor([p.top_p for p in params], dtype=sub.dtype)
        # Drop a token when the mass strictly before it already reaches top_p (the first stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_ps[:, None]
        min_ps = torch.tensor([p.min_p for p in params], dtype=sub.dtype)
        drop |= probs < min_ps[:, None] * probs[:, :1]
        drop[:, 0] = False
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)

        out = []
        for j, i in enumerate(rows):
            g = self._generator(requests[i].request_id, params[j])
            pick = torch.multinomial(probs[j], 1, generator=g)
            out.append(int(order[j, pick]))
        return out
