"""The policy family and budget controllers, driven with no torch (schedule -> fake -> update)."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.budget import FeedbackBudget, ProfileSample, StepFeatures, StepTimeModel, pick_budget
from scheduler.config import BudgetConfig, SchedulerConfig
from scheduler.policies import SCHEDULERS, make_scheduler
from scheduler.request import Request, RequestStatus, SamplingParams
from scheduler.telemetry import IterationStats
from tests.test_scheduler import make_request, run_to_completion

POLICIES = list(SCHEDULERS)


def config(policy: str, **kw) -> SchedulerConfig:
    base = dict(policy=policy, token_budget=32, max_num_seqs=8, block_size=4, max_model_len=256,
                max_batched_tokens=256)
    return SchedulerConfig(**{**base, **kw})


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=25, deadline=None)
@given(
    num_blocks=st.integers(70, 120),
    workload=st.lists(st.tuples(st.integers(1, 120), st.integers(1, 20), st.integers(0, 30)),
                      min_size=1, max_size=10),
    seed=st.integers(0, 1000),
)
def test_every_policy_finishes_everything_and_returns_every_block(policy, num_blocks, workload, seed):
    cfg = config(policy)
    sched = make_scheduler(cfg, num_blocks)
    requests = [make_request(i, p, m, arrival=float(a) + i * 1e-3) for i, (p, m, a) in enumerate(workload)]

    def check(out, decoding_before):
        if policy in ("sarathi", "chunked_only"):
            assert out.num_tokens <= cfg.token_budget
        if policy in ("vllm", "orca", "request"):
            assert out.num_tokens <= cfg.max_batched_tokens
        assert len(out.chunks) <= cfg.max_num_seqs

    run_to_completion(sched, requests, random.Random(seed), on_step=check)
    assert all(r.is_finished and r.num_output_tokens == r.sampling.max_tokens for r in requests)
    assert sched.block_manager.num_free_blocks == num_blocks


def start_decoding(sched, n: int, prompt: int = 4) -> list:
    """n requests that have finished their prompt and are decoding."""
    reqs = [make_request(i, prompt, 100) for i in range(n)]
    for r in reqs:
        sched.add_request(r)
    while any(r.num_output_tokens == 0 for r in reqs):
        out = sched.schedule(0.0)
        sched.update(out, {c.request.request_id: 5 for c in out.chunks if c.samples}, 0.0)
    return reqs


def kinds(out):
    """'d' for a decode chunk, 'p' for a prefill chunk, in batch order."""
    return "".join("d" if c.num_tokens == 1 and c.request.num_output_tokens > 0 else "p" for c in out.chunks)


def test_vllm_stalls_decodes_while_a_prefill_only_batch_runs():
    sched = make_scheduler(config("vllm"), 200)
    start_decoding(sched, 3)
    sched.add_request(make_request(10, 100, 4, arrival=50.0))
    out = sched.schedule(1.0)
    assert kinds(out) == "p" and out.chunks[0].num_tokens == 100   # whole prompt, decodes stall
    sched.update(out, {"r10": 1}, 1.0)
    assert kinds(sched.schedule(2.0)) == "dddd"                   # then everyone decodes


def test_sarathi_never_stalls_and_chunks():
    sched = make_scheduler(config("sarathi"), 200)
    start_decoding(sched, 3)
    sched.add_request(make_request(10, 100, 4, arrival=50.0))
    out = sched.schedule(1.0)
    assert kinds(out) == "dddp" and out.num_tokens == 32          # 3 decodes + 29-token chunk


def test_orca_mixes_whole_prompts_with_decodes():
    sched = make_scheduler(config("orca"), 200)
    start_decoding(sched, 3)
    sched.add_request(make_request(10, 100, 4, arrival=50.0))
    out = sched.schedule(1.0)
    assert kinds(out) == "dddp" and out.chunks[-1].num_tokens == 100


def test_hybrid_only_mixes_but_never_chunks():
    sched = make_scheduler(config("hybrid_only"), 200)
    start_decoding(sched, 3)
    sched.add_request(make_request(10, 100, 4, arrival=50.0))
    sched.add_request(make_request(11, 10, 4, arrival=51.0))
    out = sched.schedule(1.0)
    # the long prompt goes whole (first prompt of the iteration), the next does not fit the budget
    assert kinds(out) == "dddp" and out.chunks[-1].num_tokens == 100


def test_chunked_only_alternates_prefill_chunks_and_decodes():
    sched = make_scheduler(config("chunked_only"), 200)
    start_decoding(sched, 3)
    sched.add_request(make_request(10, 100, 4, arrival=50.0))
    seen = []
    for step in range(6):
        out = sched.schedule(float(step))
        seen.append(kinds(out))
        sched.update(out, {c.request.request_id: 5 for c in out.chunks if c.samples}, float(step))
    assert seen[:5] == ["ddd", "p", "ddd", "p", "ddd"]   # the last start-up step was a prefill
    assert all(n <= 32 for n in [c.num_tokens for c in out.chunks])


def test_request_level_runs_a_batch_to_completion_before_admitting():
    sched = make_scheduler(config("request"), 200)
    first = [make_request(i, 8, 3) for i in range(2)]
    for r in first:
        sched.add_request(r)
    out = sched.schedule(0.0)
    assert kinds(out) == "pp"
    sched.update(out, {"r0": 1, "r1": 1}, 0.0)
    late = make_request(5, 8, 3, arrival=0.5)
    sched.add_request(late)
    while not all(r.is_finished for r in first):
        out = sched.schedule(1.0)
        assert late.request_id not in {c.request.request_id for c in out.chunks}
        sched.update(out, {c.request.request_id: 1 for c in out.chunks if c.samples}, 1.0)
    assert kinds(sched.schedule(2.0)) == "p"


def test_watermark_keeps_blocks_free_for_running_requests():
    cfg = config("sarathi", watermark=0.2)
    sched = make_scheduler(cfg, 20)                 # watermark: 4 blocks
    sched.add_request(make_request(0, 7, 10))       # 2 blocks (8 tokens after its first decode)
    sched.update(sched.schedule(0.0), {"r0": 1}, 0.0)
    sched.add_request(make_request(1, 56, 2))       # 14 blocks: would leave 4 free -> allowed
    sched.add_request(make_request(2, 4, 2))        # 1 more would break the watermark
    out = sched.schedule(1.0)
    assert {c.request.request_id for c in out.chunks} == {"r0", "r1"}


def test_config_rejects_whole_prompt_policy_that_cannot_hold_a_prompt():
    with pytest.raises(ValueError, match="max_batched_tokens"):
        SchedulerConfig(policy="vllm", max_batched_tokens=512, max_model_len=2048)


def stats(step_time: float, budget: int, prefill: int, decode: int = 4) -> IterationStats:
    return IterationStats(0, 0.0, step_time, budget, decode, prefill, decode + 1, 0, 5, 1, 0.1)


def test_feedback_budget_backs_off_when_steps_are_slow_and_probes_up_when_fast():
    ctl = FeedbackBudget(initial=512, tbt_slo_s=0.1, tile=32, min_budget=64, max_budget=1024)
    for _ in range(40):
        ctl.observe(stats(0.2, ctl.value, prefill=ctl.value - 4))
    assert ctl.value == 64                          # cut to the floor under sustained violation
    for _ in range(200):
        ctl.observe(stats(0.01, ctl.value, prefill=ctl.value - 4))
    assert ctl.value > 256 and ctl.value % 32 == 0  # grows back, tile-aligned
    before = ctl.value
    for _ in range(50):
        ctl.observe(stats(0.01, ctl.value, prefill=0))   # budget not binding: no reason to grow
    assert ctl.value == before


def test_step_time_model_fit_and_budget_pick():
    true = StepTimeModel([0.01, 1e-4, 5e-4, 1e-7, 1e-8, 2e-4])
    samples = [ProfileSample(StepFeatures.uniform(p, d, c, k), true.predict(StepFeatures.uniform(p, d, c, k)))
               for p in (0, 64, 256, 512) for d in (0, 8, 32) for c in (0, 128, 1024) for k in (1, 2)
               if p or d]
    fitted = StepTimeModel.fit(samples)
    probe = StepFeatures.uniform(300, 16, 600, 3)
    assert fitted.predict(probe) == pytest.approx(true.predict(probe), rel=1e-9)
    b = pick_budget(fitted, tbt_slo_s=0.05, decode_tokens=16, context=512, tile=32,
                    min_budget=32, max_budget=2048)
    assert b % 32 == 0
    at = lambda budget: true.predict(StepFeatures.uniform(budget - 16, 16, 512))  # noqa: E731
    assert at(b) <= 0.05 < at(b + 32)


def test_step_features_of_a_scheduler_output():
    """Each chunk counts with its own context: decodes by the KV they read, prefill chunks by
    p * (start + p/2), and the features of uniform shapes agree with a real output's."""
    from scheduler.core import ScheduledChunk

    def request(rid, prompt, computed):
        r = Request(rid, list(range(1, prompt + 1)), SamplingParams(max_tokens=4), 0.0)
        r.num_computed_tokens = computed
        return r

    chunks = [ScheduledChunk(request("d1", 100, 99), 1), ScheduledChunk(request("d2", 300, 299), 1),
              ScheduledChunk(request("p1", 500, 200), 64), ScheduledChunk(request("p2", 40, 0), 40)]
    f = StepFeatures.of(chunks)
    assert f == StepFeatures(prefill_tokens=104, decodes=2, decode_context=99 + 299,
                             prefill_attention=64 * (200 + 32) + 40 * 20, sequences=4)
    same = [ScheduledChunk(request(f"d{i}", 129, 128), 1) for i in range(3)]
    same.append(ScheduledChunk(request("p", 500, 128), 64))
    assert StepFeatures.of(same) == StepFeatures.uniform(64, 3, 128)


def test_profiles_in_the_old_format_still_load():
    from scheduler.budget import samples_from_json, samples_to_json

    old = [{"prefill_tokens": 64, "decode_tokens": 8, "context": 128, "step_time": 0.02}]
    (s,) = samples_from_json(old)
    assert s.features == StepFeatures.uniform(64, 8, 128) and s.step_time == 0.02
    assert samples_from_json(samples_to_json([s])) == [s]


def served_trace(coef: list[float], steps: int = 300) -> list[dict]:
    """What `tandem serve --trace-file` writes for a replica whose steps cost exactly `coef`:
    sarathi stepping a random workload, every step's record as the engine builds it."""
    from dataclasses import asdict

    from scheduler.telemetry import iteration_stats

    rng = random.Random(3)
    sched = make_scheduler(config("sarathi", token_budget=128), 512)
    truth, rows, now = StepTimeModel(coef), [], 0.0
    for i in range(steps):
        if rng.random() < 0.3:
            sched.add_request(make_request(i, rng.randint(8, 200), rng.randint(1, 40), now))
        out = sched.schedule(now)
        if out.is_empty:
            continue
        dt = truth.predict(StepFeatures.of(out.chunks))
        now += dt
        sched.update(out, {c.request.request_id: 0 for c in out.chunks if c.samples}, now)
        stats = iteration_stats(sched, out, iteration=len(rows), time=now, step_time=dt)
        rows.append({"replica": "hybrid-0", **asdict(stats)})
    return rows


def test_a_profile_fitted_on_served_steps_predicts_them():
    """`tandem profile --from-trace`: the served steps' own features, fitted."""
    from scheduler.budget import samples_from_trace

    coef = [0.05, 4e-4, 1e-3, 3e-6, 1.5e-6, 2e-4]
    rows = served_trace(coef)
    samples = samples_from_trace(rows)
    assert len(samples) == len(rows) > 100
    assert {s.features.decodes > 0 for s in samples} == {True, False}
    fitted = StepTimeModel.fit(samples)
    for s in samples:
        assert fitted.predict(s.features) == pytest.approx(s.step_time, rel=1e-6)
    old = [{k: v for k, v in rows[0].items() if k not in ("decode_context", "prefill_attention")}]
    with pytest.raises(ValueError, match="no step features"):
        samples_from_trace(old)


def test_profile_from_trace_command(tmp_path):
    import gzip
    import json

    from cluster.cli import build_parser
    from scheduler.budget import load_profile

    trace = tmp_path / "steps.jsonl.gz"
    with gzip.open(trace, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in served_trace([0.05, 4e-4, 1e-3, 3e-6, 1.5e-6, 2e-4]))
    out = tmp_path / "profile.json"
    args = build_parser().parse_args(["profile", "--from-trace", str(trace), "--out", str(out)])
    args.func(args)
    assert len(load_profile(out)) > 100
    bad = tmp_path / "old.jsonl"
    bad.write_text(json.dumps({"iteration": 0, "step_time": 0.1}) + "\n")
    args = build_parser().parse_args(["profile", "--from-trace", str(bad), "--out", str(out)])
    with pytest.raises(SystemExit, match="no step features"):
        args.func(args)
    from tests.no_torch import run_without_torch

    packed = tmp_path / "profile.json.gz"  # gzipped by its name; --from-trace needs no torch
    run_without_torch(f"""
        from cluster.cli import main
        main(["profile", "--from-trace", {str(trace)!r}, "--out", {str(packed)!r}])
    """)
    assert packed.read_bytes()[:2] == b"\x1f\x8b" and load_profile(packed) == load_profile(out)


def test_feedback_policy_wires_through_make_scheduler():
    cfg = config("sarathi", budget=BudgetConfig(kind="feedback", tbt_slo_ms=50, tile=16))
    sched = make_scheduler(cfg, 64)
    assert sched.token_budget == 32
    for _ in range(4):   # the controller judges a change only after a cooldown of 4 decode steps
        sched.observe(stats(1.0, 32, prefill=28))
    assert cfg.min_budget <= sched.token_budget < 32   # a StaticBudget would still say 32


def test_feedback_budget_reaches_the_replica_engine(tiny_model_dir):
    """`--budget feedback` must give a replica an engine whose budget follows its own step times.
    The config takes the JSON round trip a replica process gets it through (cluster.node), and
    real steps, all slower than an absurdly tight TBT SLO, must cut the budget."""
    import json

    from engine.config import EngineConfig
    from engine.core import EngineCore
    from scheduler.request import SamplingParams

    cfg = EngineConfig(
        model_dir=str(tiny_model_dir), dtype="float32", compile=False, num_kv_blocks=64,
        scheduler=SchedulerConfig(token_budget=128, max_num_seqs=8, max_model_len=256,
                                  budget=BudgetConfig(kind="feedback", tbt_slo_ms=1e-3, tile=16)))
    engine = EngineCore(EngineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))))
    assert engine.scheduler.token_budget == 128
    engine.add_request("a", list(range(10, 18)),
                       SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    while engine.has_work():   # 1 prefill step, then 7 decode steps (the controller judges those)
        engine.step()
    assert engine.scheduler.token_budget < 128
    assert engine.stats().token_budget == engine.scheduler.token_budget   # what the gateway sees


@settings(max_examples=25, deadline=None)
@given(
    workload=st.lists(st.tuples(st.integers(1, 200), st.integers(1, 20), st.integers(0, 30)),
                      min_size=1, max_size=10),
    seed=st.integers(0, 1000),
)
def test_idle_budget_only_applies_when_nobody_decodes(workload, seed):
    """With decodes in the batch the token budget holds as before; without, prefill may take the
    larger idle budget and nothing more."""
    cfg = config("sarathi", idle_token_budget=128)
    sched = make_scheduler(cfg, 200)
    requests = [make_request(i, p, m, arrival=float(a) + i * 1e-3) for i, (p, m, a) in enumerate(workload)]

    def check(out, decoding_before):
        if any(c.request in decoding_before for c in out.chunks):
            assert out.num_tokens <= cfg.token_budget
        else:
            assert out.num_tokens <= cfg.idle_token_budget

    run_to_completion(sched, requests, random.Random(seed), on_step=check)
    assert all(r.is_finished for r in requests)
    assert sched.block_manager.num_free_blocks == 200


def test_idle_budget_prefills_a_lone_prompt_in_one_step():
    sched = make_scheduler(config("sarathi", idle_token_budget=128), 100)
    sched.add_request(make_request(0, 100, 4))
    out = sched.schedule(0.0)
    assert [c.num_tokens for c in out.chunks] == [100] and out.token_budget == 128
    sched.update(out, {"r0": 5}, 0.0)
    sched.add_request(make_request(1, 100, 4))
    out = sched.schedule(0.0)        # request 0 decodes now: back to the 32-token budget
    assert out.num_decode_tokens == 1 and out.num_tokens == 32 and out.token_budget == 32


def test_feedback_budget_ignores_steps_without_decodes():
    """A prefill-only step delays no token, however long it takes."""
    ctl = FeedbackBudget(initial=256, tbt_slo_s=0.1, tile=32, min_budget=64, max_budget=1024)
    for _ in range(40):
        ctl.observe(stats(1.0, 256, prefill=256, decode=0))
    assert ctl.value == 256


def test_profiled_budget_with_too_few_samples_starts_on_the_static_budget(tiny_model_dir, tmp_path):
    """A profile too small to fit (a small cache or context skips most of the grid) must not stop
    the replica: it serves with --token-budget and says so in the log."""
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from scheduler.budget import StaticBudget, save_profile
    from scheduler.config import BudgetConfig, SchedulerConfig

    path = tmp_path / "profile.json"
    save_profile([ProfileSample(StepFeatures.uniform(64, 1, 128), 0.01),
                  ProfileSample(StepFeatures.uniform(128, 1, 128), 0.02)], path)
    engine = EngineCore(EngineConfig(
        model_dir=str(tiny_model_dir), dtype="float32", num_kv_blocks=64,
        scheduler=SchedulerConfig(token_budget=48, max_num_seqs=8, max_model_len=256,
                                  budget=BudgetConfig(kind="profiled", profile_path=str(path)))))
    assert isinstance(engine.scheduler.budget, StaticBudget)
    assert engine.scheduler.budget.value == 48


# Every policy claims FCFS admission (admit_waiting, or request-level's own head-of-queue loop).
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=30, deadline=None)
@given(
    num_blocks=st.integers(12, 60),
    workload=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 20), st.integers(0, 15),
                                st.sampled_from(["local", "remote", "remote_fails"]),
                                st.integers(0, 3)),
                      min_size=1, max_size=12),
    seed=st.integers(0, 1000),
)
def test_admission_is_fcfs_and_preempted_requests_go_back_to_the_head(policy, num_blocks,
                                                                      workload, seed):
    """Drives random arrivals (some as remote prefills whose KV lands or fails a few steps later)
    against a model of the waiting queue: arrival order, except that requests pushed back
    (preempted, or a failed remote prefill, which was already placed) go to its head. Each step
    must admit a prefix of the queue, and nothing may overtake a request queued before it."""
    cfg = config(policy)
    sched = make_scheduler(cfg, num_blocks)
    rng = random.Random(seed)
    pending = [(a, i, make_request(i, p, m, arrival=a + i * 1e-3), kind, delay)
               for i, (p, m, a, kind, delay) in enumerate(workload)
               if sched.block_manager.blocks_for(p + m) <= num_blocks]  # else rejected up front
    pending.sort(key=lambda x: x[:2])
    queue: list = []               # the model of sched.waiting
    behind: dict[str, set] = {}    # waiting request -> ids queued after it (may not overtake it)
    landing: dict[str, tuple[int, bool]] = {}   # remote prefill -> (step its KV lands, succeeds)

    def arrived(r):                # everyone waiting now is ahead of r
        for ids in behind.values():
            ids.add(r.request_id)

    def check_no_overtaking(admitted):
        for r in admitted:
            behind.pop(r.request_id, None)
        for w, later in behind.items():
            jumped = [r.request_id for r in admitted if r.request_id in later]
            assert not jumped, f"{jumped} admitted before {w}, which was queued ahead of them"

    step = 0
    while pending or sched.has_work() or landing:
        while pending and pending[0][0] <= step:
            _, _, r, kind, delay = pending.pop(0)
            arrived(r)
            if kind != "local":
                if sched.add_remote_prefill(r):
                    # It may reserve while others wait, but only what they do not need: a slot
                    # and the prompt blocks of each stay free, so it delays none of them.
                    bm = sched.block_manager
                    need = sum(bm.num_new_blocks(w, w.num_tokens) for w in sched.waiting)
                    assert bm.num_free_blocks >= need, "a remote prefill took blocks the queue needs"
                    assert sched.num_seqs_reserved + len(sched.waiting) <= cfg.max_num_seqs
                    for ids in behind.values():   # not an overtaking: it needs nothing of theirs
                        ids.discard(r.request_id)
                    landing[r.request_id] = (step + delay, kind == "remote")
                    continue
            sched.add_request(r)   # what the engine does when the reservation is refused
            queue.append(r)
            behind[r.request_id] = set()
        for rid, (at, ok) in list(landing.items()):
            if at <= step:
                del landing[rid]
                if ok:
                    sched.remote_prefill_done(rid, float(step))
                else:                                  # falls back to a local prefill, first
                    sched.remote_prefill_failed(rid)
                    queue.insert(0, sched.get(rid))
                    behind[rid] = {r.request_id for r in queue[1:]}
        assert list(sched.waiting) == queue

        out = sched.schedule(float(step))
        admitted = [r for r in queue if r.status is RequestStatus.RUNNING]
        assert admitted == queue[:len(admitted)], "admitted requests are not a prefix of the queue"
        check_no_overtaking(admitted)
        victims = [sched.get(rid) for rid in out.preempted_ids]
        rest = queue[len(admitted):]
        head = list(sched.waiting)[:len(victims)]
        assert set(head) == set(victims), "preempted requests are not at the head of the queue"
        assert list(sched.waiting)[len(victims):] == rest
        queue = head + rest
        for i, v in enumerate(head):   # all queued after a victim, and later arrivals, are behind it
            behind[v.request_id] = {r.request_id for r in queue[i + 1:]}

        sampled = {c.request.request_id: rng.randrange(1, 100) for c in out.chunks if c.samples}
        sched.update(out, sampled, float(step))
        sched.check_integrity()
        step += 1
        assert step < 10_000, "scheduler made no progress"
    assert sched.block_manager.num_free_blocks == num_blocks
