"""Replica <-> gateway frames: msgpack maps over ZeroMQ, never pickle. Imports no torch.

Sockets: each replica binds a PULL socket for its inputs (the gateway connects a PUSH to it);
the gateway binds one PULL socket for the outputs of all replicas (each replica connects a PUSH).

gateway -> replica                          replica -> gateway
  AddRequest   one request to serve           ReplicaReady  once, after the model is loaded
  AbortRequests ids to drop (frees blocks)    StepOutputs   new tokens/text per request + stats,
  PeerLost     another replica died: drop                   after every step that produced any,
               KV transfers with it                         and as a heartbeat when idle
  Shutdown     finish and exit
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import msgpack

from scheduler.request import DEFAULT_TENANT, SamplingParams
from scheduler.telemetry import IterationStats


@dataclass
class AddRequest:
    KIND: ClassVar[str] = "add"
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    remote_prefill: dict | None = None
    """To a decode replica: prefill this prompt on another replica and receive its KV here.
    {"transfer_id", "prefill_replica", "prefill_addr"}."""
    kv_target: dict | None = None
    """To a prefill replica: compute the prompt and push its KV to a decode replica.
    {"transfer_id", "request_id" (decode side), "kv_addr", "decode_replica", "dst_block_ids",
    "skip_tokens" (the prompt's prefix the decode replica has cached: not to be sent)}."""
    tenant: str = DEFAULT_TENANT
    """Who the request is for: the scheduler's fair share is per tenant. The default lets frames
    from a gateway that predates tenants decode."""


@dataclass
class AbortRequests:
    KIND: ClassVar[str] = "abort"
    request_ids: list[str]


@dataclass
class PeerLost:
    """The gateway lost `replica_id` (its process exited or its socket dropped). A decode replica
    recomputes the prompts that replica was prefilling for it; a prefill replica stops pushing KV
    to it. Waiting for --kv-timeout instead would stall those requests for no reason."""

    KIND: ClassVar[str] = "peer_lost"
    replica_id: str


@dataclass
class Shutdown:
    KIND: ClassVar[str] = "shutdown"


@dataclass
class ReplicaReady:
    KIND: ClassVar[str] = "ready"
    replica_id: str
    model: str
    max_model_len: int
    num_blocks: int
    block_size: int
    pid: int
    role: str = "hybrid"
    """hybrid | prefill | decode."""
    kv_addr: str | None = None
    """Decode replicas: where prefill replicas push KV."""
    input_addr: str | None = None
    """Where the replica's input socket is bound; a restarted Ray actor has a new one, which the
    gateway connects to."""


@dataclass
class RequestOutput:
    """What one step produced for one request; `text` is the newly decoded text (may be '')."""

    request_id: str
    new_token_ids: list[int]
    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    """None while running; else "stop" | "length" | "abort" | "error"."""
    error: str | None = None
    queue_time: float | None = None
    """Seconds from arrival at the replica to first scheduling (sent once, with the first output)."""
    logprobs: list[list] | None = None
    """Per new token, if the request asked: [token id, logprob, [[alt id, logprob], ...]]."""
    prompt_logprobs: list[list | None] | None = None
    """With the first output, if the request asked: one entry per prompt token (first None)."""
    retryable: bool = False
    """With finish_reason "error": the request itself was fine, its replica was lost; the client
    may send it again (the gateway answers 503 + Retry-After)."""


@dataclass
class ReplicaStats:
    """The replica's state after its latest step (the gateway's gauges and routing read it)."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    """Total since start."""
    token_budget: int = 0
    max_num_seqs: int = 0
    """Most requests the replica runs at once (0: unknown); the gateway's admission uses it."""
    num_live_transfers: int = 0
    """KV transfers in flight here: prompts a decode replica awaits, pushes a prefill replica owes."""
    prefix_cache_queries: int = 0
    """Tokens of the requests looked up in the prefix cache at admission (re-admissions after a
    preemption and decode-side reservations included), total since start."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached (their KV reused instead of computed), total since start."""
    slo_infeasible_steps: int = 0
    """Steps whose decodes alone the slo budget predicted over the TBT SLO, total since start
    (0 under the other budgets)."""


@dataclass
class StepOutputs:
    KIND: ClassVar[str] = "outputs"
    replica_id: str
    outputs: list[RequestOutput]
    stats: ReplicaStats = field(default_factory=ReplicaStats)
    iterations: list[IterationStats] = field(default_factory=list)
    """Telemetry of every step since the previous frame (usually one)."""
    kv_events: list[dict] = field(default_factory=list)
    """Decode nodes: finished KV transfers and fallbacks since the previous frame, e.g.
    {"state": "done", "codec": "lz4", "wire_bytes": 1, "raw_bytes": 2, "latency_s": 0.1} or
    {"state": "failed", "reason": "timeout", "fallback": "recompute"}."""


Message = AddRequest | AbortRequests | PeerLost | Shutdown | ReplicaReady | StepOutputs


def encode(msg: Message) -> bytes:
    body = asdict(msg)
    if isinstance(msg, AddRequest):
        body["sampling"] = msg.sampling.to_wire()
    body["kind"] = msg.KIND
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes) -> Message:
    body: dict[str, Any] = msgpack.unpackb(data, raw=False)
    kind = body.pop("kind", None)
    if kind == AddRequest.KIND:
        body["sampling"] = SamplingParams.from_wire(body["sampling"])
        return AddRequest(**body)
    if kind == AbortRequests.KIND:
        return AbortRequests(**body)
    if kind == PeerLost.KIND:
        return PeerLost(**body)
    if kind == Shutdown.KIND:
        return Shutdown()
    if kind == ReplicaReady.KIND:
        return ReplicaReady(**body)
    if kind == StepOutputs.KIND:
        body["outputs"] = [RequestOutput(**o) for o in body["outputs"]]
        body["stats"] = ReplicaStats(**body["stats"])
        body["iterations"] = [IterationStats(**i) for i in body.get("iterations", ())]
        return StepOutputs(**body)
    raise ValueError(f"unknown frame kind {kind!r}")
