"""Model runner: one forward over a whole hybrid batch, then sampling.

    batch = runner.prepare(out)     # SchedulerOutput -> StepBatch (plain arrays, built once)
    hidden = runner.forward(batch)  # the model reads only the StepBatch (eager or compiled)
    -> logits of the sampled rows -> Sampler -> RunnerOutput

The runner owns the model, the KV-cache tensors, the attention backend and the sampler; the
scheduler's block tables are the only link between the two sides. Only rows whose chunk reaches
the end of its request go through the LM head (a partial prefill chunk needs no logits), plus
the prompt rows of requests that asked for prompt logprobs (echo), in their first prefill only.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from engine.attention import make_attention_backend
from engine.config import EngineConfig
from engine.device import resolve_dtype
from engine.model import LlamaForCausalLM
from engine.model_config import ModelConfig, kv_bytes_per_block
from engine.quant import quantize_model
from engine.sampler import LogprobEntry, Sampler, top_logprob_entries
from engine.step_batch import StepBatch, prepare_step, split_batch
from engine.parallel import Pipeline, Workers, cache_model_config, make_shard
from engine.weights import load_state_dict
from scheduler.core import SchedulerOutput

log = logging.getLogger("tandem.runner")

_PROMPT_LOGPROB_ROWS = 64
"""Prompt rows per LM-head call when computing prompt logprobs (bounds the [rows, vocab] buffer)."""


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


@dataclass
class StepTimes:
    """Where the last step's wall time went, in seconds (`tandem bench-engine` prints them).
    Everything but `forward` is host work on the critical path."""

    schedule: float = 0.0
    """scheduler.schedule (EngineCore)."""
    prepare: float = 0.0
    """SchedulerOutput -> StepBatch, attention plan, tensors."""
    forward: float = 0.0
    """The model: layers and the LM head of the sampled rows."""
    sample: float = 0.0
    """Penalties, sampling, logprobs."""
    update: float = 0.0
    """scheduler.update, detokenization, stop strings, outputs (EngineCore)."""

    @property
    def host(self) -> float:
        return self.schedule + self.prepare + self.sample + self.update


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, keep_logits: bool = False,
                 pipeline: Pipeline | None = None) -> None:
        """`pipeline`: a worker rank's process group (its driver's runner makes its own)."""
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.scheduler.block_size
        self.keep_logits = keep_logits

        # Parallelism: the driver (rank 0) starts the other ranks, which build their shards in
        # their own processes while it builds its own.
        self.workers = Workers(config) if config.world_size > 1 and config.rank == 0 else None
        self.pipeline = self.workers.pipeline if self.workers is not None else pipeline
        self.shard = make_shard(model_config, config.tp, config.rank, config.pp)
        reduce = self.pipeline.all_reduce if config.tp > 1 else None
        self.model = LlamaForCausalLM(model_config, self.shard, reduce).to(dtype=self.dtype)
        self.model.load_weights(load_state_dict(config.model_dir, self.dtype))
        self.model.inv_freq = self.model.inv_freq.float()  # RoPE angles stay fp32 in every dtype
        quantize_model(self.model, config.quantization)
        self.model.to(self.device).eval().requires_grad_(False)

        # Sized by the largest shard, so every rank gets the same number of blocks.
        cache_cfg = cache_model_config(model_config, config.tp, config.pp)
        per_block = kv_bytes_per_block(cache_cfg, self.block_size, str(self.dtype).removeprefix("torch."))
        self.num_blocks = config.num_kv_blocks or max(1, int(config.kv_cache_gb * 2**30) // per_block)
        # One block more than the scheduler manages: padding rows write their K/V there.
        self.scratch_block = self.num_blocks
        shape = (self.num_blocks + 1, 2, self.block_size, self.shard.num_kv_heads, model_config.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.shard.num_layers)]
        sched = config.scheduler
        self.backend = make_attention_backend(
            config.attention, self.device, max_seqs=max(sched.max_num_seqs, 64) + 1,
            max_blocks_per_seq=-(-sched.max_model_len // self.block_size), block_size=self.block_size)
        self.sampler = Sampler(config.seed)
        self.times = StepTimes()

        self._forward = self.model.forward
        self._logits = self.model.compute_logits
        self.min_rows = 1
        """Rows and logit rows every forward gets, padding if needed (2 when compiled: dynamo
        specialises a size of 1, and one dynamic graph for every step is worth a padding row)."""
        self.compile_seconds = 0.0
        if config.compile and config.world_size > 1:
            log.warning("--compile is not supported with tensor/pipeline parallelism yet; running eagerly")
        elif config.compile:
            from engine.compile import compile_runner  # noqa: PLC0415 - only when compiling

            self.compile_seconds = compile_runner(self)

    def use_forward(self, forward, compute_logits, min_rows: int) -> None:
        """Run `forward` / `compute_logits` (same signatures as the model's) instead of the model's
        own, padding every step to `min_rows` rows and logit rows (engine/compile.py)."""
        self._forward, self._logits, self.min_rows = forward, compute_logits, min_rows

    @property
    def recompiles_since_warmup(self) -> int:
        """Graphs compiled after start-up (0 eager, and 0 compiled unless a shape was missed)."""
        return getattr(self._forward, "recompiles_since_warmup", 0)

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    def close(self) -> None:
        """Stop the worker ranks (tensor/pipeline parallelism), if any."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    # -- the step ----------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> StepBatch:
        return prepare_step(out, self.block_size)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """The model over one StepBatch -> final hidden states of `batch.logit_rows`."""
        if self.workers is not None:
            self.workers.broadcast(batch)   # they pad and plan it as below, on their own heads
        batch = self._pad(batch)
        if self.shard.pp > 1:
            return self._forward_pipelined(batch)
        attn = self.backend.plan(batch, self.shard.num_heads, self.shard.num_kv_heads,
                                 self.model_config.head_dim, self.dtype)
        return self._forward_one(batch, attn)

    def _forward_one(self, batch: StepBatch, attn, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        to = self.device
        return self._forward(torch.from_numpy(batch.input_ids).to(to), torch.from_numpy(batch.positions).to(to),
                             self.kv_caches, attn, torch.from_numpy(batch.logit_rows).to(to), self.backend,
                             hidden_in)

    def _forward_pipelined(self, batch: StepBatch) -> torch.Tensor | None:
        """Pipeline stages: the step is cut into `pp` micro-batches of whole sequences (every rank
        cuts it the same way), so while stage s runs micro-batch m+1, stage s+1 runs m. The
        driver gets each micro-batch's hidden rows from the last stage and puts them back in
        `batch.logit_rows` order."""
        shard, pipe, hidden = self.shard, self.pipeline, self.model_config.hidden_size
        parts = split_batch(batch, shard.pp)
        pending = []   # sends in flight: their tensors must live until they complete
        for mb, _ in parts:
            attn = self.backend.plan(mb, shard.num_heads, shard.num_kv_heads, self.model_config.head_dim,
                                     self.dtype)
            hidden_in = None if shard.first_stage else pipe.recv_prev((mb.num_tokens, hidden), self.dtype)
            out = self._forward_one(mb, attn, hidden_in)
            if not shard.last_stage:
                pending.append((pipe.send_next(out), out))
            elif shard.tp_rank == 0:
                pending.append((pipe.send_result(out), out))
        result = None
        if shard.rank == 0:
            result = torch.empty((len(batch.logit_rows), hidden), dtype=self.dtype, device=self.device)
            for mb, where in parts:
                rows = pipe.recv_result((len(mb.logit_rows), hidden), self.dtype)
                result[torch.from_numpy(where)] = rows
        for work, _ in pending:
            pipe.wait(work)
        return result

    def _pad(self, batch: StepBatch) -> StepBatch:
        """Up to `min_rows` rows (a one-token sequence in the scratch block) and logit rows
        (repeats of row 0, whose results are ignored)."""
        rows, logits = batch.num_tokens, len(batch.logit_rows)
        if rows >= self.min_rows and logits >= max(self.min_rows, 1):
            return batch
        changes = {}
        if rows < self.min_rows:
            pad = self.min_rows - rows
            slot = self.scratch_block * self.block_size
            width = batch.block_table.shape[1]
            # Padding sequences are short runs; they go after the other short ones.
            at = batch.num_short_seqs
            pad_info = np.array([[rows + i, 1, 1] for i in range(pad)], np.int32)
            pad_table = np.zeros((pad, width), np.int32)
            pad_table[:, 0] = self.scratch_block
            changes.update(
                input_ids=np.concatenate([batch.input_ids, np.zeros(pad, np.int64)]),
                positions=np.concatenate([batch.positions, np.zeros(pad, np.int64)]),
                slot_mapping=np.concatenate([batch.slot_mapping, np.full(pad, slot, np.int64)]),
                seq_info=np.insert(batch.seq_info, at, pad_info, axis=0),
                block_table=np.insert(batch.block_table, at, pad_table, axis=0),
                num_short_seqs=batch.num_short_seqs + pad)
        if logits < max(self.min_rows, 1):
            changes["logit_rows"] = np.concatenate(
                [batch.logit_rows, np.zeros(max(self.min_rows, 1) - logits, np.int64)])
        return replace(batch, **changes)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] -> fp32 logits [n, vocab] (padded to `min_rows` rows inside)."""
        n = hidden.shape[0]
        if n < self.min_rows:
            hidden = torch.cat([hidden, hidden.new_zeros(self.min_rows - n, hidden.shape[1])])
        return self._logits(hidden)[:n]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        times = self.times = StepTimes()
        if out.is_empty:
            return RunnerOutput(sampled={})
        t0 = time.perf_counter()
        batch = self.prepare(out)
        t1 = time.perf_counter()
        hidden = self.forward(batch)
        result = RunnerOutput(sampled={})
        if batch.prompt_logprobs:
            result.prompt_logprobs = self._prompt_logprobs(hidden, batch)
        logits = self.compute_logits(hidden[:batch.num_sampled]) if batch.samples else None
        t2 = time.perf_counter()
        if logits is not None:
            sampled = self.sampler(logits.cpu(), batch.samples)
            request_ids = [s.request_id for s in batch.samples]
            result.sampled = dict(zip(request_ids, sampled.tokens))
            lps = {rid: e for rid, e in zip(request_ids, sampled.logprobs) if e is not None}
            result.logprobs = lps or None
            if self.keep_logits:
                result.logits = {rid: logits[i].cpu() for i, rid in enumerate(request_ids)}
        times.prepare, times.forward, times.sample = t1 - t0, t2 - t1, time.perf_counter() - t2
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: StepBatch) -> dict[str, tuple[int, list]]:
        """Logit row i of a prompt chunk predicts its prompt token: raw logprob and top-k."""
        found = {}
        for spec in batch.prompt_logprobs:
            entries: list[LogprobEntry] = []
            count = len(spec.targets)
            for lo in range(0, count, _PROMPT_LOGPROB_ROWS):
                n = min(_PROMPT_LOGPROB_ROWS, count - lo)
                rows = hidden[spec.first_logit_row + lo:spec.first_logit_row + lo + n]
                logprobs = self.compute_logits(rows).cpu().log_softmax(dim=-1)
                targets = torch.tensor(spec.targets[lo:lo + n])
                entries += top_logprob_entries(logprobs, targets, [spec.top_k] * n)
            found[spec.request_id] = (spec.first_position, entries)
        return found
