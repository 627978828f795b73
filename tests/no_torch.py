"""Run a snippet in a fresh interpreter where importing torch fails, as the torch-free packages
(scheduler/, sim/, the gateway) must work without it."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK_TORCH = """\
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
"""

CHECK_TORCH_ABSENT = """
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("ok")
"""


def run_without_torch(body: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `body` (dedented) with torch blocked from the repository root; fail unless it ends
    with torch still absent from sys.modules. Returns the finished process (stdout for checks)."""
    code = BLOCK_TORCH + textwrap.dedent(body) + CHECK_TORCH_ABSENT
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
    return p
