"""The gateway's side of the replica sockets: submit requests, stream their outputs, track health.

One PULL socket (bound here) receives every replica's `ReplicaReady` / `StepOutputs`; one PUSH
socket per replica (connected here) carries `AddRequest` / `AbortRequests` / `Shutdown`. Frames are
`engine.protocol` msgpack maps, never pickle.

Nothing waits forever: sends have a timeout, each request has a deadline (`request_timeout_s`), and a
replica that sends no frame for `heartbeat_timeout_s` has its in-flight requests failed with an
error output (finish_reason "error").
"""
from __future__ import annotations

import asyncio
import collections
import uuid
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from engine.protocol import (
    AbortRequests, AddRequest, Message, ReplicaReady, RequestOutput, Shutdown, StepOutputs, decode,
    encode,
)
from gateway.replica_state import ReplicaState
from gateway.routing import Placement, RoundRobin, Router
from scheduler.request import SamplingParams
from scheduler.telemetry import IterationStats

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

log = logging.getLogger(__name__)


class NoHealthyReplica(RuntimeError):
    """No replica is ready and heartbeating, so the request cannot be placed."""


class Overloaded(RuntimeError):
    """Every healthy replica already holds its bound of waiting requests."""


class RequestStream:
    """One submitted request. Async-iterate it for its outputs (the last has a finish_reason);
    call `abort()` if you stop early. Created by `ReplicaPool.submit`."""

    def __init__(self, pool: "ReplicaPool", request_id: str, replica_id: str,
                 num_prompt_tokens: int, deadline: float, load_tokens: int = 0,
                 prefill_replica_id: str | None = None) -> None:
        self.request_id = request_id
        self.replica_id = replica_id
        self.num_prompt_tokens = num_prompt_tokens
        self.deadline = deadline
        self.load_tokens = load_tokens
        """What this request adds to its replica's outstanding tokens."""
        self.prefill_replica_id = prefill_replica_id
        """pd: the prefill replica computing the prompt, until the first output arrives."""
        self.num_output_tokens = 0
        self._pool = pool
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._done = False          # final output queued (or aborted): pool no longer tracks it
        self._consumed_final = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._consumed_final:
            raise StopAsyncIteration
        # The pool's monitor fails the request at its deadline; this timeout only guards that.
        wait = max(self.deadline - time.monotonic(), 0.0) + 1.0
        try:
            out = await asyncio.wait_for(self._queue.get(), timeout=wait)
        except TimeoutError:
            self._pool._fail(self, f"request {self.request_id} timed out after "
                                   f"{self._pool.request_timeout_s:g}s")
            out = self._queue.get_nowait() if not self._queue.empty() else self._pool._error_output(
                self, "request timed out")
        if out.finish_reason is not None:
            self._consumed_final = True
        return out

    def abort(self) -> None:
        """Stop the request (client went away): tell its replica to drop it. No-op once finished."""
        self._pool._abort(self)

    @property
    def finished(self) -> bool:
        return self._done


class ReplicaPool:
    """Asyncio client of a set of replicas (see module docstring).

    `replica_addrs` maps replica id (as the replica reports it in ReplicaReady / StepOutputs) to the
    address of its input PULL socket. `output_addr` is bound here; "tcp://127.0.0.1:*" picks a port
    (read it back from `output_addr` after construction).
    """

    def __init__(self, output_addr: str, replica_addrs: dict[str, str], *,
                 request_timeout_s: float = 600.0, heartbeat_timeout_s: float = 10.0,
                 send_timeout_s: float = 5.0, linger_ms: int = 200,
                 router: Router | None = None) -> None:
        if not replica_addrs:
            raise ValueError("replica_addrs must name at least one replica, got {}")
        self.request_timeout_s = request_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.send_timeout_s = send_timeout_s
        self.router: Router = router or RoundRobin()
        self.route_decisions: collections.Counter[str] = collections.Counter()
        """How many requests each routing decision got (offload, local_short, ...)."""
        self._ctx = zmq.asyncio.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(output_addr)
        self.output_addr: str = self._pull.getsockopt_string(zmq.LAST_ENDPOINT)
        self._push: dict[str, zmq.asyncio.Socket] = {}
        self._replicas: dict[str, ReplicaState] = {}
        for rid, addr in replica_addrs.items():
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, linger_ms)
            sock.connect(addr)
            self._push[rid] = sock
            self._replicas[rid] = ReplicaState(rid, addr)
        self._streams: dict[str, RequestStream] = {}
        self._tasks: list[asyncio.Task] = []
        self._pending_sends: set[asyncio.Task] = set()
        self._all_ready: asyncio.Event | None = None
        self._started = False
        self._closed = False
        self.on_iterations: Callable[[str, list[IterationStats]], None] | None = None
        """Called with each replica's per-iteration telemetry (the app feeds its metrics)."""
        self.on_kv_events: Callable[[str, list[dict]], None] | None = None
        """Called with decode replicas' finished KV transfers and fallbacks."""

    @classmethod
    def from_config(cls, config: "GatewayConfig", output_addr: str, replica_addrs: dict[str, str],
                    **kwargs) -> "ReplicaPool":
        """A pool using the config's request and heartbeat timeouts."""
        return cls(output_addr, replica_addrs, request_timeout_s=config.request_timeout_s,
                   heartbeat_timeout_s=config.heartbeat_timeout_s, **kwargs)

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._started

    async def start(self) -> None:
        """Start the receive and health-monitor tasks (idempotent)."""
        if self._started:
            return
        if self._closed:
            raise RuntimeError("ReplicaPool is closed")
        self._started = True
        self._all_ready = asyncio.Event()
        self._check_all_ready()
        self._tasks = [asyncio.create_task(self._recv_loop(), name="replica-pool-recv"),
                       asyncio.create_task(self._monitor_loop(), name="replica-pool-monitor")]

    async def wait_ready(self, timeout: float) -> dict[str, ReplicaReady]:
        """Wait for ReplicaReady from every replica; TimeoutError names the missing ones."""
        await self.start()
        assert self._all_ready is not None
        try:
            await asyncio.wait_for(self._all_ready.wait(), timeout=timeout)
        except TimeoutError:
            missing = sorted(r.replica_id for r in self._replicas.values() if r.ready is None)
            raise TimeoutError(f"replicas not ready after {timeout:g}s: {missing}") from None
        return self.ready_info

    async def close(self, shutdown_replicas: bool = False) -> None:
        """Fail in-flight requests, optionally send Shutdown to every replica, close the sockets."""
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams.values()):
            self._fail(stream, "gateway is shutting down", abort_on_replica=not shutdown_replicas)
        if shutdown_replicas:
            for rid in self._replicas:
                self._send_soon(rid, Shutdown())
        if self._pending_sends:
            await asyncio.wait(list(self._pending_sends), timeout=self.send_timeout_s)
        for task in [*self._tasks, *self._pending_sends]:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled or already failed; nothing to do
                pass
        self._pull.close(linger=0)
        for sock in self._push.values():
            sock.close()
        self._ctx.term()

    # ---- state -----------------------------------------------------------------------------

    @property
    def replicas(self) -> dict[str, ReplicaState]:
        return dict(self._replicas)

    @property
    def ready_info(self) -> dict[str, ReplicaReady]:
        return {rid: r.ready for rid, r in self._replicas.items() if r.ready is not None}

    @property
    def num_outstanding(self) -> int:
        return len(self._streams)

    def healthy_replicas(self) -> list[str]:
        now = time.monotonic()
        return [rid for rid, r in self._replicas.items()
                if r.is_healthy(now, self.heartbeat_timeout_s)]

    def healthy(self) -> bool:
        """True when every replica is ready and heartbeating."""
        return len(self.healthy_replicas()) == len(self._replicas)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._streams

    # ---- requests --------------------------------------------------------------------------

    async def submit(self, request_id: str, prompt_token_ids: Sequence[int],
                     sampling: SamplingParams, max_waiting: int | None = None) -> RequestStream:
        """Place one request on a replica and send it (see `submit_many`)."""
        return (await self.submit_many([(request_id, prompt_token_ids, sampling)], max_waiting))[0]

    async def submit_many(self, items: Sequence[tuple[str, Sequence[int], SamplingParams]],
                          max_waiting: int | None = None) -> list[RequestStream]:
        """Place and send several requests, all or none. Each goes to a healthy replica with
        fewer than `max_waiting` waiting requests (None: no bound); raises `Overloaded` if some
        cannot be placed, `NoHealthyReplica` if none is healthy or a send fails. Placement and
        registration happen before the first await, so concurrent callers cannot overshoot."""
        if self._closed:
            raise RuntimeError("ReplicaPool is closed")
        ids = [rid for rid, _, _ in items]
        for rid in ids:
            if rid in self._streams or ids.count(rid) > 1:
                raise ValueError(f"request id {rid!r} is already in flight")
        now = time.monotonic()
        healthy = [r for r in self._replicas.values() if r.is_healthy(now, self.heartbeat_timeout_s)]
        if not healthy:
            raise NoHealthyReplica(f"no healthy replica among {sorted(self._replicas)}")
        placed: list[tuple[RequestStream, AddRequest]] = []
        for rid, prompt, sampling in items:
            candidates = [r for r in healthy if max_waiting is None or r.num_waiting < max_waiting]
            placement = self.router.place(candidates, len(prompt)) if candidates else None
            if placement is None:
                for stream, _ in placed:  # nothing was sent yet
                    self._finish(stream)
                raise Overloaded(f"every healthy replica ({len(healthy)}) already has "
                                 f"{max_waiting} requests waiting")
            placed.append(self._place(rid, prompt, sampling, placement, now))
        try:
            for stream, msg in placed:
                await self._send(stream.replica_id, msg)
        except BaseException as exc:
            for stream, _ in placed:
                self._abort(stream)
            if isinstance(exc, Exception):
                raise NoHealthyReplica(f"could not send a request to a replica: {exc!r}") from exc
            raise
        return [stream for stream, _ in placed]

    def _place(self, rid: str, prompt: Sequence[int], sampling: SamplingParams,
               placement: Placement, now: float) -> tuple[RequestStream, AddRequest]:
        replica, prefill = placement.replica, placement.prefill
        load = len(prompt) + sampling.max_tokens
        stream = RequestStream(self, rid, replica.replica_id, len(prompt), now + self.request_timeout_s,
                               load, prefill.replica_id if prefill else None)
        self._streams[rid] = stream
        replica.outstanding += 1
        replica.outstanding_tokens += load
        self.route_decisions[placement.decision] += 1
        msg = AddRequest(rid, list(prompt), sampling, time.time())
        if prefill is not None:
            prefill.prefill_queue += 1
            msg.remote_prefill = {"transfer_id": f"kv-{uuid.uuid4().hex[:16]}",
                                  "prefill_replica": prefill.replica_id,
                                  "prefill_addr": prefill.address}
        return stream, msg

    def _prefill_landed(self, stream: RequestStream) -> None:
        """The prompt of a pd request is done (first output or finish): free its prefill slot."""
        if stream.prefill_replica_id is not None:
            prefill = self._replicas.get(stream.prefill_replica_id)
            if prefill is not None:
                prefill.prefill_queue -= 1
            stream.prefill_replica_id = None

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       sampling: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Submit and yield outputs until one has a finish_reason. Closing the generator early
        (GeneratorExit / CancelledError) aborts the request on its replica."""
        stream = await self.submit(request_id, prompt_token_ids, sampling)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    # ---- internals -------------------------------------------------------------------------

    def _error_output(self, stream: RequestStream, message: str) -> RequestOutput:
        return RequestOutput(request_id=stream.request_id, new_token_ids=[], text="",
                             num_prompt_tokens=stream.num_prompt_tokens,
                             num_output_tokens=stream.num_output_tokens,
                             finish_reason="error", error=message)

    def _finish(self, stream: RequestStream) -> bool:
        """Stop tracking a stream; False if it was already finished."""
        if stream._done:
            return False
        stream._done = True
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        replica = self._replicas.get(stream.replica_id)
        if replica is not None:
            replica.outstanding -= 1
            replica.outstanding_tokens -= stream.load_tokens
        self._prefill_landed(stream)
        return True

    def _deliver(self, stream: RequestStream, out: RequestOutput) -> None:
        if stream._done:
            return
        stream.num_output_tokens = out.num_output_tokens
        self._prefill_landed(stream)
        stream._queue.put_nowait(out)
        if out.finish_reason is not None:
            self._finish(stream)

    def _fail(self, stream: RequestStream, message: str, abort_on_replica: bool = True) -> None:
        if stream._done:
            return
        self._deliver(stream, self._error_output(stream, message))
        if abort_on_replica and not self._closed_sockets():
            self._send_soon(stream.replica_id, AbortRequests([stream.request_id]))

    def _abort(self, stream: RequestStream) -> None:
        if self._finish(stream) and not self._closed_sockets():
            self._send_soon(stream.replica_id, AbortRequests([stream.request_id]))

    def _closed_sockets(self) -> bool:
        return self._pull.closed

    async def _send(self, replica_id: str, msg: Message) -> None:
        await asyncio.wait_for(self._push[replica_id].send(encode(msg)),
                               timeout=self.send_timeout_s)

    def _send_soon(self, replica_id: str, msg: Message) -> None:
        """Fire-and-forget send (usable from sync code and from `finally` during cancellation)."""
        task = asyncio.get_running_loop().create_task(self._send(replica_id, msg))
        self._pending_sends.add(task)
        task.add_done_callback(self._send_done)

    def _send_done(self, task: asyncio.Task) -> None:
        self._pending_sends.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("sending a frame to a replica failed: %r", task.exception())

    def _check_all_ready(self) -> None:
        if self._all_ready is not None and all(r.ready for r in self._replicas.values()):
            self._all_ready.set()

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, (ReplicaReady, StepOutputs)):
            replica = self._replicas.get(msg.replica_id)
            if replica is None:
                log.warning("frame from unknown replica %r ignored", msg.replica_id)
                return
            replica.last_seen = time.monotonic()
            if replica.timed_out:
                log.info("replica %s is sending again", replica.replica_id)
                replica.timed_out = False
        if isinstance(msg, ReplicaReady):
            if replica.ready is not None and replica.ready.pid != msg.pid:
                self._fail_replica(replica, f"replica {replica.replica_id} restarted")
            replica.ready = msg
            self._check_all_ready()
        elif isinstance(msg, StepOutputs):
            replica.stats = msg.stats
            if msg.iterations and self.on_iterations is not None:
                self.on_iterations(msg.replica_id, msg.iterations)
            if msg.kv_events and self.on_kv_events is not None:
                self.on_kv_events(msg.replica_id, msg.kv_events)
            for out in msg.outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None and stream.replica_id == msg.replica_id:
                    self._deliver(stream, out)
        else:
            log.warning("unexpected frame %s from a replica ignored", type(msg).__name__)

    def _fail_replica(self, replica: ReplicaState, message: str) -> None:
        for stream in [s for s in self._streams.values() if s.replica_id == replica.replica_id]:
            self._fail(stream, message)

    async def _recv_loop(self) -> None:
        while True:
            try:
                data = await self._pull.recv()
            except zmq.ZMQError as exc:
                if self._closed:
                    return
                log.error("receiving from replicas failed: %r", exc)
                await asyncio.sleep(0.1)
                continue
            try:
                msg = decode(data)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the loop
                log.warning("undecodable frame from a replica dropped: %r", exc)
                continue
            try:
                self._handle(msg)
            except Exception:  # noqa: BLE001
                log.exception("handling a replica frame failed")

    async def _monitor_loop(self) -> None:
        interval = min(0.5, self.heartbeat_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for replica in self._replicas.values():
                if (replica.ready is not None and not replica.timed_out
                        and replica.last_seen is not None
                        and now - replica.last_seen > self.heartbeat_timeout_s):
                    replica.timed_out = True
                    silent = now - replica.last_seen
                    log.warning("replica %s silent for %.1fs: marked unhealthy",
                                replica.replica_id, silent)
                    self._fail_replica(replica, f"replica {replica.replica_id} sent no frame for "
                                                f"{silent:.1f}s (heartbeat timeout "
                                                f"{self.heartbeat_timeout_s:g}s)")
            for stream in [s for s in self._streams.values() if s.deadline < now]:
                self._fail(stream, f"request {stream.request_id} timed out after "
                                   f"{self.request_timeout_s:g}s")
