"""Model runner: turns a SchedulerOutput into one forward over the whole hybrid batch.

It owns the model, the KV-cache tensors and the sampler; the scheduler's block tables are the only
link between the two sides. Only rows whose chunk reaches the end of its request go through the LM
head (a partial prefill chunk needs no logits) -- except the prompt rows of requests that asked for
prompt logprobs (echo), which get logits for every prompt position, in their first prefill only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import build_metadata, make_attention_backend
from engine.config import EngineConfig
from engine.model import LlamaForCausalLM
from engine.model_config import ModelConfig
from engine.sampler import LogprobEntry, Sampler, top_logprob_entries
from engine.weights import load_state_dict
from scheduler.core import SchedulerOutput

_PROMPT_LOGPROB_ROWS = 64
"""Prompt rows per LM-head call when computing prompt logprobs."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


@dataclass
class RunnerOutput:
    sampled: dict[str, int]
    """Next token of every request whose chunk reached its end this step."""
    logprobs: dict[str, LogprobEntry] | None = None
    """Logprob entry of the sampled token, for requests that asked (`sampling.logprobs`)."""
    prompt_logprobs: dict[str, tuple[int, list[LogprobEntry]]] | None = None
    """(position of the first entry, entries) of the prompt tokens this step's chunk predicts,
    for requests that asked (`sampling.prompt_logprobs`)."""
    logits: dict[str, torch.Tensor] | None = None
    """The logits behind each sampled token, kept only when the runner is asked to (tests)."""


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, keep_logits: bool = False) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = _DTYPES[config.dtype]
        self.block_size = config.scheduler.block_size
        self.keep_logits = keep_logits

        self.model = LlamaForCausalLM(model_config).to(dtype=self.dtype)
        self.model.load_weights(load_state_dict(config.model_dir, self.dtype))
        self.model.inv_freq = self.model.inv_freq.float()  # RoPE angles stay fp32 in every dtype
        self.model.to(self.device).eval()

        per_block = kv_bytes_per_block(model_config, self.block_size, self.dtype)
        self.num_blocks = config.num_kv_blocks or max(1, int(config.kv_cache_gb * 2**30) // per_block)
        shape = (self.num_blocks, 2, self.block_size, model_config.num_kv_heads, model_config.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(model_config.num_layers)]
        self.backend = make_attention_backend(config.attention, self.device)
        self.sampler = Sampler(config.seed)

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if out.is_empty:
            return RunnerOutput(sampled={})
        input_ids: list[int] = []
        seqs = []
        last_rows, sampling_chunks, prompt_lp_chunks = [], [], []
        for chunk in out.chunks:
            r = chunk.request
            if (r.sampling.prompt_logprobs is not None and not r.output_token_ids
                    and chunk.start + 1 < r.num_prompt_tokens):
                prompt_lp_chunks.append((chunk, len(input_ids)))
            input_ids.extend(r.token_ids(chunk.start, chunk.start + chunk.num_tokens))
            seqs.append((r.block_ids, chunk.start, chunk.num_tokens))
            if chunk.samples:
                last_rows.append(len(input_ids) - 1)
                sampling_chunks.append(chunk)
        meta = build_metadata(seqs, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, meta.positions, self.kv_caches, meta, self.backend)
        result = RunnerOutput(sampled={})
        if prompt_lp_chunks:
            result.prompt_logprobs = self._prompt_logprobs(hidden, prompt_lp_chunks)
        if not last_rows:
            return result
        logits = self.model.compute_logits(hidden[torch.tensor(last_rows, device=self.device)])
        requests = [c.request for c in sampling_chunks]
        sampled = self.sampler(logits.cpu(), requests)
        request_ids = [r.request_id for r in requests]
        result.sampled = dict(zip(request_ids, sampled.tokens))
        lps = {rid: e for rid, e in zip(request_ids, sampled.logprobs) if e is not None}
        result.logprobs = lps or None
        if self.keep_logits:
            result.logits = {rid: logits[i].cpu() for i, rid in enumerate(request_ids)}
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, chunks) -> dict[str, tuple[int, list]]:
        """Row p of a prompt chunk predicts prompt token p + 1: its raw logprob and top-k."""
        found = {}
        for chunk, offset in chunks:
            r = chunk.request
            start = chunk.start
            count = min(start + chunk.num_tokens, r.num_prompt_tokens - 1) - start
            entries: list[LogprobEntry] = []
            for lo in range(0, count, _PROMPT_LOGPROB_ROWS):  # bounds the [rows, vocab] buffers
                n = min(_PROMPT_LOGPROB_ROWS, count - lo)
                rows = hidden[offset + lo:offset + lo + n]
                logprobs = self.model.compute_logits(rows).float().cpu().log_softmax(dim=-1)
                targets = torch.tensor(r.prompt_token_ids[start + 1 + lo:start + 1 + lo + n])
                entries += top_logprob_entries(logprobs, targets, [r.sampling.prompt_logprobs] * n)
            found[r.request_id] = (start + 1, entries)
        return found
