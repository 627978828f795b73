"""A hybrid replica process: an EngineCore behind two ZeroMQ sockets.

Request life cycle on this node:
1. the gateway PUSHes `AddRequest` (prompt token ids + sampling) to our bound PULL socket;
2. the request waits in the scheduler until its blocks can be allocated (FCFS);
3. each step computes a chunk of its prompt (stall-free: decodes first, then prefill chunks);
4. once the prompt is done every step samples one token; new tokens and text go back to the
   gateway in a `StepOutputs` frame right after the step that produced them;
5. it ends on EOS / stop / length, or on `AbortRequests` (client gone); either way its KV blocks
   are freed in that step and a final output with `finish_reason` is sent.

The server never blocks on the network while it has work: inputs are drained without waiting
between steps, and it only sleeps in `poll` (bounded) when idle. It exits when told to, or when the
process that started it dies.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, replace

import torch
import zmq

from engine import protocol
from engine.config import EngineConfig
from engine.core import EngineCore

log = logging.getLogger("tandem.replica")

HEARTBEAT_S = 0.5
IDLE_POLL_MS = 50


class Heartbeat(threading.Thread):
    """Tells the gateway the replica is alive whenever the main loop has been quiet for a period.

    A single step can outlast the gateway's heartbeat timeout (a whole-prompt prefill of thousands
    of tokens on a CPU), and the main loop cannot send while it computes; torch releases the GIL,
    so this thread still runs. It has its own socket: ZeroMQ sockets are not thread-safe.
    """

    def __init__(self, ctx: zmq.Context, output_addr: str, replica_id: str, period_s: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(output_addr)
        self.replica_id, self.period_s = replica_id, period_s
        self.stats = protocol.ReplicaStats()
        """Latest stats; the main thread replaces (never mutates) it."""
        self.last_sent = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period_s / 2):
            if time.monotonic() - self.last_sent >= self.period_s:
                frame = protocol.encode(protocol.StepOutputs(self.replica_id, [], self.stats))
                try:
                    self.sock.send(frame, zmq.NOBLOCK)
                except zmq.Again:
                    pass  # the gateway is not reading; the next beat will try again
                self.last_sent = time.monotonic()
        self.sock.close()

    def stop(self) -> None:
        self._halt.set()


class ReplicaServer:
    """The hybrid replica; prefill and decode nodes subclass it and fill in the hooks
    (`handle_add`, `handle_abort`, `handle_peer_lost`, `before_step`, `after_step`, `visible`,
    `live_transfers`, `idle_poll_ms`)."""

    role = "hybrid"

    def __init__(self, replica_id: str, config: EngineConfig, input_addr: str, output_addr: str) -> None:
        self.replica_id = replica_id
        self.engine = EngineCore(config)
        self.ctx = zmq.Context()
        self.inputs = self.ctx.socket(zmq.PULL)
        self.inputs.bind(input_addr)   # tcp://host:* picks a free port (a Ray actor binds so)
        self.input_addr: str = self.inputs.getsockopt_string(zmq.LAST_ENDPOINT)
        """Where the gateway reaches this replica (reported in `ReplicaReady`)."""
        self.outputs = self.ctx.socket(zmq.PUSH)
        self.outputs.setsockopt(zmq.LINGER, 1000)
        self.outputs.setsockopt(zmq.SNDHWM, 0)   # never drop or block on token frames
        self.outputs.connect(output_addr)
        self.heartbeat = Heartbeat(self.ctx, output_addr, replica_id, HEARTBEAT_S)
        self.poller = zmq.Poller()
        self.poller.register(self.inputs, zmq.POLLIN)
        self._running = True
        self.exit_code = 0
        """Non-zero when the loop ended on an error the replica cannot recover from."""
        self._parent = os.getppid()
        # Line-buffered so a trace can be followed (tail -f) while the replica runs.
        self._trace_file = open(config.trace_file, "a", buffering=1) if config.trace_file else None

    def _trace(self, stats) -> None:
        if self._trace_file is not None:
            self._trace_file.write(json.dumps({"replica": self.replica_id, **asdict(stats)}) + "\n")

    def stop(self) -> None:
        self._running = False

    def _send(self, msg) -> None:
        self.outputs.send(protocol.encode(msg), copy=False)

    # -- hooks for the node servers ---------------------------------------------------------
    def handle_add(self, msg: protocol.AddRequest) -> list[protocol.RequestOutput]:
        err = self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.sampling,
                                      tenant=msg.tenant)
        return [err] if err else []

    def handle_abort(self, msg: protocol.AbortRequests) -> list[protocol.RequestOutput]:
        return self.engine.abort(msg.request_ids)

    def handle_peer_lost(self, msg: protocol.PeerLost) -> list[protocol.RequestOutput]:
        """Another replica died; a hybrid replica shares nothing with its peers."""
        return []

    def live_transfers(self) -> int:
        """KV transfers in flight on this replica (nodes override)."""
        return 0

    def stats(self) -> protocol.ReplicaStats:
        return replace(self.engine.stats(), num_live_transfers=self.live_transfers())

    def visible(self, outputs: list[protocol.RequestOutput]) -> list[protocol.RequestOutput]:
        """The outputs the gateway should see (nodes hide their internal requests)."""
        return outputs

    def kv_events(self) -> list[dict]:
        """KV-transfer events since the last frame (decode nodes report them for metrics)."""
        return []

    def before_step(self) -> list[protocol.RequestOutput]:
        """Runs every loop turn, before a step (if any)."""
        return []

    def after_step(self) -> None:
        """Runs right after every step, before the next `schedule` can reuse freed blocks."""

    def idle_poll_ms(self) -> int:
        """How long the loop may wait for input: not at all while there is work to step."""
        return 0 if self.engine.has_work() else IDLE_POLL_MS

    def ready_frame(self) -> protocol.ReplicaReady:
        cfg = self.engine.config
        return protocol.ReplicaReady(
            replica_id=self.replica_id, model=cfg.model_name,
            max_model_len=cfg.scheduler.max_model_len, num_blocks=self.engine.runner.num_blocks,
            block_size=cfg.scheduler.block_size, pid=os.getpid(), role=self.role,
            input_addr=self.input_addr,
        )

    # -- the loop ----------------------------------------------------------------------------
    def _handle(self, msg) -> list[protocol.RequestOutput]:
        if isinstance(msg, protocol.AddRequest):
            return self.handle_add(msg)
        if isinstance(msg, protocol.AbortRequests):
            return self.handle_abort(msg)
        if isinstance(msg, protocol.PeerLost):
            return self.handle_peer_lost(msg)
        if isinstance(msg, protocol.Shutdown):
            self._running = False
            return []
        log.warning("replica %s ignores frame %r", self.replica_id, type(msg).__name__)
        return []

    def _drain_inputs(self, timeout_ms: int) -> list[protocol.RequestOutput]:
        outputs: list[protocol.RequestOutput] = []
        if not self.poller.poll(timeout_ms):
            return outputs
        while True:
            try:
                frame = self.inputs.recv(zmq.NOBLOCK)
            except zmq.Again:
                return outputs
            try:
                outputs.extend(self._handle(protocol.decode(frame)))
            except Exception as e:  # a bad frame must not take the replica down
                log.exception("bad input frame: %s", e)

    def serve(self) -> None:
        self._send(self.ready_frame())
        self.heartbeat.stats = self.stats()
        self.heartbeat.start()
        iterations = []
        while self._running:
            outputs = self._drain_inputs(self.idle_poll_ms())
            try:   # no exception may end the loop: it would strand every request on this replica
                outputs.extend(self.before_step())
                if self.engine.has_work():
                    outputs.extend(self.engine.step())
                    self.after_step()
                    iterations.append(self.engine.last_step)
                    self._trace(self.engine.last_step)
            except Exception as e:
                log.exception("step failed")
                outputs.extend(self._fail_all(f"replica step failed: {e}"))
                if getattr(e, "fatal", False):   # e.g. a tensor-parallel rank died: restart whole
                    for o in outputs:
                        o.retryable = True   # the requests were fine; the restarted replica is not
                    self._send(protocol.StepOutputs(self.replica_id, self.visible(outputs), self.stats()))
                    log.error("replica %s cannot continue (%s); exiting so it is restarted",
                              self.replica_id, e)
                    self.exit_code = 1
                    break
            outputs = self.visible(outputs)
            kv_events = self.kv_events()
            # Inputs (aborts, adds) change the state even when nothing is sent: keep beats fresh.
            self.heartbeat.stats = stats = self.stats()
            if outputs or iterations or kv_events:
                self._send(protocol.StepOutputs(self.replica_id, outputs, stats, iterations, kv_events))
                iterations = []
                self.heartbeat.last_sent = time.monotonic()
            if os.getppid() != self._parent:
                log.warning("parent process exited; replica %s stops", self.replica_id)
                break
        self.close()

    def _fail_all(self, message: str) -> list[protocol.RequestOutput]:
        """After an engine error, end every request with that error rather than hang them."""
        s = self.engine.scheduler
        ids = [r.request_id for r in [*s.running, *s.waiting, *s.remote_prefill.values()]]
        # Through the node's own abort, so a decode node also cancels the KV transfers writing
        # into these requests' blocks (and tells their prefill replicas) before the blocks go.
        outputs = self.handle_abort(protocol.AbortRequests(ids))
        for o in outputs:
            o.finish_reason, o.error = "error", message
        return outputs

    def close(self) -> None:
        self.engine.runner.close()
        self.heartbeat.stop()
        if self.heartbeat.is_alive():
            self.heartbeat.join(timeout=2)
        else:   # never started (a server closed before `serve`): its socket would block `term`
            self.heartbeat.sock.close()
        if self._trace_file is not None:
            self._trace_file.close()
        self.inputs.close(linger=0)
        self.outputs.close()
        self.ctx.term()
