"""Scheduler tests with no torch: schedule -> fake result -> update over random workloads."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.block_manager import BlockManager
from scheduler.config import SchedulerConfig
from scheduler.core import AdmissionError
from scheduler.request import FinishReason, Request, RequestStatus, SamplingParams
from scheduler.policies import make_scheduler


def make_request(i: int, prompt_len: int, max_tokens: int, arrival: float | None = None) -> Request:
    """Request `r{i}`; its prompt shares no prefix with another's (tests/test_prefix_cache.py
    covers sharing), so the prefix cache changes nothing here."""
    return Request(f"r{i}", list(range(1000 * i + 1, 1000 * i + prompt_len + 1)),
                   SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                   arrival_time=float(i) if arrival is None else arrival, eos_token_ids=frozenset({0}))


def run_to_completion(sched, requests, rng, max_steps=10_000, on_step=None):
    """Drive schedule -> fake tokens -> update; returns the scheduler outputs."""
    pending = sorted(requests, key=lambda r: r.arrival_time)
    outputs, step = [], 0
    while pending or sched.has_work():
        while pending and pending[0].arrival_time <= step:
            sched.add_request(pending.pop(0))
        running_before = [r for r in sched.running if r.num_uncomputed_tokens == 1]
        out = sched.schedule(float(step))
        sampled = {c.request.request_id: rng.randrange(1, 100) for c in out.chunks if c.samples}
        if on_step:
            on_step(out, running_before)
        sched.update(out, sampled, float(step))
        sched.check_integrity()
        outputs.append(out)
        step += 1
        assert step < max_steps, "scheduler made no progress"
    return outputs


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(8, 96),
    num_blocks=st.integers(12, 80),
    block_size=st.sampled_from([4, 8, 16]),
    workload=st.lists(st.tuples(st.integers(1, 120), st.integers(1, 20), st.integers(0, 30)),
                      min_size=1, max_size=12),
    seed=st.integers(0, 1000),
)
def test_sarathi_invariants_on_random_workloads(budget, num_blocks, block_size, workload, seed):
    cfg = SchedulerConfig(token_budget=budget, max_num_seqs=8, block_size=block_size, max_model_len=256)
    sched = make_scheduler(cfg, num_blocks)
    requests = []
    for i, (prompt, max_tokens, arrival) in enumerate(workload):
        r = make_request(i, prompt, max_tokens, arrival=float(arrival) + i * 1e-3)
        if sched.block_manager.blocks_for(prompt + max_tokens) > num_blocks:
            continue  # would be rejected at admission; tested separately
        requests.append(r)

    def check(out, decoding_before):
        # The budget is never exceeded.
        assert out.num_tokens <= budget
        # Every request that was decoding gets its token, unless it was preempted this step.
        scheduled = {c.request.request_id for c in out.chunks}
        for r in decoding_before:
            assert r.request_id in scheduled or r.request_id in out.preempted_ids
        # Decodes come first, then prefill chunks.
        kinds = [c.num_tokens == 1 and c.samples for c in out.chunks]
        seen_prefill = False
        for c, is_decode in zip(out.chunks, kinds):
            if not is_decode and c.request.num_computed_tokens + 1 != c.request.num_tokens:
                seen_prefill = True
            elif seen_prefill and is_decode and c.request.num_output_tokens > 0:
                raise AssertionError("a decode was scheduled after a prefill chunk")

    run_to_completion(sched, requests, random.Random(seed), on_step=check)
    assert all(r.is_finished and r.num_output_tokens == r.sampling.max_tokens for r in requests)
    assert sched.block_manager.num_free_blocks == num_blocks


def test_prefills_are_chunked_and_mixed_with_decodes():
    cfg = SchedulerConfig(token_budget=16, max_num_seqs=4, block_size=4, max_model_len=256)
    sched = make_scheduler(cfg, 64)
    short, long_ = make_request(0, 3, 5), make_request(1, 40, 2)
    sched.add_request(short)
    out = sched.schedule(0.0)
    sched.update(out, {"r0": 7}, 0.0)
    sched.add_request(long_)
    out = sched.schedule(1.0)
    # decode of r0 first, then a 15-token chunk of r1 (budget 16)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("r0", 1), ("r1", 15)]
    assert not out.chunks[1].samples
    sched.update(out, {"r0": 8}, 1.0)
    out = sched.schedule(2.0)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("r0", 1), ("r1", 15)]


def test_fcfs_head_of_line_blocks_when_memory_is_short():
    cfg = SchedulerConfig(token_budget=64, max_num_seqs=8, block_size=4, max_model_len=256)
    sched = make_scheduler(cfg, 10)
    big, small = make_request(0, 36, 2), make_request(1, 4, 2)   # 9 blocks + 1 block
    filler = make_request(2, 8, 4, arrival=-1.0)                 # holds 2-3 blocks
    sched.add_request(filler)
    sched.update(sched.schedule(0.0), {"r2": 1}, 0.0)
    sched.add_request(big)
    sched.add_request(small)
    out = sched.schedule(1.0)
    # big does not fit; small must not overtake it
    assert {c.request.request_id for c in out.chunks} == {"r2"}
    assert [r.request_id for r in sched.waiting] == ["r0", "r1"]


def test_preemption_by_recompute_frees_blocks_and_requeues_newest_first():
    cfg = SchedulerConfig(token_budget=32, max_num_seqs=8, block_size=4, max_model_len=256)
    sched = make_scheduler(cfg, 8)   # 32 tokens: each request (24 tokens) fits alone, not both
    a, b = make_request(0, 4, 20), make_request(1, 4, 20)
    sched.add_request(a)
    sched.add_request(b)
    rng = random.Random(0)
    preempted = []
    run_to_completion(sched, [], rng, on_step=lambda out, _: preempted.extend(out.preempted_ids))
    assert preempted and preempted[0] == "r1"          # the newest arrival goes first
    assert a.is_finished and b.is_finished
    assert b.num_preemptions >= 1
    assert sched.block_manager.num_free_blocks == 8


def test_finish_and_abort_free_blocks_everywhere():
    cfg = SchedulerConfig(token_budget=16, max_num_seqs=4, block_size=4, max_model_len=256)
    sched = make_scheduler(cfg, 32)
    reqs = [make_request(i, 20, 10) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule(0.0)
    sched.update(out, {}, 0.0)
    assert sched.finish("r0", FinishReason.ABORT) is reqs[0]   # running, mid-prefill
    assert sched.finish("r2", FinishReason.ABORT) is reqs[2]   # still waiting
    assert sched.finish("nope", FinishReason.ABORT) is None
    sched.check_integrity()
    assert reqs[0].status is RequestStatus.FINISHED and reqs[0].finish_reason is FinishReason.ABORT
    run_to_completion(sched, [], random.Random(1))
    assert sched.block_manager.num_free_blocks == 32


def test_eos_and_length_finish_in_update():
    cfg = SchedulerConfig(token_budget=16, max_num_seqs=4, block_size=4, max_model_len=256)
    sched = make_scheduler(cfg, 32)
    r = Request("e", [5, 6, 7], SamplingParams(max_tokens=10, temperature=0.0), 0.0, eos_token_ids=frozenset({2}))
    sched.add_request(r)
    sched.update(sched.schedule(0.0), {"e": 9}, 0.0)
    sched.update(sched.schedule(1.0), {"e": 2}, 1.0)
    assert r.finish_reason is FinishReason.STOP and r.output_token_ids == [9, 2]
    assert sched.block_manager.num_free_blocks == 32


def test_admission_errors_name_the_problem():
    cfg = SchedulerConfig(token_budget=16, max_num_seqs=4, block_size=4, max_model_len=64)
    sched = make_scheduler(cfg, 8)
    with pytest.raises(AdmissionError, match="max_model_len 64"):
        sched.add_request(make_request(0, 60, 10))
    with pytest.raises(AdmissionError, match="KV blocks"):
        sched.add_request(make_request(1, 40, 2))
    with pytest.raises(AdmissionError, match="empty"):
        sched.add_request(make_request(2, 0, 2))


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="token_budget"):
        SchedulerConfig(token_budget=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(token_budget=8, max_num_seqs=16)
    with pytest.raises(ValueError, match="'fifo'"):
        SchedulerConfig(policy="fifo")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_block_manager_integrity_detects_double_ownership():
    bm = BlockManager(4, 4)
    r = make_request(0, 8, 1)
    bm.allocate(r, 8)
    assert r.block_ids == [0, 1] and bm.num_free_blocks == 2
    bm._free.append(r.block_ids[0])   # corrupt on purpose
    with pytest.raises(AssertionError, match="duplicated"):
        bm.check_integrity([r])


def test_importing_scheduler_does_not_load_torch():
    code = ("import sys, scheduler.sarathi, scheduler.core, scheduler.block_manager, engine.protocol; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_modules_a_simulator_shares_load_neither_torch_nor_httpx():
    code = ("import sys, scheduler.telemetry, engine.model_config, gateway.routing, bench.results; "
            "loaded = {'torch', 'httpx'} & set(sys.modules); assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_iteration_stats_reads_the_step_and_the_queues_it_left():
    from scheduler.telemetry import iteration_stats

    cfg = SchedulerConfig(token_budget=16, max_num_seqs=2, block_size=4, max_model_len=256)
    sched = make_scheduler(cfg, 64)
    for i in range(3):
        sched.add_request(make_request(i, 10, 2, arrival=0.0))
    out = sched.schedule(0.0)
    sched.update(out, {c.request.request_id: 1 for c in out.chunks if c.samples}, 0.0)
    stats = iteration_stats(sched, out, iteration=7, time=123.0, step_time=0.5)
    assert (stats.iteration, stats.time, stats.step_time) == (7, 123.0, 0.5)
    assert stats.token_budget == out.token_budget == 16
    assert (stats.num_prefill_tokens, stats.num_decode_tokens) == (16, 0)
    assert stats.num_seqs == len(out.chunks) == 2 and stats.num_preemptions == 0
    assert (stats.num_running, stats.num_waiting) == (2, 1)
    assert stats.kv_cache_usage == sched.block_manager.usage > 0


def test_remote_prefill_reserves_blocks_then_joins_as_a_decode():
    cfg = SchedulerConfig(token_budget=16, max_num_seqs=4, block_size=4, max_model_len=256)
    sched = make_scheduler(cfg, 32)
    r = make_request(0, 10, 3)
    assert sched.add_remote_prefill(r)
    assert len(r.block_ids) == 3 and not sched.has_work()      # waits for KV, computes nothing
    assert sched.schedule(0.0).is_empty
    sched.remote_prefill_done("r0", 1.0)
    out = sched.schedule(1.0)
    assert [(c.request.request_id, c.num_tokens, c.samples) for c in out.chunks] == [("r0", 1, True)]
    sched.update(out, {"r0": 9}, 1.0)
    assert r.output_token_ids == [9]
    run_to_completion(sched, [], random.Random(0))
    assert sched.block_manager.num_free_blocks == 32


def test_remote_prefill_failure_falls_back_to_local_prefill_and_abort_frees():
    cfg = SchedulerConfig(token_budget=16, max_num_seqs=4, block_size=4, max_model_len=256)
    sched = make_scheduler(cfg, 32)
    a, b = make_request(0, 10, 3), make_request(1, 10, 3)
    assert sched.add_remote_prefill(a) and sched.add_remote_prefill(b)
    sched.remote_prefill_failed("r0")
    assert a.block_ids == [] and a.num_computed_tokens == 0 and sched.waiting[0] is a
    assert sched.finish("r1", FinishReason.ABORT) is b
    sched.check_integrity()
    run_to_completion(sched, [], random.Random(0))
    assert a.is_finished and sched.block_manager.num_free_blocks == 32


def test_remote_prefill_refused_when_blocks_are_short():
    cfg = SchedulerConfig(token_budget=16, max_num_seqs=4, block_size=4, max_model_len=256, watermark=0.0)
    sched = make_scheduler(cfg, 6)
    assert sched.add_remote_prefill(make_request(0, 16, 4))        # 4 blocks
    assert not sched.add_remote_prefill(make_request(1, 12, 4))    # needs 3, 2 free
    assert sched.get("r1") is None


def test_remote_prefill_does_not_overtake_requests_waiting_for_memory():
    cfg = SchedulerConfig(token_budget=64, max_num_seqs=4, block_size=4, max_model_len=256, watermark=0.0)
    sched = make_scheduler(cfg, 8)
    first = make_request(0, 24, 4)                  # 6 blocks, running
    sched.add_request(first)
    sched.update(sched.schedule(0.0), {"r0": 5}, 0.0)
    waiting = make_request(1, 12, 4)                # needs 3 blocks, 2 free: waits
    sched.add_request(waiting)
    assert [c.request for c in sched.schedule(0.1).chunks] == [first]
    late = make_request(2, 4, 2)                    # 1 block would fit, but r1 needs those 2
    assert not sched.add_remote_prefill(late)
    assert late.block_ids == [] and sched.get("r2") is None
    sched.add_request(late)                         # the caller's fallback: FCFS, behind r1
    assert list(sched.waiting) == [waiting, late]


def test_remote_prefill_may_use_what_the_waiting_queue_does_not_need():
    cfg = SchedulerConfig(token_budget=64, max_num_seqs=4, block_size=4, max_model_len=256, watermark=0.0)
    sched = make_scheduler(cfg, 16)
    sched.add_request(first := make_request(0, 8, 4))   # waiting (not yet scheduled): 2 blocks
    assert sched.add_remote_prefill(make_request(1, 40, 4))     # 10 blocks: 14 <= 16
    assert not sched.add_remote_prefill(make_request(2, 20, 4))  # 5 of the 6 left: r0 short
    sched.update(out := sched.schedule(0.0), {"r0": 5}, 0.0)
    assert first in sched.running and [c.request for c in out.chunks] == [first]


def test_late_transfer_events_for_ended_requests_are_ignored():
    cfg = SchedulerConfig(token_budget=16, max_num_seqs=4, block_size=4, max_model_len=256)
    sched = make_scheduler(cfg, 32)
    r = make_request(0, 10, 3)
    assert sched.add_remote_prefill(r)
    sched.finish("r0", FinishReason.ABORT)
    assert not sched.remote_prefill_done("r0", 1.0)
    assert not sched.remote_prefill_failed("r0")
    assert not sched.has_work() and sched.block_manager.num_free_blocks == 32
    sched.check_integrity()


def test_gateway_and_cli_do_not_load_torch():
    code = ("import sys, gateway.app, cluster.cli; cluster.cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert 'ray' not in sys.modules, 'ray was imported without --ray-address'")
    subprocess.run([sys.executable, "-c", code], check=True)
