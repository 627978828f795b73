"""The gateway's side of the replica sockets: submit requests, stream their outputs, track health.

One PULL socket (bound here) receives every replica's `ReplicaReady` / `StepOutputs`; one PUSH
socket per replica (connected here) carries `AddRequest` / `AbortRequests` / `Shutdown`. Frames are
`engine.protocol` msgpack maps, never pickle.

Nothing waits forever: sends have a timeout, each request has a deadline (`request_timeout_s`), and a
replica that is lost -- its socket disconnects, its launcher sees the process exit
(`replica_lost`), or it sends no frame for `heartbeat_timeout_s` -- leaves routing at once: its
requests that have produced nothing yet move to another replica, the others end with a retryable
error output (finish_reason "error", `retryable`), and its peers hear `PeerLost` so KV transfers
with it are given up. It is routed to again once it reports ready (a restarted process).
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

from zmq.utils.monitor import recv_monitor_message

from engine.protocol import (
    AbortRequests, AddRequest, Message, PeerLost, ReplicaReady, RequestOutput, Shutdown, StepOutputs,
    decode, encode,
)
from gateway.replica_state import ReplicaState
from gateway.routing import Placement, RoundRobin, RouteRequest, Router, charge, prefill_landed, release
from scheduler.request import DEFAULT_TENANT, SamplingParams
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

    def __init__(self, pool: "ReplicaPool", request_id: str, prompt_token_ids: Sequence[int],
                 sampling: SamplingParams, deadline: float, tenant: str = DEFAULT_TENANT) -> None:
        self.request_id = request_id
        self.tenant = tenant
        """Whose request it is (sent along, and again if it moves to another replica)."""
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling = sampling
        self.deadline = deadline
        self.replica_id = ""
        """The replica streaming it (set by the pool's placement; changes if that one is lost
        before the first output)."""
        self.load_tokens = len(self.prompt_token_ids) + sampling.max_tokens
        """What this request adds to its replica's outstanding tokens."""
        self.prefill_replica_id: str | None = None
        """pd: the prefill replica computing the prompt, until the first output arrives."""
        self.delivered = False
        """Some output reached the client side: it can no longer move to another replica."""
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

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

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
        self.requests_moved = 0
        """Requests re-sent to another replica because theirs was lost before their first output."""
        self._ctx = zmq.asyncio.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(output_addr)
        self.output_addr: str = self._pull.getsockopt_string(zmq.LAST_ENDPOINT)
        self._push: dict[str, zmq.asyncio.Socket] = {}
        self._linger_ms = linger_ms
        self._replicas: dict[str, ReplicaState] = {}
        for rid, addr in replica_addrs.items():
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, linger_ms)
            sock.connect(addr)
            self._push[rid] = sock
            self._replicas[rid] = ReplicaState(rid, addr)
        self._streams: dict[str, RequestStream] = {}
        self._tasks: list[asyncio.Task] = []
        self._monitors: dict[str, zmq.asyncio.Socket] = {}
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
        for rid, sock in self._push.items():
            self._monitors[rid] = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            self._tasks.append(asyncio.create_task(self._watch_socket(rid), name=f"replica-socket-{rid}"))

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
        for rid, sock in self._push.items():
            if rid in self._monitors:
                sock.disable_monitor()
                self._monitors[rid].close(linger=0)
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
                     sampling: SamplingParams, max_waiting: int | None = None,
                     tenant: str = DEFAULT_TENANT) -> RequestStream:
        """Place one request on a replica and send it (see `submit_many`)."""
        return (await self.submit_many([(request_id, prompt_token_ids, sampling)], max_waiting,
                                       tenant))[0]

    async def submit_many(self, items: Sequence[tuple[str, Sequence[int], SamplingParams]],
                          max_waiting: int | None = None,
                          tenant: str = DEFAULT_TENANT) -> list[RequestStream]:
        """Place and send several requests of `tenant`, all or none. Each goes to a healthy replica with
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
            route = RouteRequest.of(prompt, sampling.max_tokens)
            placement = self.router.place(candidates, route) if candidates else None
            if placement is None:
                for stream, _ in placed:  # nothing was sent yet
                    self._finish(stream)
                raise Overloaded(f"every healthy replica ({len(healthy)}) already has "
                                 f"{max_waiting} requests waiting")
            placed.append(self._place(rid, prompt, sampling, placement, now, tenant))
        targets = [stream.replica_id for stream, _ in placed]
        try:
            for (stream, msg), target in zip(placed, targets):
                # A replica lost during an earlier send has already had its requests moved (and
                # sent) elsewhere or failed: sending this copy too would duplicate the request.
                if stream.finished or stream.replica_id != target:
                    continue
                await self._send(target, msg)
        except BaseException as exc:
            for stream, _ in placed:
                self._abort(stream)
            if isinstance(exc, Exception):
                raise NoHealthyReplica(f"could not send a request to a replica: {exc!r}") from exc
            raise
        return [stream for stream, _ in placed]

    def _place(self, rid: str, prompt: Sequence[int], sampling: SamplingParams,
               placement: Placement, now: float,
               tenant: str = DEFAULT_TENANT) -> tuple[RequestStream, AddRequest]:
        stream = RequestStream(self, rid, prompt, sampling, now + self.request_timeout_s, tenant)
        self._streams[rid] = stream
        return stream, self._assign(stream, placement)

    def _assign(self, stream: RequestStream, placement: Placement) -> AddRequest:
        """Count `stream` against the replicas of `placement`; the message that sends it there."""
        replica, prefill = placement.replica, placement.prefill
        stream.replica_id = replica.replica_id
        charge(placement, stream.load_tokens)
        self.route_decisions[placement.decision] += 1
        msg = AddRequest(stream.request_id, stream.prompt_token_ids, stream.sampling, time.time(),
                         tenant=stream.tenant)
        if prefill is not None:
            stream.prefill_replica_id = prefill.replica_id
            msg.remote_prefill = {"transfer_id": f"kv-{uuid.uuid4().hex[:16]}",
                                  "prefill_replica": prefill.replica_id,
                                  "prefill_addr": prefill.address}
        return msg

    def _unassign(self, stream: RequestStream) -> None:
        release(self._replicas.get(stream.replica_id), self._pop_prefill(stream),
                stream.load_tokens)

    def _prefill_landed(self, stream: RequestStream) -> None:
        """The prompt of a pd request is done (first output or finish): free its prefill slot."""
        prefill_landed(self._pop_prefill(stream))

    def _pop_prefill(self, stream: RequestStream) -> ReplicaState | None:
        """The prefill replica still counting `stream` in its queue (None: none), forgotten here
        so that its slot is freed once."""
        rid, stream.prefill_replica_id = stream.prefill_replica_id, None
        return None if rid is None else self._replicas.get(rid)

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

    def _error_output(self, stream: RequestStream, message: str,
                      retryable: bool = False) -> RequestOutput:
        return RequestOutput(request_id=stream.request_id, new_token_ids=[], text="",
                             num_prompt_tokens=stream.num_prompt_tokens,
                             num_output_tokens=stream.num_output_tokens,
                             finish_reason="error", error=message, retryable=retryable)

    def _finish(self, stream: RequestStream) -> bool:
        """Stop tracking a stream; False if it was already finished."""
        if stream._done:
            return False
        stream._done = True
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        self._unassign(stream)
        return True

    def _deliver(self, stream: RequestStream, out: RequestOutput) -> None:
        if stream._done:
            return
        stream.num_output_tokens = out.num_output_tokens
        stream.delivered = True
        self._prefill_landed(stream)
        stream._queue.put_nowait(out)
        if out.finish_reason is not None:
            self._finish(stream)

    def _fail(self, stream: RequestStream, message: str, abort_on_replica: bool = True,
              retryable: bool = False) -> None:
        if stream._done:
            return
        self._deliver(stream, self._error_output(stream, message, retryable))
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
            if replica.lost and (replica.reconnected if isinstance(msg, StepOutputs)
                                 else msg.pid != replica.lost_pid):
                log.info("replica %s is back (pid %s)", replica.replica_id,
                         msg.pid if isinstance(msg, ReplicaReady) else replica.lost_pid)
                replica.lost, replica.reconnected = False, False
        if isinstance(msg, ReplicaReady):
            if msg.input_addr and msg.input_addr != replica.address:
                self._reconnect(replica, msg.input_addr)
            if replica.ready is not None and replica.ready.pid != msg.pid:
                replica.restarts += 1
                self._evict(replica, f"replica {replica.replica_id} restarted")
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

    def replica_lost(self, replica_id: str, reason: str) -> None:
        """`replica_id` is gone (its process exited, its socket dropped): route nothing more to it
        until it reports ready again, and move or end its requests now (see `_evict`)."""
        replica = self._replicas.get(replica_id)
        if replica is None or replica.lost or self._closed:
            return
        replica.lost, replica.reconnected = True, False
        replica.lost_pid = replica.ready.pid if replica.ready is not None else None
        log.warning("replica %s lost (%s): out of routing", replica_id, reason)
        self._evict(replica, f"replica {replica_id} was lost ({reason})")

    def _evict(self, replica: ReplicaState, message: str) -> None:
        """Requests on `replica` that have produced nothing move to a healthy replica; the others
        end with a retryable error. Its peers drop KV transfers with it (`PeerLost`): a decode
        replica recomputes the prompts it was prefilling, a prefill replica stops pushing to it.
        What prefix routing remembers of its cache is forgotten: a new process starts empty."""
        rid = replica.replica_id
        replica.prefix_blocks.clear()
        for stream in [s for s in self._streams.values() if s.replica_id == rid]:
            self._send_soon(rid, AbortRequests([stream.request_id]))  # in case it still runs them
            if stream.delivered or not self._move(stream):
                self._fail(stream, f"{message}; the request can be retried", abort_on_replica=False,
                           retryable=True)
        for stream in [s for s in self._streams.values() if s.prefill_replica_id == rid]:
            self._prefill_landed(stream)
        for peer in self._replicas.values():
            if peer is not replica and peer.ready is not None and not peer.lost:
                self._send_soon(peer.replica_id, PeerLost(rid))

    def _move(self, stream: RequestStream) -> bool:
        """Send a request that has produced nothing to another healthy replica."""
        now = time.monotonic()
        healthy = [r for r in self._replicas.values() if r.replica_id != stream.replica_id
                   and r.is_healthy(now, self.heartbeat_timeout_s)]
        route = RouteRequest.of(stream.prompt_token_ids, stream.sampling.max_tokens)
        placement = self.router.place(healthy, route) if healthy else None
        if placement is None:
            return False
        old = stream.replica_id
        self.requests_moved += 1
        self._unassign(stream)
        msg = self._assign(stream, placement)
        log.info("request %s moves from lost replica %s to %s", stream.request_id, old,
                 stream.replica_id)
        task = asyncio.get_running_loop().create_task(self._send(stream.replica_id, msg))
        self._pending_sends.add(task)

        def sent(t: asyncio.Task) -> None:
            self._pending_sends.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self._fail(stream, f"could not resend to replica {stream.replica_id}: "
                                   f"{t.exception()!r}", retryable=True)
        task.add_done_callback(sent)
        return True

    def _reconnect(self, replica: ReplicaState, address: str) -> None:
        """The replica came back at another address (a restarted Ray actor): a new PUSH socket.
        Frames queued for the old address are dropped with it (their requests were evicted)."""
        rid = replica.replica_id
        log.info("replica %s now at %s (was %s)", rid, address, replica.address)
        old = self._push[rid]
        if rid in self._monitors:
            old.disable_monitor()
            self._monitors.pop(rid).close(linger=0)
        old.close(linger=0)
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, self._linger_ms)
        sock.connect(address)
        self._push[rid] = sock
        replica.address = address
        if self._started:
            self._monitors[rid] = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._watch_socket(rid), name=f"replica-socket-{rid}"))

    async def _watch_socket(self, replica_id: str) -> None:
        """A replica's input socket dropping means its process died (or the network did)."""
        monitor = self._monitors[replica_id]
        while True:
            try:
                event = await recv_monitor_message(monitor)
            except zmq.ZMQError:
                return
            replica = self._replicas[replica_id]
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.replica_lost(replica_id, "its socket disconnected")
            elif event["event"] == zmq.EVENT_CONNECTED and replica.lost:
                replica.reconnected = True

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
                    self._evict(replica, f"replica {replica.replica_id} sent no frame for "
                                         f"{silent:.1f}s (heartbeat timeout "
                                         f"{self.heartbeat_timeout_s:g}s)")
            for stream in [s for s in self._streams.values() if s.deadline < now]:
                self._fail(stream, f"request {stream.request_id} timed out after "
                                   f"{self.request_timeout_s:g}s")
