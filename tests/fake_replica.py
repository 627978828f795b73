"""A replica stand-in for gateway tests: speaks engine.protocol over real ZeroMQ sockets, no model.

Each step (every `step_s`) every running request gets one token: the prompt ids echoed cyclically,
text `f"{token} "` (fake logprobs too, if asked: see `_entry`). A request finishes with "length" at max_tokens, with "stop" when it would emit
`eos_token_id` (unless ignore_eos; the EOS text is not returned), and with "error" as soon as its
prompt contains `error_token_id`. With `max_running`, only the first that many requests get tokens
(the rest wait, and are reported waiting). Runs in a daemon thread; `silence()` makes it stop sending
anything (a hung replica), `stop()` ends the thread.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import zmq

from engine.protocol import (
    AbortRequests, AddRequest, ReplicaReady, ReplicaStats, RequestOutput, Shutdown, StepOutputs,
    decode, encode,
)


@dataclass
class _Running:
    add: AddRequest
    num_out: int = 0
    sent_first: bool = False


class FakeReplica:
    def __init__(self, replica_id: str, input_addr: str, *, model: str = "fake-model",
                 max_model_len: int = 4096, step_s: float = 0.005, heartbeat_s: float = 0.2,
                 eos_token_id: int = 2, error_token_id: int = 250,
                 max_running: int | None = None) -> None:
        self.replica_id = replica_id
        self.model = model
        self.max_model_len = max_model_len
        self.step_s = step_s
        self.heartbeat_s = heartbeat_s
        self.eos_token_id = eos_token_id
        self.error_token_id = error_token_id
        self.max_running = max_running
        self._ctx = zmq.Context()
        self._in = self._ctx.socket(zmq.PULL)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.bind(input_addr)
        self.input_addr = self._in.getsockopt_string(zmq.LAST_ENDPOINT)
        self._out: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._silent = threading.Event()
        self._lock = threading.Lock()
        self.received: list[AddRequest] = []
        self.aborted: list[str] = []
        self.got_shutdown = threading.Event()

    # ---- control (from the test thread) ---------------------------------------------------------

    def start(self, output_addr: str) -> "FakeReplica":
        self._out = self._ctx.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.connect(output_addr)
        self._thread = threading.Thread(target=self._run, name=f"fake-{self.replica_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def silence(self) -> None:
        """Stop sending frames (no outputs, no heartbeats) but keep the thread alive."""
        self._silent.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "fake replica thread did not stop"
        self._in.close(linger=0)
        if self._out is not None:
            self._out.close(linger=0)
        self._ctx.term()

    def aborted_ids(self) -> list[str]:
        with self._lock:
            return list(self.aborted)

    def received_ids(self) -> list[str]:
        with self._lock:
            return [a.request_id for a in self.received]


    # ---- replica loop (own thread) ------------------------------------------------------------

    def _send(self, msg) -> None:
        if not self._silent.is_set():
            assert self._out is not None
            self._out.send(encode(msg))

    def _run(self) -> None:
        self._send(ReplicaReady(self.replica_id, self.model, self.max_model_len, num_blocks=64,
                                block_size=16, pid=os.getpid()))
        running: dict[str, _Running] = {}
        last_sent = time.monotonic()
        next_step = time.monotonic() + self.step_s
        poller = zmq.Poller()
        poller.register(self._in, zmq.POLLIN)
        while not self._stop.is_set():
            timeout_ms = max(0.0, next_step - time.monotonic()) * 1000
            if dict(poller.poll(timeout_ms)).get(self._in):
                msg = decode(self._in.recv())
                if isinstance(msg, AddRequest):
                    with self._lock:
                        self.received.append(msg)
                    running[msg.request_id] = _Running(msg)
                elif isinstance(msg, AbortRequests):
                    with self._lock:
                        self.aborted.extend(msg.request_ids)
                    for rid in msg.request_ids:
                        running.pop(rid, None)
                elif isinstance(msg, Shutdown):
                    self.got_shutdown.set()
                    return
                continue
            now = time.monotonic()
            if now < next_step:
                continue
            next_step = now + self.step_s
            active = list(running.values())[:self.max_running]  # the rest wait (FCFS)
            outputs = [self._step_one(r) for r in active]
            for out in outputs:
                if out.finish_reason is not None:
                    running.pop(out.request_id, None)
            if outputs or now - last_sent >= self.heartbeat_s:
                n_run = min(len(running), self.max_running or len(running))
                stats = ReplicaStats(num_running=n_run, num_waiting=len(running) - n_run,
                                     num_free_blocks=64, num_blocks=64,
                                     kv_cache_usage=min(1.0, n_run / 64),
                                     max_num_seqs=self.max_running or 0)
                self._send(StepOutputs(self.replica_id, outputs, stats))
                last_sent = now

    def _step_one(self, r: _Running) -> RequestOutput:
        add, sp = r.add, r.add.sampling
        prompt = add.prompt_token_ids
        queue_time = None if r.sent_first else 0.001
        r.sent_first = True
        base = dict(request_id=add.request_id, num_prompt_tokens=len(prompt), queue_time=queue_time)
        if self.error_token_id in prompt:
            return RequestOutput(**base, new_token_ids=[], text="", num_output_tokens=0,
                                 finish_reason="error", error="fake replica failure")
        token = prompt[r.num_out % len(prompt)]
        r.num_out += 1
        if token == self.eos_token_id and not sp.ignore_eos:
            return RequestOutput(**base, new_token_ids=[token], text="", num_output_tokens=r.num_out,
                                 finish_reason="stop")
        reason = "length" if r.num_out >= sp.max_tokens else None
        out = RequestOutput(**base, new_token_ids=[token], text=f"{token} ",
                            num_output_tokens=r.num_out, finish_reason=reason)
        if sp.logprobs is not None:
            out.logprobs = [_entry(token, sp.logprobs)]
        if sp.prompt_logprobs is not None and r.num_out == 1:
            out.prompt_logprobs = [None] + [_entry(t, sp.prompt_logprobs) for t in prompt[1:]]
        return out


def _entry(token: int, k: int) -> list:
    """Fake logprobs: the token itself is the most likely (-0.5), then token+1, token+2, ..."""
    return [token, -0.5, [[(token + j) % 256, -0.5 - j] for j in range(k)]]


def wait_until(predicate, timeout: float = 2.0) -> bool:
    """Poll `predicate` every 10 ms until it holds or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
