"""The step as plain data: `prepare_step` (SchedulerOutput -> StepBatch) and the FlashInfer page
layout derived from it, checked entry by entry on a hand-built hybrid batch."""
from __future__ import annotations

import numpy as np
import pytest

from engine.step_batch import prepare_step
from scheduler.core import ScheduledChunk, SchedulerOutput
from scheduler.request import Request, SamplingParams

BLOCK = 4


def request(rid, prompt_len, computed, blocks, outputs=(), prompt_logprobs=None):
    r = Request(rid, list(range(100, 100 + prompt_len)), SamplingParams(prompt_logprobs=prompt_logprobs),
                arrival_time=0.0)
    r.output_token_ids = list(outputs)
    r.num_computed_tokens = computed
    r.block_ids = list(blocks)
    return r


def hybrid_step():
    """A prefill chunk listed first (the kernel split must move it after the decodes), two
    decodes, and the last chunk of a prompt that asked for prompt logprobs."""
    chunk = request("chunk", 10, 4, [7, 3, 9])                          # rows 4..8 of 10
    dec_a = request("dec-a", 5, 6, [2, 5], outputs=[900, 901])          # 7 tokens, computes #6
    dec_b = request("dec-b", 3, 3, [11], outputs=[902])                 # 4 tokens, computes #3
    tail = request("tail", 6, 4, [1, 6], prompt_logprobs=2)            # rows 4..5, then samples
    out = SchedulerOutput([ScheduledChunk(chunk, 5), ScheduledChunk(dec_a, 1),
                           ScheduledChunk(dec_b, 1), ScheduledChunk(tail, 2)], token_budget=16)
    return out, (chunk, dec_a, dec_b, tail)


def test_prepare_step_lays_out_a_hybrid_batch():
    out, (chunk, dec_a, dec_b, tail) = hybrid_step()
    b = prepare_step(out, BLOCK)
    # decodes first, then the chunk and the tail in the scheduler's order
    assert b.num_short_seqs == 2 and b.num_seqs == 4 and b.num_tokens == 9
    assert b.seq_info.tolist() == [[0, 1, 7], [1, 1, 4], [2, 5, 9], [7, 2, 6]]
    assert b.input_ids.tolist() == [901, 902, 104, 105, 106, 107, 108, 104, 105]
    assert b.positions.tolist() == [6, 3, 4, 5, 6, 7, 8, 4, 5]
    assert b.block_table.tolist() == [[2, 5, 0], [11, 0, 0], [7, 3, 9], [1, 6, 0]]
    # slot = block_of(position) * BLOCK + position % BLOCK
    assert b.slot_mapping.tolist() == [5 * 4 + 2, 11 * 4 + 3, 3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2,
                                       3 * 4 + 3, 9 * 4 + 0, 6 * 4 + 0, 6 * 4 + 1]
    # sampled rows (decodes, and the tail that finishes its prompt; not the mid-prompt chunk),
    # then the tail's prompt-logprob row: row 7 (position 4) predicts prompt token 5
    assert [s.request_id for s in b.samples] == ["dec-a", "dec-b", "tail"]
    assert b.logit_rows.tolist() == [0, 1, 8, 7]
    (spec,) = b.prompt_logprobs
    assert (spec.request_id, spec.first_logit_row, spec.first_position, spec.targets, spec.top_k) == \
        ("tail", 3, 5, [105], 2)
    # plain data only: nothing of a live Request in the batch
    assert all(isinstance(x, np.ndarray) for x in (b.input_ids, b.positions, b.slot_mapping,
                                                    b.seq_info, b.block_table, b.logit_rows))


def test_prepare_step_names_a_request_short_of_blocks():
    r = request("starved", 9, 0, [4, 5])    # 9 tokens need 3 blocks of 4
    with pytest.raises(ValueError, match="starved.*needs 3 KV blocks"):
        prepare_step(SchedulerOutput([ScheduledChunk(r, 9)], token_budget=16), BLOCK)


def test_flashinfer_layout_of_a_step():
    from engine.attention import paged_kv_layout

    out, _ = hybrid_step()
    layout = paged_kv_layout(prepare_step(out, BLOCK), BLOCK)
    assert layout.qo_indptr.tolist() == [0, 1, 2, 7, 9]
    assert layout.kv_indptr.tolist() == [0, 2, 3, 6, 8]
    assert layout.kv_indices.tolist() == [2, 5, 11, 7, 3, 9, 1, 6]
    assert layout.last_page_len.tolist() == [3, 4, 1, 2]
    assert layout.batch_indices.tolist() == [0, 1, 2, 2, 2, 2, 2, 3, 3]
