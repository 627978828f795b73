"""Discrete-event simulation of a set of replicas behind the gateway's router.

Events on one heap, ordered by (time, sequence number) so runs are deterministic:
  - an arrival: the router (`gateway.routing.make_router`, over each replica's `ReplicaState`)
    places the request and `charge` counts it, exactly as the gateway's `ReplicaPool` does;
  - a step end on a replica: `update`, tokens recorded, then the replica starts its next step;
    with pipeline stages (`replica.pp` > 1) this is a micro-batch leaving the last stage, and
    another event frees stage 0 earlier, where the next micro-batch may start (up to pp in
    flight; see sim/replica.py);
  - a KV landing on a decode replica (the last chunk of a remote prefill).

Prefill/decode disaggregation follows the nodes (decode_node/server.py, prefill_node/server.py):
the decode replica calls `add_remote_prefill` and prefills locally (`add_request`) if that returns
False; otherwise the prefill replica runs the prompt with max_tokens=1 and, after each step that
computed some of it, sends the KV of the new tokens (restarting from 0 if it was preempted);
`remote_prefill_done` runs on the decode replica when the last chunk has landed. A chunk takes
the link's latency + bytes / bandwidth, behind the earlier chunks of the same transfer;
bytes/token = 2 * layers * kv_heads * head_dim * dtype bytes * the codec's ratio. The gateway
frees the prefill slot (`prefill_landed`) at the request's first token and `release`s it when it
ends.

Nodes (`Cluster(..., placement=...)`: the (node, GPU) of every rank of every replica). Without a
placement every transfer gets the whole `KVLink.link` to itself (replicas on machines of their
own). With one, KV goes rank i -> rank i as the nodes send it (a TP x PP replica's shard i: its
share of the heads and layers, bytes / ranks): between GPUs of one node over `intra_link`
(NVLink), each GPU's port its own; between nodes over `link` through the NICs, `nics_per_node`
of them per node, GPU g on NIC g * nics // gpus_per_node (one NIC per node by default; a DGX
A100 has 8 compute HCAs, one per GPU, so pass 8 for that). Shards that share a port pair go as
one message. Every port direction (a NIC's egress, a NIC's ingress, a GPU's NVLink out or in) is a
FIFO queue: a message starts when both its sender's egress and its receiver's ingress are free
(the later of the two), and holds both for latency + bytes / bandwidth. Chunks are queued in the
order the prefill steps emit them, so concurrent transfers' chunks interleave, which
approximates fair sharing of a port (N transfers through one NIC each take ~N times as long).
The queue is head-of-line blocking: a message waiting for a busy receiver also holds its
sender's port, so this errs on the slow side when one sender feeds several busy receivers.

The gateway is two constant delays (`token_delay_s`, `arrival_delay_s`), not a queue.

Not modelled yet: pipeline activations and other traffic on the NICs (a stage's send gets its
`pp_link` to itself), failures.
"""
from __future__ import annotations

import functools
import heapq
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bench.results import RequestResult, RunResult
from gateway.routing import Placement, RouteRequest, charge, make_router, prefill_landed, release
from scheduler.core import AdmissionError
from scheduler.request import Request
from sim.replica import SimReplica, make_request
from sim.specs import Link

PREFILL_SUFFIX = "#prefill"

CODEC_RATIO = {"raw": 1.0, "lz4": 0.85, "int8": 0.5, "fp8": 0.5}
"""Wire bytes / raw bytes of bf16 KV per codec: lz4 saves ~15% on bf16 KV (the kv benchmarks,
see `tandem serve --kv-codec`); int8/fp8 halve bf16 (per-block scales are negligible)."""


@dataclass(frozen=True)
class KVLink:
    link: Link
    """The link between prefill and decode replicas (with a placement: between nodes, per NIC)."""
    bytes_per_token: float
    """Raw KV bytes of one token (`ModelSpec.kv_bytes_per_token`)."""
    codec: str = "raw"
    """Wire codec, a key of CODEC_RATIO."""
    intra_link: Link | None = None
    """With a placement: the link between GPUs of one node (the device's NVLink), per GPU and
    direction; None: same-node transfers use `link` too."""
    nics_per_node: int = 1
    """With a placement: NICs per node, each with `link`'s bandwidth; GPU g of a node uses NIC
    g * nics_per_node // gpus_per_node."""
    gpus_per_node: int = 8
    """With a placement: GPUs per node (maps GPUs to NICs)."""

    def __post_init__(self) -> None:
        if self.codec not in CODEC_RATIO:
            raise ValueError(f"unknown KV codec {self.codec!r}; known: {sorted(CODEC_RATIO)}")
        if not 1 <= self.nics_per_node <= self.gpus_per_node:
            raise ValueError(f"nics_per_node must be in 1..gpus_per_node ({self.gpus_per_node}), "
                             f"got {self.nics_per_node}")

    def nic(self, gpu: int) -> int:
        """The NIC GPU `gpu` of a node sends and receives through."""
        return gpu * self.nics_per_node // self.gpus_per_node

    def wire_bytes(self, tokens: int) -> float:
        return tokens * self.bytes_per_token * CODEC_RATIO[self.codec]

    def transfer_time(self, tokens: int) -> float:
        return self.link.latency_s + self.wire_bytes(tokens) / self.link.bandwidth


@dataclass
class _Tracked:
    index: int
    arrival: float
    prompt: int
    output: int
    load: int
    replica: SimReplica
    prefill: SimReplica | None
    """The prefill replica still counting this request in its queue (None once landed)."""
    request: Request | None = None
    prefill_request: Request | None = None
    token_times: list[float] = field(default_factory=list)
    error: str | None = None
    offloaded: bool = False
    prefill_replica: SimReplica | None = None
    """The prefill replica the router chose (kept after `prefill` is cleared)."""


@dataclass
class _Push:
    index: int
    request: Request
    target: SimReplica
    sent_upto: int = 0
    last_land: float = 0.0
    source: SimReplica | None = None
    """The prefill replica computing the prompt."""


@dataclass
class SimResult:
    run: RunResult
    sched_delays: list[float]
    """Arrival to first schedule (remote prefill: on the prefill replica), per successful request."""
    replicas: list[SimReplica]
    decisions: dict[str, int]
    kv_bytes: float
    end_time: float
    num_steps: int

    @property
    def p50_sched_delay_s(self) -> float | None:
        if not self.sched_delays:
            return None
        s = sorted(self.sched_delays)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


Rank = tuple[int, int]
"""(node, GPU index on the node) of one rank of a replica."""


class Cluster:
    """Replicas, a router and (for pd) the KV link between prefill and decode replicas.

    `placement`, optional: per replica (same order), the `Rank` of each of its ranks in rank order
    (stage, tp_rank); each replica's `node` is then its first rank's node (else 0). See the
    module doc for what it changes."""

    def __init__(self, replicas: Sequence[SimReplica], routing: str = "round_robin",
                 offload_threshold: int = 512, kv_link: KVLink | None = None,
                 model_name: str = "sim",
                 placement: Sequence[Sequence[Rank]] | None = None,
                 token_delay_s: float = 0.0, arrival_delay_s: float = 0.0) -> None:
        if not replicas:
            raise ValueError("a cluster needs at least one replica")
        if any(r.role == "prefill" for r in replicas) and kv_link is None:
            raise ValueError("prefill replicas need a kv_link")
        self.replicas = list(replicas)
        self._ranks: dict[SimReplica, tuple[Rank, ...]] | None = None
        if placement is not None:
            self._ranks = _check_placement(self.replicas, placement)
        for r in self.replicas:
            r.node = self._ranks[r][0][0] if self._ranks else 0
        self._port_free: dict[tuple, float] = {}
        self.router = make_router(routing, offload_threshold)
        self.routing = routing
        self.kv_link = kv_link
        self.model_name = model_name
        for name, value in (("token_delay_s", token_delay_s), ("arrival_delay_s", arrival_delay_s)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.token_delay_s = token_delay_s
        """Gateway's per-token delay: from a replica's step end to the client (framing, ZeroMQ,
        the gateway, HTTP); shifts TTFT and end-to-end latency, not the gaps between tokens."""
        self.arrival_delay_s = arrival_delay_s
        """Gateway's delay from a request's arrival to its replica (HTTP, routing, ZeroMQ, the
        replica loop waking): the request reaches the replica's inbox this much later."""
        self._heap: list = []
        self._seq = itertools.count()
        self._tracked: dict[int, _Tracked] = {}
        self._pushes: dict[SimReplica, dict[str, _Push]] = {r: {} for r in self.replicas}
        self.decisions: dict[str, int] = {}
        self.kv_bytes = 0.0
        self.now = 0.0

    # -- event plumbing ----------------------------------------------------------------------
    def _at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, args))

    def _send(self, replica: SimReplica, message, now: float) -> None:
        """A message for `replica`'s next step boundary; wakes it if idle."""
        replica.inbox.append(message)
        self._kick(replica, now)

    def _kick(self, replica: SimReplica, now: float) -> None:
        """Schedule a batch on `replica` if stage 0 is free and a micro-batch slot is open."""
        if replica.can_start(now):
            step = replica.start_step(now)
            if step is not None:
                self._at(step.end, self._step_end, replica)
                if replica.pp > 1:   # stage 0 frees before the batch leaves: room for the next
                    self._at(step.stage_ends[0], self._stage0_free, replica)

    def _stage0_free(self, now: float, replica: SimReplica) -> None:
        self._kick(replica, now)

    # -- arrivals and routing -----------------------------------------------------------------
    def _arrive(self, now: float, index: int, prompt: int, output: int) -> None:
        # No token ids: the simulator's prompts are placeholders ([0] * prompt, see make_request)
        # and its replicas cache no prefixes, so `prefix` routes as least_loaded here.
        route = RouteRequest(prompt, max_tokens=output)
        placement: Placement | None = self.router.place([r.state for r in self.replicas], route)
        if placement is None:
            self._tracked[index] = _Tracked(index, now, prompt, output, 0, None, None,
                                            error="no replica can take the request")
            return
        self.decisions[placement.decision] = self.decisions.get(placement.decision, 0) + 1
        by_state = {id(r.state): r for r in self.replicas}
        replica = by_state[id(placement.replica)]
        prefill = by_state[id(placement.prefill)] if placement.prefill is not None else None
        load = prompt + output
        charge(placement, load)
        tr = self._tracked[index] = _Tracked(index, now, prompt, output, load, replica, prefill,
                                             prefill_replica=prefill)
        message = functools.partial(self._add, tr=tr)
        if self.arrival_delay_s:
            self._at(now + self.arrival_delay_s, self._deliver, replica, message)
        else:
            self._send(replica, message, now)

    def _deliver(self, now: float, replica: SimReplica, message) -> None:
        self._send(replica, message, now)

    def _add(self, now: float, tr: _Tracked) -> None:
        """The streaming replica receives the request (decode_node `handle_add`)."""
        request = tr.request = make_request(str(tr.index), tr.prompt, tr.output, tr.arrival)
        sched = tr.replica.sched
        try:
            if tr.prefill is not None and sched.add_remote_prefill(request):
                tr.offloaded = True
                self._send(tr.prefill_replica, lambda t: self._add_prefill(t, tr), now)
                return
            sched.add_request(request)
        except AdmissionError as e:
            self._fail(tr, f"HTTP 400: {e}")

    def _add_prefill(self, now: float, tr: _Tracked) -> None:
        """The prefill replica receives the prompt with max_tokens=1 (decode side reserved)."""
        rid = f"{tr.index}{PREFILL_SUFFIX}"
        request = tr.prefill_request = make_request(rid, tr.prompt, 1, now)
        prefill = tr.prefill_replica
        try:
            prefill.sched.add_request(request)
        except AdmissionError:
            # the node answers with an abort frame: the decode replica recomputes the prompt
            self._send(tr.replica, lambda t: tr.replica.sched.remote_prefill_failed(str(tr.index)), now)
            return
        self._pushes[prefill][rid] = _Push(tr.index, request, tr.replica, last_land=now, source=prefill)

    def _fail(self, tr: _Tracked, error: str) -> None:
        tr.error = error
        release(tr.replica.state, tr.prefill.state if tr.prefill else None, tr.load)
        tr.prefill = None

    # -- steps --------------------------------------------------------------------------------
    def _step_end(self, now: float, replica: SimReplica) -> None:
        """The oldest batch in flight on `replica` leaves its last stage (single stage: the step
        ends): update, tokens, KV pushes of a prefill replica, then maybe the next batch."""
        for request in replica.finish_step():
            rid = request.request_id
            if rid.endswith(PREFILL_SUFFIX):
                continue
            tr = self._tracked[int(rid)]
            tr.token_times.append(now)
            if tr.prefill is not None:   # the gateway sees the first output: prefill slot free
                prefill_landed(tr.prefill.state)
                tr.prefill = None
            if request.is_finished:
                release(tr.replica.state, None, tr.load)
        pushes = self._pushes[replica]
        if pushes:
            self._after_prefill_step(now, pushes)
        self._kick(replica, now)

    def _after_prefill_step(self, now: float, pushes: dict[str, _Push]) -> None:
        """prefill_node `after_step`: send the KV computed this step; done -> last chunk lands."""
        for rid, push in list(pushes.items()):
            r = push.request
            done = r.is_finished
            computed = r.num_prompt_tokens if done else r.num_computed_tokens
            if computed < push.sent_upto:   # preempted: it will be recomputed from the start
                push.sent_upto = 0
                continue
            if computed > push.sent_upto:
                n = computed - push.sent_upto
                self.kv_bytes += self.kv_link.wire_bytes(n)
                push.last_land = self._transfer(now, push, n)
                push.sent_upto = computed
            if done:
                del pushes[rid]
                self._at(push.last_land, self._landed, push)

    def _transfer(self, now: float, push: _Push, tokens: int) -> float:
        """Queue the KV of `tokens` more prompt tokens of `push`; returns when all of it landed."""
        kv = self.kv_link
        if self._ranks is None:
            return max(now, push.last_land) + kv.transfer_time(tokens)
        src, dst = self._ranks[push.source], self._ranks[push.target]
        share = kv.wire_bytes(tokens) / len(src)
        messages: dict[tuple, float] = {}
        for (s_node, s_gpu), (d_node, d_gpu) in zip(src, dst):
            if s_node == d_node:
                key = (("gpu-out", s_node, s_gpu), ("gpu-in", d_node, d_gpu), kv.intra_link or kv.link)
            else:
                key = (("nic-out", s_node, kv.nic(s_gpu)), ("nic-in", d_node, kv.nic(d_gpu)), kv.link)
            messages[key] = messages.get(key, 0.0) + share
        land = push.last_land
        for (out, into, link), size in messages.items():
            start = max(now, push.last_land, self._port_free.get(out, 0.0),
                        self._port_free.get(into, 0.0))
            end = self._port_free[out] = self._port_free[into] = \
                start + (link.latency_s + size / link.bandwidth)   # as KVLink.transfer_time sums
            land = max(land, end)
        return land

    def _landed(self, now: float, push: _Push) -> None:
        rid = str(push.index)
        self._send(push.target, lambda t: push.target.sched.remote_prefill_done(rid, t), now)

    # -- the run ------------------------------------------------------------------------------
    def run(self, requests: Iterable[tuple[float, int, int]]) -> SimResult:
        """Simulate `(arrival_s, prompt_tokens, output_tokens)` requests to completion."""
        reqs = list(requests)
        for i, (arrival, prompt, output) in enumerate(reqs):
            self._at(float(arrival), self._arrive, i, int(prompt), int(output))
        end = 0.0
        while self._heap:
            t, _, fn, args = heapq.heappop(self._heap)
            self.now = end = t
            fn(t, *args)
        return self._result(reqs, end)

    def _result(self, reqs, end: float) -> SimResult:
        start = min((float(a) for a, _, _ in reqs), default=0.0)
        results, delays = [], []
        for i, (arrival, prompt, output) in enumerate(reqs):
            tr = self._tracked[i]
            rr = RequestResult(index=i, prompt_tokens=int(prompt), max_tokens=int(output),
                               scheduled_s=float(arrival) - start)
            results.append(rr)
            if tr.error is not None:
                rr.error, rr.status = tr.error, 400 if tr.error.startswith("HTTP 400") else 503
                continue
            rr.send_s = rr.scheduled_s
            times = tr.token_times
            if len(times) != tr.output or tr.request is None or not tr.request.is_finished:
                rr.error = f"unfinished: {len(times)}/{tr.output} tokens"
                continue
            rr.status, rr.usage_reported = 200, True
            rr.ttft_s = times[0] + self.token_delay_s - tr.arrival
            rr.itl_s = [b - a for a, b in zip(times, times[1:])]
            rr.e2e_s = times[-1] + self.token_delay_s - tr.arrival
            rr.output_tokens = rr.num_chunks = len(times)
            rr.server_prompt_tokens = tr.prompt
            pre = tr.prefill_request
            first = (pre.first_scheduled_time if pre is not None and pre.first_scheduled_time is not None
                     else tr.request.first_scheduled_time)
            delays.append(first - tr.arrival)
        run = RunResult(url=f"sim://{self.routing}", model=self.model_name, requests=results,
                        wall_s=max(end - start, 1e-9), started_at=0.0)
        return SimResult(run, delays, self.replicas, dict(self.decisions), self.kv_bytes, end,
                         sum(r.iteration for r in self.replicas))

    def check_drained(self) -> None:
        """Every replica idle with all blocks free and the router's counters back to zero."""
        for r in self.replicas:
            r.sched.check_integrity()
            assert r.idle and not r.inbox, f"{r.replica_id} still busy"
            assert r.sched.num_unfinished == 0, f"{r.replica_id}: {r.sched.num_unfinished} unfinished"
            assert r.free_blocks == r.num_blocks, f"{r.replica_id}: {r.num_blocks - r.free_blocks} blocks held"
            s = r.state
            assert (s.outstanding, s.outstanding_tokens, s.prefill_queue) == (0, 0, 0), \
                f"{r.replica_id}: router counters {s.outstanding}, {s.outstanding_tokens}, {s.prefill_queue}"
        assert not any(self._pushes.values()), "KV pushes left"


def _check_placement(replicas: list[SimReplica],
                     placement: Sequence[Sequence[Rank]]) -> dict[SimReplica, tuple[Rank, ...]]:
    """Per replica, its ranks; ValueError names the replica when the placement is inconsistent."""
    if len(placement) != len(replicas):
        raise ValueError(f"placement has {len(placement)} entries for {len(replicas)} replicas")
    ranks = {r: tuple((int(n), int(g)) for n, g in p) for r, p in zip(replicas, placement)}
    owner: dict[Rank, str] = {}
    for r, rs in ranks.items():
        if not rs:
            raise ValueError(f"replica {r.replica_id} has no ranks in the placement")
        for rank in rs:
            if rank in owner:
                raise ValueError(f"GPU {rank} is given to both {owner[rank]} and {r.replica_id}")
            owner[rank] = r.replica_id
    # rank i pushes to rank i, so every prefill and decode replica needs as many ranks (the
    # deployment spec's rule: equal tp and pp)
    kv = {len(rs) for r, rs in ranks.items() if r.role in ("prefill", "decode")}
    if len(kv) > 1:
        raise ValueError(f"prefill and decode replicas must have as many ranks (KV goes rank i -> "
                         f"rank i), got {sorted(kv)}")
    return ranks
