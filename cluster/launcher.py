"""Start replica servers as local processes and stop them for sure.

A replica is `python -m cluster.node --role ...`: the same servers a Ray actor will start later. Its
inputs are a ZeroMQ address it binds; its outputs go to the gateway's address.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
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
