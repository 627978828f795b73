"""KV-cache handoff from prefill replicas to decode replicas: codecs, frames, transports and the
sender/receiver state machines. docs/design.md ("KV transfer protocol") describes the protocol.

    receiver = KVReceiver(make_transport("zmq", "receiver", address="tcp://127.0.0.1:0"))
    sender = KVSender(make_transport("zmq", "sender", address=receiver.transport.address), "lz4")
    receiver.expect(tid, rid, dst_block_ids, num_tokens, timeout_s=30)   # decode side allocated
    sender.send_chunk(tid, rid, kv_caches, src_block_ids, dst_block_ids, t0, t1)   # per chunk
    sender.send_done(tid, rid, first_token, num_tokens)
    events = receiver.poll(kv_caches)   # each engine step; DONE -> admit as computed, FAILED -> recompute
"""
from kv_transfer.codecs import CODECS, Codec, CodecError, get_codec
from kv_transfer.frames import MAX_FRAME_BYTES, ChecksumError, FrameError, decode_frame, encode_frames
from kv_transfer.sender import KVSender
from kv_transfer.session import KVReceiver, TransferEvent, TransferMetrics, TransferState
from kv_transfer.transport import (TRANSPORTS, FakeLink, FakeTransport, Transport, TransportError,
                                   ZmqTransport, make_transport)

__all__ = [
    "CODECS", "Codec", "CodecError", "get_codec", "MAX_FRAME_BYTES", "ChecksumError", "FrameError",
    "decode_frame", "encode_frames", "KVSender", "KVReceiver", "TransferEvent", "TransferMetrics",
    "TransferState", "TRANSPORTS", "FakeLink", "FakeTransport", "Transport", "TransportError",
    "ZmqTransport", "make_transport",
]
