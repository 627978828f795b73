"""One engine step as plain data: what the forward reads, built once per step from the scheduler's
output with array operations (a Python loop per sequence, none per token).

The forward never sees a `Request`: it reads a `StepBatch` (numpy arrays and ints), which a
worker rank (tensor/pipeline parallelism) receives over the wire and the simulator can build
without torch. The sampling half (`samples`, `prompt_logprobs`) is read only by the driver.

Rows are the step's tokens, laid out sequence after sequence. Sequences with at most
`short_run_rows` query rows (decodes) come first: attention has a kernel for them and another for
prefill chunks (engine/attention.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from scheduler.core import SchedulerOutput
from scheduler.request import SamplingParams

SHORT_RUN_ROWS = 1
"""Sequences with at most this many query rows go to the decode attention kernel (one pass per
query row over the keys); longer runs go to the blocked prefill kernel, which measured faster from
two rows up (engine/kernels)."""


class SampleSpec(NamedTuple):
    """A row to sample: what the sampler needs of its request (names match `Request`'s)."""

    request_id: str
    sampling: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


class PromptLogprobSpec(NamedTuple):
    """Rows of a prompt chunk whose logprobs were asked for (echo): logit row `first_logit_row + i`
    predicts prompt token `first_position + i`."""

    request_id: str
    first_logit_row: int
    first_position: int
    targets: list[int]
    top_k: int


@dataclass(frozen=True)
class StepBatch:
    input_ids: np.ndarray
    """[T] int64: the step's tokens."""
    positions: np.ndarray
    """[T] int64: absolute position of each row."""
    slot_mapping: np.ndarray
    """[T] int64: cache slot (block * block_size + offset) that receives each row's K and V."""
    seq_info: np.ndarray
    """[S, 3] int32 per sequence: (first row, rows this step, KV length including them)."""
    block_table: np.ndarray
    """[S, W] int32: each sequence's KV blocks (W = the most any of them needs; rest 0)."""
    num_short_seqs: int
    """Sequences [0, num_short_seqs) have at most SHORT_RUN_ROWS rows (attended in place)."""
    logit_rows: np.ndarray
    """[N] int64: rows whose final hidden state is needed: the sampled rows (one per entry of
    `samples`, same order), then the prompt rows of `prompt_logprobs`."""
    samples: tuple[SampleSpec, ...] = ()
    prompt_logprobs: tuple[PromptLogprobSpec, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_info)

    @property
    def num_sampled(self) -> int:
        return len(self.samples)


def prepare_step(out: SchedulerOutput, block_size: int,
                 short_run_rows: int = SHORT_RUN_ROWS) -> StepBatch:
    """SchedulerOutput -> StepBatch. Chunks keep the scheduler's order within the short and the
    long group; only the rows to sample and the prompt-logprob rows depend on requests."""
    chunks = sorted(out.chunks, key=lambda c: c.num_tokens > short_run_rows)  # stable
    num_seqs = len(chunks)
    starts = np.fromiter((c.start for c in chunks), np.int64, num_seqs)
    counts = np.fromiter((c.num_tokens for c in chunks), np.int64, num_seqs)
    first_rows = np.zeros(num_seqs, np.int64)
    np.cumsum(counts[:-1], out=first_rows[1:])
    kv_lens = starts + counts
    total = int(counts.sum())

    input_ids = np.fromiter(
        itertools.chain.from_iterable(
            c.request.token_ids(c.start, c.start + c.num_tokens) for c in chunks),
        np.int64, total)
    seq_of_row = np.repeat(np.arange(num_seqs), counts)
    positions = np.arange(total, dtype=np.int64) - np.repeat(first_rows - starts, counts)

    pages = -(-kv_lens // block_size)
    width = int(pages.max()) if num_seqs else 1
    block_table = np.zeros((num_seqs, width), np.int32)
    for i, c in enumerate(chunks):
        blocks = c.request.block_ids
        if len(blocks) < pages[i]:
            raise ValueError(f"request {c.request.request_id!r} needs {pages[i]} KV blocks for "
                             f"{kv_lens[i]} tokens but holds {len(blocks)}")
        block_table[i, :pages[i]] = blocks[:pages[i]]
    slot_mapping = (block_table[seq_of_row, positions // block_size].astype(np.int64) * block_size
                    + positions % block_size)

    sample_rows, samples, prompt_chunks = [], [], []
    for i, c in enumerate(chunks):
        r = c.request
        if c.samples:
            sample_rows.append(first_rows[i] + counts[i] - 1)
            samples.append(SampleSpec(r.request_id, r.sampling, r.prompt_token_ids, r.output_token_ids))
        if (r.sampling.prompt_logprobs is not None and not r.output_token_ids
                and c.start + 1 < r.num_prompt_tokens):
            prompt_chunks.append(i)
    # Prompt-logprob rows follow the sampled rows. Row p of a chunk predicts prompt token
    # start + p + 1; the last prompt token predicts the first output token, not a prompt token.
    logit_rows = [np.asarray(sample_rows, np.int64)]
    prompt_logprobs = []
    next_logit_row = len(sample_rows)
    for i in prompt_chunks:
        c, r = chunks[i], chunks[i].request
        n = min(c.start + c.num_tokens, r.num_prompt_tokens - 1) - c.start
        prompt_logprobs.append(PromptLogprobSpec(
            r.request_id, next_logit_row, c.start + 1,
            r.prompt_token_ids[c.start + 1:c.start + 1 + n], r.sampling.prompt_logprobs))
        logit_rows.append(np.arange(first_rows[i], first_rows[i] + n, dtype=np.int64))
        next_logit_row += n

    seq_info = np.stack([first_rows, counts, kv_lens], axis=1).astype(np.int32) if num_seqs \
        else np.zeros((0, 3), np.int32)
    return StepBatch(
        input_ids=input_ids, positions=positions, slot_mapping=slot_mapping, seq_info=seq_info,
        block_table=block_table, num_short_seqs=int((counts <= short_run_rows).sum()),
        logit_rows=np.concatenate(logit_rows), samples=tuple(samples),
        prompt_logprobs=tuple(prompt_logprobs),
    )


_FORWARD_ARRAYS = ("input_ids", "positions", "slot_mapping", "seq_info", "block_table", "logit_rows")


def encode_forward(batch: StepBatch) -> bytes:
    """The part of a StepBatch every tensor-parallel rank's forward reads, as one msgpack frame
    (arrays as dtype, shape, raw bytes; never pickle). Sampling specs stay with the driver."""
    import msgpack  # noqa: PLC0415 - only the tensor-parallel driver and workers frame batches

    body = {name: (getattr(batch, name).dtype.str, getattr(batch, name).shape,
                   getattr(batch, name).tobytes()) for name in _FORWARD_ARRAYS}
    body["num_short_seqs"] = batch.num_short_seqs
    return msgpack.packb(body, use_bin_type=True)


def decode_forward(data: bytes) -> StepBatch:
    """`encode_forward`'s frame -> a StepBatch with the forward's arrays (no samples)."""
    import msgpack  # noqa: PLC0415

    body = msgpack.unpackb(data, raw=False)
    arrays = {name: np.frombuffer(raw, np.dtype(dt)).reshape(shape).copy()   # writable, as torch wants
              for name, (dt, shape, raw) in ((n, body[n]) for n in _FORWARD_ARRAYS)}
    return StepBatch(num_short_seqs=body["num_short_seqs"], **arrays)


def split_batch(batch: StepBatch, parts: int) -> list[tuple[StepBatch, np.ndarray]]:
    """Cut a step into up to `parts` micro-batches of whole sequences with about equal rows, for
    pipeline stages to work on different micro-batches at once. Each comes with the positions in
    `batch.logit_rows` its own logit rows fill (its hidden rows go back there). Sequences keep
    their order, so each micro-batch still has its short runs first. Forward arrays only."""
    num_seqs = batch.num_seqs
    parts = max(1, min(parts, num_seqs))
    first, rows = batch.seq_info[:, 0].astype(np.int64), batch.seq_info[:, 1].astype(np.int64)
    ends = first + rows
    # After how many sequences to cut: the sequence end nearest to each equal share of the rows,
    # never an empty part.
    targets = batch.num_tokens * np.arange(1, parts) / parts
    i = np.clip(np.searchsorted(ends, targets), 0, num_seqs - 1)      # first end >= target
    before = np.abs(ends[np.maximum(i - 1, 0)] - targets) <= np.abs(ends[i] - targets)
    cuts = np.clip(np.where((i > 0) & before, i, i + 1), 1, max(1, num_seqs - 1))
    bounds = np.unique(np.concatenate([[0], cuts, [num_seqs]]))
    out = []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        r0, r1 = int(first[s0]), int(ends[s1 - 1])
        mine = np.nonzero((batch.logit_rows >= r0) & (batch.logit_rows < r1))[0]
        seq_info = batch.seq_info[s0:s1].copy()
        seq_info[:, 0] -= r0
        out.append((StepBatch(
            input_ids=batch.input_ids[r0:r1], positions=batch.positions[r0:r1],
            slot_mapping=batch.slot_mapping[r0:r1], seq_info=seq_info,
            block_table=batch.block_table[s0:s1],
            num_short_seqs=int(max(0, min(batch.num_short_seqs, s1) - s0)),
            logit_rows=batch.logit_rows[mine] - r0), mine))
    return out
