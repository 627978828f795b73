"""Start replica servers as local processes, restart the ones that die, and stop them for sure.

A replica is `python -m cluster.node --role ...`: the same servers a Ray actor will start later. Its
inputs are a ZeroMQ address it binds; its outputs go to the gateway's address. A restarted replica
binds the same addresses, so the gateway's sockets reconnect by themselves.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import EngineConfig
from kv_transfer.config import KVConfig

log = logging.getLogger("tandem.launcher")


@dataclass(frozen=True)
class ReplicaSpec:
    replica_id: str
    """Name the replica reports itself under (metrics label, routing key)."""
    engine: EngineConfig
    input_addr: str
    """ZeroMQ address the replica binds for its requests."""
    role: str = "hybrid"
    """hybrid | prefill | decode: which node server the process runs."""
    kv: KVConfig = field(default_factory=KVConfig)
    """How a prefill/decode node moves KV."""


class LocalLauncher:
    """Starts replicas as child processes; `stop()` ends them (Shutdown, then SIGTERM, then SIGKILL)."""

    def __init__(self, output_addr: str | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-")
        self.output_addr = output_addr or f"ipc://{self._tmp.name}/gateway-out"
        self.procs: dict[str, subprocess.Popen] = {}
        self.specs: dict[str, ReplicaSpec] = {}

    def ipc_addr(self, name: str) -> str:
        return f"ipc://{self._tmp.name}/{name}"

    def start(self, spec: ReplicaSpec) -> None:
        cmd = [
            sys.executable, "-m", "cluster.node", "--role", spec.role, "--replica-id", spec.replica_id,
            "--input-addr", spec.input_addr, "--output-addr", self.output_addr,
            "--config-json", json.dumps(spec.engine.to_dict()), "--kv-json", json.dumps(spec.kv.to_dict()),
        ]
        env = dict(os.environ)
        if spec.engine.threads:
            # Pin the BLAS/OpenMP pools too, so replicas sharing a machine do not oversubscribe it.
            env["OMP_NUM_THREADS"] = str(spec.engine.threads)
        self.procs[spec.replica_id] = subprocess.Popen(cmd, env=env)
        self.specs[spec.replica_id] = spec
        log.info("started replica %s (pid %d)", spec.replica_id, self.procs[spec.replica_id].pid)

    def dead(self) -> dict[str, int]:
        """Replicas whose process has exited, with their exit codes."""
        return {rid: p.returncode for rid, p in self.procs.items() if p.poll() is not None}

    def restart(self, replica_id: str) -> None:
        """Start a replica whose process has exited again, with the same spec."""
        if self.procs[replica_id].poll() is None:
            raise RuntimeError(f"replica {replica_id} is still running")
        self.start(self.specs[replica_id])

    def stop(self, grace: float = 3.0, timeout: float = 10.0) -> None:
        """Give replicas `grace` seconds to exit on their own (the gateway sent them Shutdown),
        then SIGTERM, then SIGKILL after `timeout`."""
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for rid, p in self.procs.items():
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("replica %s did not stop in %.0fs; killing it", rid, timeout)
                p.kill()
                p.wait(5)
        self._tmp.cleanup()


@dataclass
class Supervisor:
    """Restarts replicas whose process died, with exponential backoff: a replica that keeps dying
    waits `backoff_s`, then twice as long each time, up to `max_backoff_s`; one that stayed up for
    `stable_s` starts again from `backoff_s`. `on_exit(replica_id, returncode)` runs once per death
    (the gateway takes the replica out of routing); `may_restart(replica_id)` vetoes a restart
    (a replica that never became ready has a configuration problem, not bad luck).
    `poll(now)` does the work; call it often (the serve loop does, five times a second)."""

    launcher: LocalLauncher
    on_exit: Callable[[str, int], None]
    may_restart: Callable[[str], bool] = lambda _rid: True
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_s: float = 60.0
    restarts: dict[str, int] = field(default_factory=dict)
    """Restarts so far, per replica."""
    _started_at: dict[str, float] = field(default_factory=dict)
    _delay: dict[str, float] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)
    _given_up: set[str] = field(default_factory=set)

    def poll(self, now: float) -> None:
        for rid, code in self.launcher.dead().items():
            if rid in self._due or rid in self._given_up:
                continue
            self.on_exit(rid, code)
            if not self.may_restart(rid):
                log.error("replica %s exited with %s before it was ever ready; not restarting it",
                          rid, code)
                self._given_up.add(rid)
                continue
            up_for = now - self._started_at.get(rid, now)
            delay = self.backoff_s if up_for >= self.stable_s or rid not in self._delay else min(
                self._delay[rid] * 2, self.max_backoff_s)
            self._delay[rid] = delay
            self._due[rid] = now + delay
            log.warning("replica %s exited with %s; restarting it in %.0fs", rid, code, delay)
        for rid, due in list(self._due.items()):
            if now >= due:
                del self._due[rid]
                self.launcher.restart(rid)
                self._started_at[rid] = now
                self.restarts[rid] = self.restarts.get(rid, 0) + 1

    @property
    def given_up(self) -> set[str]:
        """Replicas that died and will not be restarted."""
        return set(self._given_up)
