"""torch.distributed point-to-point transport: Gloo on CPU, NCCL on GPU, one code path.

One frame on the wire (all tensors to/from `peer` with `tag`):
    int64[2]  (number of parts n, protocol marker)   n = 0: keepalive, n = -1: sender closed
    int64[n]  byte length of each part
    uint8[len] each non-empty part

Both ends run a background thread: the sender's drains a bounded queue (so `send()` never waits
for the peer, and the prefill loop keeps computing) and sends a keepalive when idle, so the
receiver's blocking `recv` never hits the process-group timeout while the sender is alive; if the
sender dies, the receiver's recv fails after that timeout and `recv()` raises TransportError.

Backend and device come from the engine's device (`kv_transfer.config.kv_backend`): a CPU engine
joins with Gloo and every tensor above is a CPU tensor; a CUDA engine joins with NCCL after
`torch.cuda.set_device(its device)`, and the tensors (send copies and receive buffers) live on that
GPU. NCCL needs one GPU per rank. On CUDA each background thread works on its own stream, so the
receive that is always posted (NCCL's wait() makes the *current* stream wait for it) never holds
up the engine's kernels on the default stream. The frames' parts are host bytes (the codecs run on
the CPU), so under NCCL they are staged host -> GPU -> host.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.codecs import Buffer
from kv_transfer.config import kv_backend, kv_transport_device
from kv_transfer.transport import TransportError

log = logging.getLogger(__name__)
_MARK = 0x4B56  # "KV"
# Zero-copy views of read-only buffers (lz4 output is bytes) are only ever read here.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


# Set by init_process_group: (the default group it created, this rank's transport device).
_group_device: tuple[dist.ProcessGroup, torch.device] | None = None


def init_process_group(rank: int, world_size: int, master_port: int, *, device: str = "cpu",
                       master_addr: str = "127.0.0.1", backend: str | None = None,
                       timeout_s: float = 60.0) -> str:
    """Join a process group for KV transfer. `device` is the engine's device (cpu, cuda, cuda:1);
    the backend defaults to `kv_backend(device)`: gloo for CPU engines, nccl for CUDA ones (each
    rank on its own GPU; this binds the process to it with torch.cuda.set_device first).
    `timeout_s` bounds every blocking collective/p2p wait. Returns the backend."""
    global _group_device
    backend = backend or kv_backend(device)
    dev = torch.device(kv_transport_device(device, backend))
    if backend == "nccl":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    elif backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    _group_device = (dist.group.WORLD, dev)
    return backend


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device the transport's tensors must live on for `group`'s backend: the one given to
    init_process_group, else the current CUDA device under NCCL, else the CPU."""
    if group is None and _group_device is not None and _group_device[0] is dist.group.WORLD:
        return _group_device[1]
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TorchDistTransport:
    """`device`: where sent copies and receive buffers live; default `group_device(group)` (the
    engine device given to init_process_group under NCCL, the CPU under Gloo)."""

    def __init__(self, role: str, peer: int, *, device: str | torch.device | None = None,
                 group: dist.ProcessGroup | None = None, tag: int = 7, queue_size: int = 64,
                 send_timeout_s: float = 30.0, keepalive_s: float = 5.0) -> None:
        if role not in ("sender", "receiver"):
            raise ValueError(f"role must be sender or receiver, got {role!r}")
        if not dist.is_initialized():
            raise TransportError("torch.distributed is not initialized (call init_process_group first)")
        self.role, self.peer, self.tag, self.group = role, peer, tag, group
        self.device = torch.device(device) if device is not None else group_device(group)
        backend = dist.get_backend(group)
        if backend == "nccl" and self.device.type != "cuda":
            raise TransportError(f"the nccl backend sends CUDA tensors only, got device {self.device}")
        if backend == "gloo" and self.device.type != "cpu":
            raise TransportError(f"the gloo backend sends CPU tensors here, got device {self.device}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.send_timeout_s = send_timeout_s
        self.keepalive_s = keepalive_s
        self.error: BaseException | None = None
        self._closed = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size if role == "sender" else 0)
        target = self._send_loop if role == "sender" else self._recv_loop
        self._thread = threading.Thread(target=target, name=f"kv-{role}-peer{peer}", daemon=True)
        self._thread.start()

    # -- the interface ---------------------------------------------------------------------
    def send(self, parts: list[Buffer]) -> None:
        if self.error is not None:
            raise TransportError(f"torch.distributed sender broke: {self.error}")
        if self._closed.is_set():
            raise TransportError("send on a closed transport")
        try:
            self._queue.put(list(parts), timeout=self.send_timeout_s)
        except queue.Full as e:
            raise TransportError(f"torch.distributed send queue to rank {self.peer} stayed full "
                                 f"for {self.send_timeout_s}s") from e

    def recv(self, timeout_s: float) -> list[Buffer] | None:
        try:
            return self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            if self.error is not None:
                raise TransportError(f"torch.distributed receiver broke: {self.error}") from None
            return None

    def close(self, timeout_s: float = 10.0) -> None:
        """Sender: flush queued frames (at most timeout_s), then tell the receiver. Receiver: stop
        handing out frames (its thread ends when the sender closes, or at the group timeout)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self.role == "sender":
            try:
                self._queue.put(None, timeout=timeout_s)
            except queue.Full:
                log.warning("KV sender to rank %d closed with frames still queued", self.peer)
            self._thread.join(timeout_s)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Sender: wait until every queued frame was handed to torch.distributed."""
        done = threading.Event()
        self._queue.put(done, timeout=timeout_s)
        return done.wait(timeout_s)

    # -- background threads ----------------------------------------------------------------
    def _p2p_send(self, t: torch.Tensor) -> None:
        dist.send(t, dst=self.peer, group=self.group, tag=self.tag)

    def _p2p_recv(self, t: torch.Tensor) -> None:
        dist.recv(t, src=self.peer, group=self.group, tag=self.tag)

    @contextlib.contextmanager
    def _device_scope(self):
        """Around a background thread's loop: on CUDA, this thread's current device and a stream
        of its own (the current stream is per thread), else nothing."""
        if self.device.type != "cuda":
            yield None
            return
        torch.cuda.set_device(self.device)
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            yield stream

    def _control(self, n: int) -> torch.Tensor:
        return torch.tensor([n, _MARK], dtype=torch.int64, device=self.device)

    def _send_loop(self) -> None:
        try:
            with self._device_scope() as stream:
                self._send_frames(stream)
        except BaseException as e:  # noqa: BLE001 - surfaced to the caller by send()
            self.error = e
            log.error("KV sender thread to rank %d failed: %s", self.peer, e)

    def _send_frames(self, stream) -> None:
        # Under NCCL dist.send only enqueues on the GPU; synchronizing the thread's stream after
        # each frame makes "sent" mean delivered, as with Gloo (backpressure, errors surface here).
        sync = stream.synchronize if stream is not None else (lambda: None)
        while True:
            try:
                item = self._queue.get(timeout=self.keepalive_s)
            except queue.Empty:
                self._p2p_send(self._control(0))
                sync()
                continue
            if isinstance(item, threading.Event):
                item.set()
                continue
            if item is None:
                self._p2p_send(self._control(-1))
                sync()
                return
            sizes = [memoryview(p).nbytes for p in item]
            self._p2p_send(self._control(len(item)))
            self._p2p_send(torch.tensor(sizes, dtype=torch.int64, device=self.device))
            for part, size in zip(item, sizes):
                if size:
                    self._p2p_send(torch.frombuffer(part, dtype=torch.uint8).to(self.device))
            sync()

    def _recv_loop(self) -> None:
        try:
            with self._device_scope():
                self._recv_frames()
        except BaseException as e:  # noqa: BLE001 - surfaced to the caller by recv()
            self.error = e
            log.error("KV receiver thread from rank %d failed: %s", self.peer, e)

    def _recv_frames(self) -> None:
        # .tolist() / .cpu() synchronize the thread's stream, which NCCL's wait() made wait for
        # the receive: the host reads the bytes only once they arrived.
        while not self._closed.is_set():
            ctrl = torch.empty(2, dtype=torch.int64, device=self.device)
            self._p2p_recv(ctrl)
            n, mark = ctrl.tolist()
            if mark != _MARK:
                raise TransportError(f"bad control word {[n, mark]} from rank {self.peer}")
            if n == 0:
                continue
            if n < 0:
                return
            sizes = torch.empty(n, dtype=torch.int64, device=self.device)
            self._p2p_recv(sizes)
            parts: list[Buffer] = []
            for size in sizes.tolist():
                buf = torch.empty(size, dtype=torch.uint8, device=self.device)
                if size:
                    self._p2p_recv(buf)
                parts.append(memoryview(buf.cpu().numpy()))
            if not self._closed.is_set():
                self._queue.put(parts)


__all__ = ["TorchDistTransport", "group_device", "init_process_group"]
