"""Prometheus metrics of the gateway, in a registry per app (tests create many apps).

Names follow vLLM's (`tandem:` instead of `vllm:`); everything is labelled by `replica`, except
the `tandem:tenant_*` family, labelled by `tenant` (bounded: configured key names, plus at most
`max_user_tenants` values of the `user` field and "other"; gateway/tenants.py).
Per-request histograms/counters are observed by the request handlers; the replica gauges are
refreshed from the latest ReplicaStats each time `/metrics` is scraped.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from engine.protocol import ReplicaStats
from scheduler.telemetry import IterationStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "tandem:time_to_first_token_seconds", "Gateway arrival to first generated token.",
            ["replica"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "tandem:inter_token_latency_seconds", "Time between consecutive outputs of a request.",
            ["replica"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "tandem:e2e_request_latency_seconds", "Gateway arrival to the finished response.",
            ["replica"], buckets=_E2E_BUCKETS, registry=r)
        self.request_queue_time = Histogram(
            "tandem:request_queue_time_seconds", "Arrival at the replica to first scheduling.",
            ["replica"], buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "tandem:prompt_tokens", "Prompt tokens of finished requests.", ["replica"], registry=r)
        self.generation_tokens = Counter(
            "tandem:generation_tokens", "Generated tokens.", ["replica"], registry=r)
        self.request_success = Counter(
            "tandem:request_success", "Requests finished, by finish reason.",
            ["replica", "finished_reason"], registry=r)
        self.num_requests_running = Gauge(
            "tandem:num_requests_running", "Requests running on the replica.", ["replica"],
            registry=r)
        self.num_requests_waiting = Gauge(
            "tandem:num_requests_waiting", "Requests waiting on the replica.", ["replica"],
            registry=r)
        self.iteration_step_time = Histogram(
            "tandem:iteration_step_time_seconds", "Duration of one replica iteration (step).",
            ["replica"], buckets=_LATENCY_BUCKETS, registry=r)
        self.iteration_tokens = Histogram(
            "tandem:iteration_tokens", "Tokens processed per iteration, by kind (decode/prefill).",
            ["replica", "kind"], buckets=(0, 1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=r)
        self.num_preemptions = Counter(
            "tandem:num_preemptions", "Requests preempted (by recompute) on the replica.",
            ["replica"], registry=r)
        self.token_budget = Gauge(
            "tandem:token_budget", "Token budget of the replica's latest iteration.", ["replica"],
            registry=r)
        self.requests_rejected = Counter(
            "tandem:requests_rejected", "Requests refused before reaching a replica: "
            "overloaded (429) or unavailable (503).", ["reason"], registry=r)
        self.kv_transfer_bytes = Counter(
            "tandem:kv_transfer_bytes", "KV bytes on the wire (after the codec), by codec.",
            ["replica", "codec"], registry=r)
        self.kv_transfer_raw_bytes = Counter(
            "tandem:kv_transfer_raw_bytes", "KV bytes moved before the codec, by codec.",
            ["replica", "codec"], registry=r)
        self.kv_transfer_latency = Histogram(
            "tandem:kv_transfer_latency_seconds", "First KV frame sent to transfer done.",
            ["replica"], buckets=_LATENCY_BUCKETS, registry=r)
        self.kv_transfer_failures = Counter(
            "tandem:kv_transfer_failures", "KV transfers that failed, by reason.",
            ["replica", "reason"], registry=r)
        self.kv_fallbacks = Counter(
            "tandem:kv_fallbacks", "Offloaded prompts prefilled on the decode replica instead "
            "(recompute after a failed transfer, or local when blocks were short).",
            ["replica", "fallback"], registry=r)
        self.offload_decisions = Gauge(
            "tandem:pd_offload_decisions", "Routing decisions so far (offload, local_short, "
            "local_prefill_busy, local).", ["decision"], registry=r)
        self.kv_cache_usage_perc = Gauge(
            "tandem:kv_cache_usage_perc", "KV cache usage of the replica (1 = 100%).", ["replica"],
            registry=r)
        self.prefix_cache_queries = Counter(
            "tandem:prefix_cache_queries", "Tokens looked up in the replica's prefix cache when "
            "requests were admitted (hit rate = hits / queries).", ["replica"], registry=r)
        self.prefix_cache_hits = Counter(
            "tandem:prefix_cache_hits", "Tokens found in the replica's prefix cache at admission: "
            "their KV was reused, not computed.", ["replica"], registry=r)
        self.tenant_time_to_first_token = Histogram(
            "tandem:tenant_time_to_first_token_seconds",
            "Gateway arrival to first generated token, per tenant.", ["tenant"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.tenant_inter_token_latency = Histogram(
            "tandem:tenant_inter_token_latency_seconds",
            "Time between consecutive outputs of a request, per tenant.", ["tenant"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.tenant_prompt_tokens = Counter(
            "tandem:tenant_prompt_tokens", "Prompt tokens of finished requests, per tenant.",
            ["tenant"], registry=r)
        self.tenant_generation_tokens = Counter(
            "tandem:tenant_generation_tokens", "Generated tokens, per tenant.", ["tenant"],
            registry=r)
        self.tenant_requests_rejected = Counter(
            "tandem:tenant_requests_rejected", "Requests refused before reaching a replica, per "
            "tenant: tenant_quota (429), overloaded (429) or unavailable (503).",
            ["tenant", "reason"], registry=r)
        self.tenant_requests_waiting = Gauge(
            "tandem:tenant_requests_waiting", "Requests of the tenant admitted and still waiting "
            "for their first token (what --tenant-max-waiting bounds).", ["tenant"], registry=r)
        self._prefix_seen: dict[str, tuple[int, int]] = {}
        """Replica -> its (queries, hits) totals at the last refresh: the counters add the rest."""
        self.slo_infeasible_steps = Counter(
            "tandem:slo_infeasible_steps", "Steps whose decodes alone were predicted over the TBT "
            "SLO (--budget slo): the SLO cannot be held at this decode load, whatever the prefill "
            "budget.", ["replica"], registry=r)
        self._infeasible_seen: dict[str, int] = {}
        """Replica -> its infeasible-step total at the last refresh."""

    def observe_iterations(self, replica_id: str, iterations: list[IterationStats]) -> None:
        """Per-iteration batch composition and step time, as the replica measured them."""
        for it in iterations:
            self.iteration_step_time.labels(replica=replica_id).observe(it.step_time)
            self.iteration_tokens.labels(replica=replica_id, kind="decode").observe(it.num_decode_tokens)
            self.iteration_tokens.labels(replica=replica_id, kind="prefill").observe(it.num_prefill_tokens)
            if it.num_preemptions:
                self.num_preemptions.labels(replica=replica_id).inc(it.num_preemptions)
            self.token_budget.labels(replica=replica_id).set(it.token_budget)

    def observe_kv_events(self, replica_id: str, events: list[dict]) -> None:
        """KV handoffs as the decode replica saw them: bytes, latency, failures, fallbacks."""
        for e in events:
            codec = e.get("codec", "none")
            if e.get("state") == "done":
                self.kv_transfer_bytes.labels(replica=replica_id, codec=codec).inc(e.get("wire_bytes", 0))
                self.kv_transfer_raw_bytes.labels(replica=replica_id, codec=codec).inc(e.get("raw_bytes", 0))
                if e.get("latency_s") is not None:
                    self.kv_transfer_latency.labels(replica=replica_id).observe(e["latency_s"])
            elif e.get("state") == "failed":
                self.kv_transfer_failures.labels(replica=replica_id, reason=e.get("reason", "error")).inc()
            if e.get("fallback"):
                self.kv_fallbacks.labels(replica=replica_id, fallback=e["fallback"]).inc()

    def update_routing(self, decisions: dict[str, int]) -> None:
        for decision, count in decisions.items():
            self.offload_decisions.labels(decision=decision).set(count)

    def update_replica(self, replica_id: str, stats: ReplicaStats) -> None:
        self.num_requests_running.labels(replica=replica_id).set(stats.num_running)
        self.num_requests_waiting.labels(replica=replica_id).set(stats.num_waiting)
        self.kv_cache_usage_perc.labels(replica=replica_id).set(stats.kv_cache_usage)
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        seen_q, seen_h = self._prefix_seen.get(replica_id, (0, 0))
        if queries < seen_q or hits < seen_h:   # a restarted replica counts from zero again
            seen_q = seen_h = 0
        self.prefix_cache_queries.labels(replica=replica_id).inc(queries - seen_q)
        self.prefix_cache_hits.labels(replica=replica_id).inc(hits - seen_h)
        self._prefix_seen[replica_id] = (queries, hits)
        infeasible = stats.slo_infeasible_steps
        seen = self._infeasible_seen.get(replica_id, 0)
        if infeasible < seen:   # a restarted replica counts from zero again
            seen = 0
        self.slo_infeasible_steps.labels(replica=replica_id).inc(infeasible - seen)
        self._infeasible_seen[replica_id] = infeasible

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one request's latencies as its outputs arrive. `on_started` is called once, at
    its first token or, if none comes, when it ends (the per-tenant quota's release)."""

    def __init__(self, metrics: GatewayMetrics, replica_id: str, start: float,
                 tenant: str = "default", on_started: Callable[[], None] | None = None) -> None:
        self.m = metrics
        self.replica = replica_id
        self.tenant = tenant
        self.start = start
        self.last: float | None = None
        self._on_started = on_started
        self.finished = False
        """`on_finish` ran (it counts the request once, however many paths end it)."""

    def _started(self) -> None:
        if self._on_started is not None:
            callback, self._on_started = self._on_started, None
            callback()

    def on_output(self, now: float, num_new_tokens: int, queue_time: float | None) -> None:
        if queue_time is not None:
            self.m.request_queue_time.labels(replica=self.replica).observe(queue_time)
        if num_new_tokens <= 0:
            return
        if self.last is None:
            self.m.time_to_first_token.labels(replica=self.replica).observe(now - self.start)
            self.m.tenant_time_to_first_token.labels(tenant=self.tenant).observe(now - self.start)
            self._started()
        else:
            self.m.inter_token_latency.labels(replica=self.replica).observe(now - self.last)
            self.m.tenant_inter_token_latency.labels(tenant=self.tenant).observe(now - self.last)
        self.last = now
        self.m.generation_tokens.labels(replica=self.replica).inc(num_new_tokens)
        self.m.tenant_generation_tokens.labels(tenant=self.tenant).inc(num_new_tokens)

    def on_finish(self, now: float, finish_reason: str, num_prompt_tokens: int) -> None:
        if self.finished:
            return
        self.finished = True
        self._started()
        self.m.e2e_request_latency.labels(replica=self.replica).observe(now - self.start)
        self.m.prompt_tokens.labels(replica=self.replica).inc(num_prompt_tokens)
        self.m.tenant_prompt_tokens.labels(tenant=self.tenant).inc(num_prompt_tokens)
        self.m.request_success.labels(replica=self.replica, finished_reason=finish_reason).inc()
