"""EngineCore: one replica's scheduler + runner + detokenizer, stepped by its server loop.

    step():  out = scheduler.schedule(now)
             result = runner.execute(out)
             updated = scheduler.update(out, result.sampled, now)
             -> detokenize new tokens, end requests whose text hit a stop string, report outputs
                (with the sampled token's logprobs, and the prompt's on the first output, if asked)
"""
from __future__ import annotations

import time
from dataclasses import replace

from engine.config import EngineConfig
from engine.model_config import ModelConfig
from engine.protocol import ReplicaStats, RequestOutput
from engine.runner import ModelRunner
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from scheduler.core import AdmissionError
from scheduler.config import STEP_MODEL_BUDGETS
from scheduler.request import DEFAULT_TENANT, FinishReason, Request, SamplingParams
from scheduler.policies import make_scheduler
from scheduler.telemetry import IterationStats, iteration_stats


class EngineCore:
    def __init__(self, config: EngineConfig, keep_logits: bool = False) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model_dir)
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        self.runner = ModelRunner(config, self.model_config, keep_logits=keep_logits)
        sched_config, step_model = config.scheduler, None
        if sched_config.budget.kind in STEP_MODEL_BUDGETS:
            from engine.profiler import load_or_profile  # noqa: PLC0415 - only this mode needs it

            step_model = load_or_profile(self.runner, sched_config)
            if step_model is None:   # too few samples to fit: start, on the static budget
                sched_config = replace(sched_config, budget=replace(sched_config.budget, kind="static"))
        self.scheduler = make_scheduler(sched_config, self.runner.num_blocks, step_model)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._queue_time_sent: set[str] = set()
        self._prompt_logprobs: dict[str, list] = {}
        """Prompt logprob entries gathered over a request's prefill chunks (first is None)."""
        self.iteration = 0
        self.last_step: IterationStats | None = None
        self.last_logits = None

    # -- requests in ------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
        arrival_time: float | None = None, tenant: str = DEFAULT_TENANT,
    ) -> RequestOutput | None:
        """Queue a request; returns an error output right away if it can never run here."""
        return self._add(request_id, prompt_token_ids, sampling, arrival_time, remote=False,
                         tenant=tenant)

    def add_remote_prefill(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
        arrival_time: float | None = None, tenant: str = DEFAULT_TENANT,
    ) -> Request | RequestOutput | None:
        """Decode side of disaggregation: reserve blocks for a prompt whose KV another replica
        will push. Returns the Request (its `block_ids` are where the KV goes), an error output,
        or None when there is no room right now -- then it was queued for a local prefill."""
        return self._add(request_id, prompt_token_ids, sampling, arrival_time, remote=True,
                         tenant=tenant)

    def _add(self, request_id, prompt_token_ids, sampling, arrival_time, remote: bool,
             tenant: str = DEFAULT_TENANT):
        request = Request(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling=sampling,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            eos_token_ids=self.eos_token_ids, tenant=tenant,
        )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.model_config.vocab_size]
        reserved = False
        try:
            if bad:
                raise AdmissionError(f"token ids outside the vocabulary: {bad[:5]}")
            reserved = remote and self.scheduler.add_remote_prefill(request)
            if not reserved:
                self.scheduler.add_request(request)
        except AdmissionError as e:
            return RequestOutput(request_id, [], "", len(prompt_token_ids), 0,
                                 finish_reason=FinishReason.ERROR.value, error=str(e))
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        return request if reserved else None

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        outputs = []
        for rid in request_ids:
            request = self.scheduler.finish(rid, FinishReason.ABORT)
            if request is not None:
                outputs.append(self._output(request, [], ""))
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- the hot loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        now = time.monotonic()
        out = self.scheduler.schedule(now)
        scheduled = time.perf_counter()
        result = self.runner.execute(out)
        executed = time.perf_counter()
        updated = self.scheduler.update(out, result.sampled, time.monotonic())
        self.last_logits = result.logits
        for rid, (pos, entries) in (result.prompt_logprobs or {}).items():
            buf = self._prompt_logprobs.setdefault(rid, [None])
            del buf[pos:]  # a preempted prefill recomputes from the start
            buf.extend(entries)
        logprobs = result.logprobs or {}

        outputs = []
        for request in updated:
            token = request.output_token_ids[-1]
            detok = self._detok[request.request_id]
            text, stop_hit = detok.add([token])
            if stop_hit and not request.is_finished:
                self.scheduler.finish(request.request_id, FinishReason.STOP)
            elif request.is_finished and not stop_hit:
                text += detok.flush()
            if stop_hit:
                request.finish_reason = FinishReason.STOP
            prompt_lps = None
            if request.sampling.prompt_logprobs is not None and request.num_output_tokens == 1:
                prompt_lps = self._prompt_logprobs.pop(request.request_id, [None])
            output = self._output(request, [token], text)
            entry = logprobs.get(request.request_id)
            output.logprobs = None if entry is None else [list(entry)]
            output.prompt_logprobs = prompt_lps
            outputs.append(output)
        times = self.runner.times
        times.schedule, times.update = scheduled - start, time.perf_counter() - executed
        s = self.scheduler
        self.last_step = iteration_stats(s, out, iteration=self.iteration, time=time.time(),
                                         step_time=time.perf_counter() - start)
        self.iteration += 1
        s.observe(self.last_step)
        return outputs

    def _output(self, request: Request, new_tokens: list[int], text: str) -> RequestOutput:
        rid = request.request_id
        queue_time = None
        if rid not in self._queue_time_sent and request.first_scheduled_time is not None:
            queue_time = request.first_scheduled_time - request.arrival_time
            self._queue_time_sent.add(rid)
        reason = request.finish_reason.value if request.is_finished else None
        if request.is_finished:
            self._detok.pop(rid, None)
            self._queue_time_sent.discard(rid)
            self._prompt_logprobs.pop(rid, None)
            self.runner.release(rid)
        return RequestOutput(
            request_id=rid, new_token_ids=new_tokens, text=text,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens, finish_reason=reason,
            queue_time=queue_time,
        )

    def stats(self) -> ReplicaStats:
        s, bm = self.scheduler, self.scheduler.block_manager
        return ReplicaStats(
            num_running=len(s.running), num_waiting=len(s.waiting),
            num_free_blocks=bm.num_free_blocks, num_blocks=bm.num_blocks,
            kv_cache_usage=bm.usage, num_preemptions=s.num_preemptions, token_budget=s.token_budget,
            max_num_seqs=s.config.max_num_seqs, prefix_cache_queries=bm.num_queried_tokens,
            prefix_cache_hits=bm.num_hit_tokens, slo_infeasible_steps=s.budget.infeasible_steps,
        )
