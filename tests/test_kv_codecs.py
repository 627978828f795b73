"""KV codecs (raw, lz4, int8, fp8) and transfer frames (header, checksum, ~4 MiB chunking)."""
from __future__ import annotations

import pytest
import torch

from kv_transfer.codecs import CodecError, get_codec
from kv_transfer.frames import (MAX_FRAME_BYTES, ChecksumError, FrameError, control_frame,
                                decode_frame, encode_frames, frame_plan, gather_kv, wire_bytes)

torch.set_num_threads(1)


def kv_like(shape=(4, 8, 2, 16, 3, 64), dtype=torch.float32, seed=0) -> torch.Tensor:
    """Deterministic KV-like data: normal values with per-head scales, like real K/V rows."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[-2], 1, generator=g) * 4 + 0.5
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def roundtrip(codec_name: str, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    codec = get_codec(codec_name)
    meta, buffers = codec.encode(x)
    out = torch.empty_like(x)
    codec.decode(meta, buffers, out)
    return out, sum(memoryview(b).nbytes for b in buffers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["raw", "lz4", "lz4-plain"])
def test_lossless_codecs_are_bit_exact(name, dtype):
    x = kv_like(dtype=dtype)
    out, _ = roundtrip(name, x)
    assert torch.equal(out.view(torch.uint8), x.view(torch.uint8))
    assert get_codec(name).lossless


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lz4_byte_planes_compress_better_than_plain(dtype):
    x = kv_like(shape=(2, 32, 2, 16, 3, 64), dtype=dtype)
    raw = x.numel() * x.element_size()
    _, plain = roundtrip("lz4-plain", x)
    _, planes = roundtrip("lz4", x)
    assert raw / plain < 1.02            # plain lz4 barely touches float bytes
    assert raw / planes > raw / plain + 0.04, (raw / plain, raw / planes)


def test_lz4_partly_empty_blocks_compress_well():
    x = kv_like()
    x[:, -1, :, 4:] = 0  # a partly filled last block
    out, size = roundtrip("lz4", x)
    assert torch.equal(out, x)
    assert size < 0.9 * x.numel() * x.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,bound,ratio", [("int8", 1 / 254, 3.9), ("fp8", 1 / 16, 3.9)])
def test_lossy_codecs_error_is_bounded_per_block_and_head(name, bound, ratio, dtype):
    x = kv_like(dtype=dtype)
    out, size = roundtrip(name, x)
    rows = x.float().reshape(-1, *x.shape[-3:])
    err = (out.float() - x.float()).abs().reshape(rows.shape)
    absmax = rows.abs().amax(dim=(1, 3), keepdim=True)
    # Quantization error <= bound * absmax of its (block, K|V, head); bf16 output adds its rounding.
    slack = rows.abs() * (2 ** -8 if dtype == torch.bfloat16 else 0)
    assert (err <= bound * absmax + slack + 1e-6).all()
    assert not get_codec(name).lossless
    # One byte per element plus one fp32 scale per (block, K|V, head).
    raw = x.numel() * x.element_size()
    assert raw / size > ratio * x.element_size() / 4


def test_lossy_codecs_handle_all_zero_blocks():
    x = torch.zeros(2, 2, 2, 16, 3, 64)
    for name in ("int8", "fp8"):
        out, _ = roundtrip(name, x)
        assert torch.equal(out, x)


def test_codec_rejects_wrong_sizes_and_names():
    x = kv_like()
    meta, buffers = get_codec("raw").encode(x)
    with pytest.raises(CodecError):
        get_codec("raw").decode(meta, buffers, torch.empty(3, 16, 3, 64))
    with pytest.raises(ValueError, match="unknown KV codec"):
        get_codec("zip")


# -- frames ---------------------------------------------------------------------------------------
def make_caches(num_layers=3, num_blocks=10, dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    return [kv_like((num_blocks, 2, 16, 3, 64), dtype, seed + i) for i in range(num_layers)]


def test_header_fields_survive_and_payload_decodes():
    caches = make_caches()
    snap, b0, b1 = gather_kv(caches, [4, 1, 7, 2], 10, 40)
    assert (b0, b1) == (0, 3) and snap.shape == (3, 3, 2, 16, 3, 64)
    frames = encode_frames("t1", "req-1", 5, snap, [9, 8, 6], 10, 40, get_codec("raw"),
                           extra={"t_first": 1.5})
    assert len(frames) == 1
    header, buffers = decode_frame(frames[0])
    assert header["transfer_id"] == "t1" and header["request_id"] == "req-1"
    assert header["kind"] == "kv" and header["seq"] == 5 and header["last"] is True
    assert header["layers"] == [0, 3] and header["blocks"] == [9, 8, 6]
    assert header["tokens"] == [10, 40] and header["dtype"] == "float32"
    assert header["shape"] == [3, 3, 2, 16, 3, 64] and header["codec"] == "raw"
    assert header["raw_bytes"] == snap.numel() * 4 and header["t_first"] == 1.5
    out = torch.empty(header["shape"])
    get_codec("raw").decode(header["codec_meta"], buffers, out)
    for layer in range(3):
        assert torch.equal(out[layer], caches[layer][[4, 1, 7]])

    done = decode_frame(control_frame("t1", "req-1", "done", 6, first_token=42, num_tokens=40))[0]
    assert (done["kind"], done["first_token"], done["num_tokens"], done["seq"]) == ("done", 42, 40, 6)
    abort = decode_frame(control_frame("t1", "req-1", "abort", 7, reason="oom"))[0]
    assert abort["kind"] == "abort" and abort["reason"] == "oom"


def test_checksum_mismatch_is_detected():
    caches = make_caches()
    snap, _, _ = gather_kv(caches, [0, 1], 0, 32)
    parts = encode_frames("t", "r", 0, snap, [0, 1], 0, 32, get_codec("lz4"))[0]
    bad_payload = [parts[0], *[bytes(memoryview(p)) for p in parts[1:]]]
    data = bytearray(bad_payload[-1])
    data[len(data) // 3] ^= 0x01
    bad_payload[-1] = bytes(data)
    with pytest.raises(ChecksumError, match="payload checksum mismatch") as info:
        decode_frame(bad_payload)
    assert info.value.header["transfer_id"] == "t"   # the receiver can fail that transfer

    header = bytearray(parts[0])
    header[-1] ^= 0x01
    with pytest.raises(ChecksumError, match="header"):
        decode_frame([bytes(header), *parts[1:]])
    with pytest.raises(FrameError, match="sizes"):
        decode_frame(parts[:1])


def test_frames_are_chunked_near_4mib():
    # SmolLM2-like: 30 layers x 3 heads x 64 dims, 128 blocks (2k tokens) fp32 = 3 MiB per layer.
    per_block = 2 * 16 * 3 * 64 * 4
    plan = frame_plan(30, 128, per_block)
    assert len(plan) == 30 and all(l1 - l0 == 1 for l0, l1, _, _ in plan)
    # Small chunks: layers are grouped until a frame holds ~4 MiB.
    plan = frame_plan(30, 16, per_block)
    sizes = [(l1 - l0) * (b1 - b0) * per_block for l0, l1, b0, b1 in plan]
    assert max(sizes) <= MAX_FRAME_BYTES and min(sizes[:-1]) > MAX_FRAME_BYTES * 0.75
    assert sum(l1 - l0 for l0, l1, _, _ in plan) == 30
    # A layer bigger than a frame is split by blocks.
    plan = frame_plan(2, 400, per_block)
    assert all(l1 - l0 == 1 for l0, l1, _, _ in plan)
    assert sum(b1 - b0 for _, _, b0, b1 in plan) == 800
    assert max((b1 - b0) * per_block for _, _, b0, b1 in plan) <= MAX_FRAME_BYTES


def test_encoded_frames_cover_every_layer_and_block_once():
    caches = make_caches(num_layers=5, num_blocks=12)
    src, dst = list(range(12)), list(range(100, 112))
    snap, b0, b1 = gather_kv(caches, src, 0, 12 * 16)
    per_block = snap[0, 0].numel() * 4
    frames = encode_frames("t", "r", 0, snap, dst[b0:b1], 0, 192, get_codec("raw"),
                           max_frame_bytes=5 * per_block)
    seen = set()
    for i, parts in enumerate(frames):
        h, _ = decode_frame(parts)
        assert h["seq"] == i and h["last"] == (i == len(frames) - 1)
        assert h["raw_bytes"] <= 5 * per_block
        seen |= {(layer, b) for layer in range(*h["layers"]) for b in h["blocks"]}
        assert wire_bytes(parts) > h["raw_bytes"]
    assert seen == {(layer, b) for layer in range(5) for b in dst}


def test_every_codec_name_list_is_the_codecs_module():
    """The spec and both CLIs take their codec and transport names from cluster/spec.py (torch-
    free), and the simulator prices each codec: all must name exactly what kv_transfer has."""
    from cluster.spec import KV_CODECS, KV_TRANSPORTS
    from kv_transfer.codecs import CODECS
    from kv_transfer.transport import TRANSPORTS
    from sim.cluster import CODEC_RATIO

    assert set(KV_CODECS) == set(CODECS) == set(CODEC_RATIO)
    assert set(KV_TRANSPORTS) == set(TRANSPORTS) - {"fake"}
