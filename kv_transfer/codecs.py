"""KV codecs: tensor <-> (msgpack-able meta, raw buffers). No pickle, no copies we can avoid.

A codec sees a contiguous tensor whose last three dims are `[block_size, num_kv_heads, head_dim]`
(a frame's KV: `[layers, blocks, 2, block_size, heads, head_dim]`) and decodes into a tensor of the
same shape and dtype, in place.

    raw   the bytes as they are (bf16 goes through a uint8 view: numpy has no bf16)
    lz4   lossless: element bytes split into byte planes (all high bytes, then the next, ...),
          each plane lz4-compressed unless a sample of it shows it will not shrink (the low
          mantissa bytes of floats are noise; compressing them costs time for ~0.3%)
    int8  lossy: symmetric, one fp32 scale per (block, K|V, head) = absmax over (tokens, head_dim)
    fp8   lossy: float8 e4m3 with the same per-(block, K|V, head) scale mapping absmax to 448
"""
from __future__ import annotations

from typing import Any, Protocol

import lz4.block
import numpy as np
import torch

Buffer = memoryview | bytes | bytearray

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}; expected one of {sorted(DTYPES)}")


class CodecError(ValueError):
    """A payload that does not decode into the given tensor."""


class Codec(Protocol):
    name: str
    lossless: bool

    def encode(self, t: torch.Tensor) -> tuple[dict[str, Any], list[Buffer]]: ...

    def decode(self, meta: dict[str, Any], buffers: list[Buffer], out: torch.Tensor) -> None: ...


# -- byte helpers -----------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a tensor's bytes (copied to a contiguous CPU tensor if needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().view(torch.uint8).numpy().reshape(-1)


def write_bytes(out: torch.Tensor, data: np.ndarray | Buffer) -> None:
    """Copy raw bytes into `out` (any dtype/device) without torch warnings about read-only buffers."""
    src = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    nbytes = out.numel() * out.element_size()
    if src.size != nbytes:
        raise CodecError(f"payload has {src.size} bytes, the tensor needs {nbytes}")
    if out.device.type == "cpu" and out.is_contiguous():
        out.view(torch.uint8).numpy().reshape(-1)[:] = src
        return
    staging = torch.empty(out.shape, dtype=out.dtype)
    staging.view(torch.uint8).numpy().reshape(-1)[:] = src
    out.copy_(staging)


def _block_view(t: torch.Tensor) -> torch.Tensor:
    """[..., block_size, heads, head_dim] -> [N, block_size, heads, head_dim]."""
    if t.dim() < 3:
        raise CodecError(f"a KV tensor needs at least 3 dims (tokens, heads, head_dim), got {tuple(t.shape)}")
    return t.reshape(-1, *t.shape[-3:])


# -- codecs -----------------------------------------------------------------------------------
class RawCodec:
    name = "raw"
    lossless = True

    def encode(self, t: torch.Tensor) -> tuple[dict[str, Any], list[Buffer]]:
        return {}, [memoryview(tensor_bytes(t))]

    def decode(self, meta: dict[str, Any], buffers: list[Buffer], out: torch.Tensor) -> None:
        if len(buffers) != 1:
            raise CodecError(f"raw payload has {len(buffers)} buffers, expected 1")
        write_bytes(out, buffers[0])


class LZ4Codec:
    """Byte-plane shuffle + lz4 per plane (`shuffle=False`: plain lz4 of the bytes, for comparison)."""

    name = "lz4"
    lossless = True
    SAMPLE = 64 * 1024
    MIN_GAIN = 0.97
    """A plane is compressed only if lz4 shrinks a sample of it below this share of its size."""

    def __init__(self, shuffle: bool = True, acceleration: int = 1) -> None:
        self.shuffle = shuffle
        self.acceleration = acceleration

    def _compress(self, plane: np.ndarray) -> tuple[str, Buffer]:
        sample = plane[: self.SAMPLE]
        if sample.size and len(lz4.block.compress(sample, store_size=False,
                                                   acceleration=self.acceleration)) > self.MIN_GAIN * sample.size:
            return "raw", memoryview(plane)
        packed = lz4.block.compress(plane, store_size=False, acceleration=self.acceleration)
        if len(packed) >= plane.size:
            return "raw", memoryview(plane)
        return "lz4", packed

    def encode(self, t: torch.Tensor) -> tuple[dict[str, Any], list[Buffer]]:
        data = tensor_bytes(t)
        width = t.element_size() if self.shuffle else 1
        planes = data.reshape(-1, width).T.copy() if width > 1 else data.reshape(1, -1)
        kinds, sizes, buffers = [], [], []
        for plane in planes:
            kind, buf = self._compress(plane)
            kinds.append(kind)
            sizes.append(int(plane.size))
            buffers.append(buf)
        return {"width": width, "planes": kinds, "sizes": sizes}, buffers

    def decode(self, meta: dict[str, Any], buffers: list[Buffer], out: torch.Tensor) -> None:
        width, kinds, sizes = int(meta["width"]), meta["planes"], meta["sizes"]
        if len(buffers) != len(kinds) or len(kinds) != width:
            raise CodecError(f"lz4 payload has {len(buffers)} buffers for {width} planes")
        nbytes = out.numel() * out.element_size()
        if sum(sizes) != nbytes:
            raise CodecError(f"lz4 planes hold {sum(sizes)} bytes, the tensor needs {nbytes}")
        planes = np.empty((width, nbytes // width), dtype=np.uint8)
        for i, (kind, size, buf) in enumerate(zip(kinds, sizes, buffers)):
            if kind == "lz4":
                try:
                    raw = lz4.block.decompress(buf, uncompressed_size=size)
                except lz4.block.LZ4BlockError as e:
                    raise CodecError(f"lz4 plane {i} does not decompress: {e}") from e
                planes[i] = np.frombuffer(raw, dtype=np.uint8)
            else:
                planes[i] = np.frombuffer(buf, dtype=np.uint8)
        write_bytes(out, planes.T.reshape(-1) if width > 1 else planes.reshape(-1))


class _ScaledCodec:
    """Shared by int8/fp8: q = x / scale per (block row, head); x' = q * scale."""

    lossless = False
    qmax: float
    wire_dtype: torch.dtype

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, t: torch.Tensor) -> tuple[dict[str, Any], list[Buffer]]:
        x = _block_view(t.detach().cpu()).float()                  # [N, bs, H, D]
        absmax = x.abs().amax(dim=(1, 3), keepdim=True)             # [N, 1, H, 1]
        scale = torch.where(absmax > 0, absmax / self.qmax, torch.ones_like(absmax))
        q = self._quantize(x / scale)
        return ({"scale_dtype": "float32"},
                [memoryview(tensor_bytes(q)), memoryview(tensor_bytes(scale.reshape(-1)))])

    def decode(self, meta: dict[str, Any], buffers: list[Buffer], out: torch.Tensor) -> None:
        if len(buffers) != 2:
            raise CodecError(f"{self.name} payload has {len(buffers)} buffers, expected 2")
        shape = _block_view(out).shape
        q = torch.empty(shape, dtype=self.wire_dtype)
        write_bytes(q, buffers[0])
        scale = torch.empty((shape[0], 1, shape[2], 1), dtype=torch.float32)
        write_bytes(scale, buffers[1])
        x = q.float().mul_(scale)
        out.copy_(x.view(out.shape))


class Int8Codec(_ScaledCodec):
    name = "int8"
    qmax = 127.0
    wire_dtype = torch.int8

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x.round_().clamp_(-127, 127).to(torch.int8)


class FP8Codec(_ScaledCodec):
    name = "fp8"
    qmax = 448.0  # largest finite float8_e4m3fn
    wire_dtype = torch.float8_e4m3fn

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)


CODECS = ("raw", "lz4", "int8", "fp8")


def get_codec(name: str | Codec) -> Codec:
    """A codec by name (`raw`, `lz4`, `lz4-plain`, `int8`, `fp8`); a Codec instance is returned as is."""
    if not isinstance(name, str):
        return name
    if name == "raw":
        return RawCodec()
    if name == "lz4":
        return LZ4Codec()
    if name == "lz4-plain":
        return LZ4Codec(shuffle=False)
    if name == "int8":
        return Int8Codec()
    if name == "fp8":
        return FP8Codec()
    raise ValueError(f"unknown KV codec {name!r}; choose from {CODECS}")
