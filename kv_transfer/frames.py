"""KV-transfer frames: a msgpack header + raw buffers, one zmq multipart message each. Never pickle.

    part 0   4-byte little-endian crc32 of the header bytes, then the msgpack header
    part 1.. the codec's buffers (sent zero-copy), covered by `crc` in the header

Header (a msgpack map):
    v            protocol version (1)
    transfer_id  binds the prefill and decode legs of one handoff
    request_id   the request (checked against what the decode side expects)
    kind         "kv" | "done" | "abort"
    seq          0, 1, 2, ... per transfer, over every kind: a gap means a lost frame
    kv:    layers [l0, l1), blocks (dst block ids, in order), tokens [t0, t1) of the chunk these
           blocks carry, last (the final frame of that chunk), dtype, shape of the payload tensor
           [layers, blocks, 2, block_size, heads, head_dim], codec, codec_meta, sizes (buffer
           lengths), crc (crc32 over the buffers in order), raw_bytes (uncoded size)
    done:  first_token, num_tokens
    abort: reason
Plus whatever `extra` the session adds (it stamps `t_first`, the sender's wall time of the first
frame, for latency).

A chunk's KV is cut into frames of about `max_frame_bytes` (4 MiB: ZeroMQ is fastest around there):
whole layers are grouped while they fit; a layer bigger than that is split by blocks.
"""
from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack
import torch

from kv_transfer.codecs import DTYPES, Buffer, Codec, dtype_name

VERSION = 1
MAX_FRAME_BYTES = 4 << 20
KINDS = ("kv", "done", "abort")
_CRC = struct.Struct("<I")


class FrameError(ValueError):
    """A frame that cannot be used; `header` is set when the header itself was readable."""

    def __init__(self, message: str, header: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.header = header


class ChecksumError(FrameError):
    """The payload (or header) bytes differ from what the sender checksummed."""


def nbytes(buf: Any) -> int:
    return memoryview(buf).nbytes


def crc32(buffers: list[Buffer]) -> int:
    crc = 0
    for buf in buffers:
        crc = zlib.crc32(buf, crc)
    return crc


def wire_bytes(parts: list[Buffer]) -> int:
    """Bytes of a frame on the wire (header + payload)."""
    return sum(nbytes(p) for p in parts)


def _pack(header: dict[str, Any], buffers: list[Buffer]) -> list[Buffer]:
    body = msgpack.packb(header, use_bin_type=True)
    return [_CRC.pack(zlib.crc32(body)) + body, *buffers]


def frame_plan(num_layers: int, num_blocks: int, block_bytes: int,
               max_frame_bytes: int = MAX_FRAME_BYTES) -> list[tuple[int, int, int, int]]:
    """(l0, l1, b0, b1) slices of a [layers, blocks] KV snapshot, each about max_frame_bytes."""
    if num_layers < 1 or num_blocks < 1:
        raise ValueError(f"nothing to send: {num_layers} layers x {num_blocks} blocks")
    layer_bytes = num_blocks * block_bytes
    if layer_bytes <= max_frame_bytes:
        step = max(1, max_frame_bytes // layer_bytes)
        return [(l0, min(l0 + step, num_layers), 0, num_blocks) for l0 in range(0, num_layers, step)]
    per = max(1, max_frame_bytes // block_bytes)
    return [(layer, layer + 1, b0, min(b0 + per, num_blocks))
            for layer in range(num_layers) for b0 in range(0, num_blocks, per)]


def block_range(token_start: int, token_end: int, block_size: int) -> tuple[int, int]:
    """Indices into a request's block table of the blocks holding tokens [token_start, token_end)."""
    if not 0 <= token_start < token_end:
        raise ValueError(f"bad token range [{token_start}, {token_end})")
    return token_start // block_size, -(-token_end // block_size)


def gather_kv(kv_caches: list[torch.Tensor], src_block_ids: list[int], token_start: int,
              token_end: int, layers: range | None = None) -> tuple[torch.Tensor, int, int]:
    """Snapshot the blocks covering [token_start, token_end) of every layer (a copy, so the cache
    may change afterwards): -> ([layers, blocks, 2, bs, H, D] tensor, b0, b1) with b0:b1 the
    indices into the request's block table."""
    block_size = kv_caches[0].shape[2]
    b0, b1 = block_range(token_start, token_end, block_size)
    if b1 > len(src_block_ids):
        raise ValueError(f"tokens [{token_start}, {token_end}) need {b1} blocks, "
                         f"the source block table has {len(src_block_ids)}")
    layers = range(len(kv_caches)) if layers is None else layers
    first = kv_caches[0]
    idx = torch.tensor(src_block_ids[b0:b1], dtype=torch.long, device=first.device)
    snap = torch.empty((len(layers), b1 - b0, *first.shape[1:]), dtype=first.dtype, device=first.device)
    for i, layer in enumerate(layers):
        torch.index_select(kv_caches[layer], 0, idx, out=snap[i])
    return snap, b0, b1


def encode_frames(transfer_id: str, request_id: str, seq: int, kv: torch.Tensor,
                  dst_block_ids: list[int], token_start: int, token_end: int, codec: Codec,
                  layer_offset: int = 0, max_frame_bytes: int = MAX_FRAME_BYTES,
                  extra: dict[str, Any] | None = None) -> list[list[Buffer]]:
    """Frames (each a list of parts) carrying `kv` = [layers, blocks, 2, bs, H, D] into the decode
    side's `dst_block_ids` (one per block of `kv`), layers from `layer_offset`; seq numbers
    `seq, seq + 1, ...`."""
    if kv.dim() != 6 or kv.shape[2] != 2:
        raise ValueError(f"kv must be [layers, blocks, 2, block_size, heads, head_dim], got {tuple(kv.shape)}")
    num_layers, num_blocks = kv.shape[0], kv.shape[1]
    if len(dst_block_ids) != num_blocks:
        raise ValueError(f"{len(dst_block_ids)} dst block ids for {num_blocks} blocks")
    block_bytes = kv[0, 0].numel() * kv.element_size()
    plan = frame_plan(num_layers, num_blocks, block_bytes, max_frame_bytes)
    frames = []
    for i, (l0, l1, b0, b1) in enumerate(plan):
        part = kv[l0:l1, b0:b1].contiguous()
        meta, buffers = codec.encode(part)
        header = {
            "v": VERSION, "transfer_id": transfer_id, "request_id": request_id, "kind": "kv",
            "seq": seq + i, "layers": [layer_offset + l0, layer_offset + l1],
            "blocks": [int(b) for b in dst_block_ids[b0:b1]], "tokens": [token_start, token_end],
            "last": i == len(plan) - 1, "dtype": dtype_name(kv.dtype), "shape": list(part.shape),
            "codec": codec.name, "codec_meta": meta, "sizes": [nbytes(b) for b in buffers],
            "crc": crc32(buffers), "raw_bytes": part.numel() * part.element_size(),
            **(extra or {}),
        }
        frames.append(_pack(header, buffers))
    return frames


def control_frame(transfer_id: str, request_id: str, kind: str, seq: int, *,
                  first_token: int | None = None, num_tokens: int | None = None,
                  reason: str | None = None, extra: dict[str, Any] | None = None) -> list[Buffer]:
    """A "done" (first_token, num_tokens) or "abort" (reason) frame: header only."""
    if kind == "done":
        if first_token is None or num_tokens is None:
            raise ValueError("a done frame needs first_token and num_tokens")
        body = {"first_token": int(first_token), "num_tokens": int(num_tokens)}
    elif kind == "abort":
        body = {"reason": reason or "aborted"}
    else:
        raise ValueError(f"control frame kind must be done or abort, got {kind!r}")
    header = {"v": VERSION, "transfer_id": transfer_id, "request_id": request_id, "kind": kind,
              "seq": seq, "sizes": [], "crc": 0, **body, **(extra or {})}
    return _pack(header, [])


def decode_frame(parts: list[Buffer]) -> tuple[dict[str, Any], list[Buffer]]:
    """-> (header, payload buffers); raises FrameError / ChecksumError (with .header if readable)."""
    if not parts:
        raise FrameError("empty frame")
    first = memoryview(parts[0])
    if first.nbytes < _CRC.size:
        raise FrameError(f"frame header too short ({first.nbytes} bytes)")
    (want,) = _CRC.unpack_from(first)
    body = first[_CRC.size:]
    if zlib.crc32(body) != want:
        raise ChecksumError("frame header checksum mismatch (corrupted header)")
    try:
        header = msgpack.unpackb(body, raw=False)
    except Exception as e:  # noqa: BLE001 - any unpack failure is a bad frame
        raise FrameError(f"frame header is not msgpack: {e}") from e
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise FrameError(f"unsupported frame (version {header.get('v') if isinstance(header, dict) else '?'}, "
                         f"expected {VERSION})")
    if header.get("kind") not in KINDS or not isinstance(header.get("seq"), int):
        raise FrameError(f"bad frame kind/seq: {header.get('kind')!r}/{header.get('seq')!r}", header)
    buffers = list(parts[1:])
    sizes = header.get("sizes", [])
    if [nbytes(b) for b in buffers] != list(sizes):
        raise FrameError(f"payload sizes {[nbytes(b) for b in buffers]} differ from the header's {sizes}",
                         header)
    if crc32(buffers) != header.get("crc"):
        raise ChecksumError(
            f"payload checksum mismatch in frame seq {header['seq']} of transfer "
            f"{header.get('transfer_id')!r} (corrupted in transit)", header)
    if header["kind"] == "kv" and header.get("dtype") not in DTYPES:
        raise FrameError(f"unsupported dtype {header.get('dtype')!r}", header)
    return header, buffers
