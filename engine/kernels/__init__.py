"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

`paged_attention.c` has no torch headers, so it builds in about a second (a torch C++ extension
takes ~30 s). One library is built per attention shape (head_dim, GQA group, kv heads) and compiler flags, cached under
`$TANDEM_CACHE_DIR/../kernels` (default `~/.cache/tandem/kernels`), named by a hash of the source
and the flags, so an edited source or another CPU gets a fresh build. The library is linked with
-fopenmp: torch's CPU wheel ships `libgomp.so.1` under that soname, and since torch is loaded first
the kernels share torch's OpenMP thread pool (and its `torch.set_num_threads`).

Without a compiler, with a head_dim that is not a multiple of 16, or with TANDEM_NATIVE_KERNELS=0,
`load_paged_attention` returns None and attention falls back to plain torch ops.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tandem.kernels")

_HERE = Path(__file__).parent
_SOURCES = ("paged_attention.c", "paged_attention_impl.h")
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")


def kernel_cache_dir() -> Path:
    env = os.environ.get("TANDEM_CACHE_DIR")
    base = Path(env).expanduser().parent if env else Path.home() / ".cache" / "tandem"
    return base / "kernels"


@dataclass(frozen=True)
class PagedAttentionLib:
    """The two entry points of one compiled library (see paged_attention_impl.h)."""

    head_dim: int
    group: int
    kv_heads: int
    write_kv: dict[str, ctypes._CFuncPtr]
    """dtype name ("float32", "bfloat16") -> tandem_write_kv_<suffix>."""
    attend: dict[str, ctypes._CFuncPtr]
    """dtype name -> tandem_attend_<suffix> (short query runs: decodes, small chunks)."""
    prefill_attend: dict[str, ctypes._CFuncPtr]
    """dtype name -> tandem_prefill_attend_<suffix> (prefill chunks, flash-attention style)."""


def _compile(head_dim: int, group: int, kv_heads: int) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    flags = [*_CFLAGS, f"-DHEAD_DIM={head_dim}", f"-DGROUP={group}", f"-DKV_HEADS={kv_heads}"]
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((_HERE / name).read_bytes())
    digest.update(" ".join([compiler, *flags]).encode())
    cache = kernel_cache_dir()
    target = cache / f"paged_attention-d{head_dim}-g{group}-h{kv_heads}-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [compiler, *flags, str(_HERE / "paged_attention.c"), "-o", tmp, "-lm"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled %s", target.name)
    return target


@functools.cache
def load_paged_attention(head_dim: int, group: int, kv_heads: int) -> PagedAttentionLib | None:
    """The compiled kernels for this attention shape, or None (plain torch is used instead)."""
    if os.environ.get("TANDEM_NATIVE_KERNELS", "1") == "0":
        return None
    if head_dim % 16 or head_dim > 256 or not 1 <= group * kv_heads <= 64:
        log.info("no native paged attention for head_dim %d, %d x %d heads; using torch ops",
                 head_dim, kv_heads, group)
        return None
    try:
        lib = ctypes.CDLL(str(_compile(head_dim, group, kv_heads)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native paged attention unavailable (%s); using torch ops, which are slower", e)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    write_kv, attend, prefill_attend = {}, {}, {}
    for dtype, suffix in (("float32", "f32"), ("bfloat16", "bf16")):
        w = getattr(lib, f"tandem_write_kv_{suffix}")
        w.argtypes = [p, p, i64, p, i64, p, i64, i64]
        w.restype = None
        a = getattr(lib, f"tandem_attend_{suffix}")
        a.argtypes = [p, i64, p, p, p, i64, p, i64, i64, ctypes.c_float]
        a.restype = ctypes.c_int
        f = getattr(lib, f"tandem_prefill_attend_{suffix}")
        f.argtypes = a.argtypes
        f.restype = None
        write_kv[dtype], attend[dtype], prefill_attend[dtype] = w, a, f
    return PagedAttentionLib(head_dim, group, kv_heads, write_kv, attend, prefill_attend)
