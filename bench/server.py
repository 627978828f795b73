"""Start and stop a local `tandem serve` for benchmarks (loopback only)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Iterator

import httpx

from cluster.net import free_port  # also imported from here by bench and the tests


@dataclass
class LocalServer:
    url: str
    proc: subprocess.Popen


@contextmanager
def local_server(serve_args: list[str], ready_timeout: float = 180.0,
                 quiet: bool = True, log_file=None) -> Iterator[LocalServer]:
    """Run `tandem serve SERVE_ARGS --port <free>` until the block ends (SIGINT, then SIGKILL).
    Yields once /health reports every replica ready ("ok"). `log_file` (an open file) gets the
    server's stdout and stderr instead of discarding them (quiet) or sharing ours."""
    port = free_port()
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), *serve_args]
    out = log_file if log_file is not None else subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=out, stderr=out,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"`tandem serve {' '.join(serve_args)}` exited with {proc.returncode}")
            try:
                r = httpx.get(f"{base}/health", timeout=2)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy within {ready_timeout:.0f}s")
            time.sleep(0.3)
        yield LocalServer(base, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
