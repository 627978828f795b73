"""`tandem bench-kv`: KV handoff bandwidth per codec and transport versus raw ZeroMQ.

A receiver process (the decode side: a KVReceiver writing into its own paged cache) and this
process (the prefill side: a KVSender) move one prompt's KV, chunk by chunk, end to end:
first send_chunk (snapshot + encode + send) -> every frame decoded and written into the receiver's
blocks -> done seen by the receiver. Bandwidth is raw KV bytes over that time. The baseline moves
the same number of bytes as ~4 MiB ZeroMQ messages with no encode, decode or cache write.
Lossy codecs also get compression ratio and error versus the original KV.

    tandem bench-kv [--tokens 2048] [--dtype float32] [--codecs raw lz4 int8 fp8]
                    [--transports ipc tcp gloo] [--source random|model]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

from bench.server import free_port

CHUNK_BYTES = 4 << 20


# -- the decode side (child process) -------------------------------------------------------------
def _receiver_main(conn, kind: str, address: str, port: int, cache_shape: tuple, dtype_name: str,
                   num_layers: int) -> None:
    import torch

    from kv_transfer import KVReceiver, TransferState, make_transport

    torch.set_num_threads(1)
    if kind == "gloo":
        from kv_transfer.torch_transport import init_process_group

        init_process_group(1, 2, port, backend="gloo", timeout_s=120)
        transport = make_transport("torch", "receiver", peer=0)
    else:
        transport = make_transport("zmq", "receiver", address=address)
    conn.send(("ready", getattr(transport, "address", None)))
    receiver = KVReceiver(transport, default_timeout_s=120, max_frames_per_poll=1024)
    caches = [torch.zeros(cache_shape, dtype=getattr(torch, dtype_name)) for _ in range(num_layers)]
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            break
        if cmd[0] == "raw":  # count bytes of plain messages, touch nothing
            want, got = cmd[1], 0
            while got < want:
                parts = transport.recv(60)
                if parts is None:
                    break
                got += sum(memoryview(p).nbytes for p in parts)
            conn.send(("raw", got))
            continue
        _, tid, dst_ids, num_tokens = cmd
        receiver.expect(tid, tid, dst_ids, num_tokens, timeout_s=120)
        events: list = []
        while not events:
            events = receiver.poll(caches)
            if not events:
                time.sleep(0.0002)
        ev = events[0]
        conn.send(("kv", ev.state == TransferState.DONE, ev.error, ev.wire_bytes, ev.raw_bytes))
    transport.close()


class _Peer:
    """A receiver process and the matching sender transport in this process."""

    def __init__(self, kind: str, cache_shape: tuple, dtype_name: str, num_layers: int) -> None:
        from kv_transfer import make_transport

        self.kind = kind
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        port = free_port()
        address = {"ipc": f"ipc://{tempfile.gettempdir()}/tandem-bench-kv-{os.getpid()}.sock",
                   "tcp": "tcp://127.0.0.1:0"}.get(kind, "")
        self.proc = ctx.Process(target=_receiver_main, daemon=True,
                                args=(child, kind, address, port, cache_shape, dtype_name, num_layers))
        self.proc.start()
        if kind == "gloo":
            from kv_transfer.torch_transport import init_process_group

            init_process_group(0, 2, port, backend="gloo", timeout_s=120)
        if not self.conn.poll(120):
            raise RuntimeError(f"the {kind} receiver process did not start")
        _, bound = self.conn.recv()
        if kind == "gloo":
            self.transport = make_transport("torch", "sender", peer=1)
        else:
            self.transport = make_transport("zmq", "sender", address=bound)

    def reply(self, timeout_s: float = 300):
        if not self.conn.poll(timeout_s):
            raise RuntimeError(f"no reply from the {self.kind} receiver in {timeout_s}s")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(("stop",))
        if self.kind == "gloo":
            self.transport.close()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
        if self.kind != "gloo":
            self.transport.close()


# -- data ------------------------------------------------------------------------------------------
def make_kv(args: argparse.Namespace):
    """-> (per-layer caches, src block ids). random: normal values with per-head scales (like K/V);
    model: the real KV of a prompt prefilled by the engine (SmolLM2 by default)."""
    import torch

    dtype = getattr(torch, args.dtype)
    nblocks = -(-args.tokens // args.block_size)
    if args.source == "random":
        g = torch.Generator().manual_seed(0)
        shape = (nblocks, 2, args.block_size, args.kv_heads, args.head_dim)
        caches = []
        for _ in range(args.layers):
            scale = torch.rand(args.kv_heads, 1, generator=g) * 4 + 0.5
            caches.append((torch.randn(shape, generator=g) * scale).to(dtype))
        return caches, list(range(nblocks))
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.weights import resolve_model
    from scheduler.config import SchedulerConfig
    from scheduler.request import SamplingParams

    cfg = EngineConfig(model_dir=str(resolve_model(args.model)), dtype=args.dtype, threads=2,
                       num_kv_blocks=nblocks + 8,
                       scheduler=SchedulerConfig(token_budget=512, max_model_len=args.tokens + 64))
    engine = EngineCore(cfg)
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    ids = (engine.tokenizer.encode(text) * (args.tokens // 100 + 1))[: args.tokens]
    engine.add_request("kv", ids, SamplingParams(max_tokens=1, temperature=0.0))
    while engine.has_work():
        engine.step()
    # A fresh engine hands out blocks 0, 1, 2, ... and leaves their contents after the request ends.
    return [c[:nblocks].clone() for c in engine.runner.kv_caches], list(range(nblocks))


def codec_quality(name: str, caches) -> dict:
    """Ratio, encode/decode GiB/s (one thread, ~4 MiB pieces), max abs error and error/absmax."""
    import torch

    from kv_transfer.codecs import get_codec

    codec = get_codec(name)
    raw = wire = 0
    t_enc = t_dec = 0.0
    max_err = max_rel = 0.0
    per_layer = caches[0].numel() * caches[0].element_size()
    group = max(1, CHUNK_BYTES // per_layer)
    for l0 in range(0, len(caches), group):
        x = torch.stack(caches[l0:l0 + group])
        t = time.perf_counter()
        meta, bufs = codec.encode(x)
        t_enc += time.perf_counter() - t
        out = torch.empty_like(x)
        t = time.perf_counter()
        codec.decode(meta, bufs, out)
        t_dec += time.perf_counter() - t
        raw += x.numel() * x.element_size()
        wire += sum(memoryview(b).nbytes for b in bufs)
        if not codec.lossless:
            xf, err = x.float(), (out.float() - x.float()).abs()
            absmax = xf.abs().amax(dim=(-3, -1), keepdim=True).clamp_min(1e-30)
            max_err = max(max_err, err.max().item())
            max_rel = max(max_rel, (err / absmax).max().item())
    return {"ratio": raw / wire, "enc": raw / t_enc / 2**30, "dec": raw / t_dec / 2**30,
            "max_err": max_err, "max_rel": max_rel}


# -- measurements -----------------------------------------------------------------------------------
def time_handoff(peer: _Peer, codec: str, caches, src_ids, args, rep: int) -> tuple[float, int, int]:
    from kv_transfer import KVSender

    nblocks = len(src_ids)
    dst_ids = list(range(nblocks + 7, 6, -1))[:nblocks]  # different ids, reversed order
    tid = f"{codec}-{rep}"
    sender = KVSender(peer.transport, codec, max_frame_bytes=args.frame_mib << 20, timeout_s=300)
    peer.conn.send(("kv", tid, dst_ids, args.tokens))
    time.sleep(0.05)  # the receiver has called expect() before the first frame
    start = time.perf_counter()
    for t0 in range(0, args.tokens, args.chunk_tokens):
        t1 = min(args.tokens, t0 + args.chunk_tokens)
        sender.send_chunk(tid, tid, caches, src_ids, dst_ids, t0, t1)
    sender.send_done(tid, tid, 0, args.tokens)
    _, ok, error, wire, raw = peer.reply()
    elapsed = time.perf_counter() - start
    sender.close(30, close_transport=False)  # the transport serves the next run
    if not ok:
        raise RuntimeError(f"{codec} transfer failed: {error}")
    return elapsed, wire, raw


def time_raw_zmq(peer: _Peer, nbytes: int) -> float:
    payload = memoryview(bytearray(os.urandom(1 << 20)) * (nbytes // (1 << 20) + 1))[:nbytes]
    peer.conn.send(("raw", nbytes))
    time.sleep(0.05)
    start = time.perf_counter()
    for off in range(0, nbytes, CHUNK_BYTES):
        peer.transport.send([payload[off:off + CHUNK_BYTES]])
    kind, got = peer.reply()
    elapsed = time.perf_counter() - start
    if got < nbytes:
        raise RuntimeError(f"raw transfer moved {got} of {nbytes} bytes")
    return elapsed


def main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    caches, src_ids = make_kv(args)
    args.layers, args.kv_heads, args.head_dim = len(caches), caches[0].shape[3], caches[0].shape[4]
    args.block_size = caches[0].shape[2]
    raw_total = sum(c.numel() * c.element_size() for c in caches)
    print(f"KV of a {args.tokens}-token prompt ({args.source}): {args.layers} layers x "
          f"{args.kv_heads} KV heads x head_dim {args.head_dim}, block {args.block_size}, "
          f"{args.dtype} = {raw_total / 2**20:.1f} MiB; chunks of {args.chunk_tokens} tokens, "
          f"~{args.frame_mib} MiB frames; median of {args.repeats}; {os.cpu_count()} CPUs")
    quality = {c: codec_quality(c, caches) for c in args.codecs}
    rows: dict[str, dict[str, float]] = {c: {} for c in ["zmq raw bytes", *args.codecs]}
    for kind in args.transports:
        shape = (len(src_ids) + 8, *caches[0].shape[1:])
        peer = _Peer(kind, shape, args.dtype, args.layers)
        try:
            if kind != "gloo":  # the first run of each cell warms up and is not counted
                times = [time_raw_zmq(peer, raw_total) for _ in range(args.repeats + 1)][1:]
                rows["zmq raw bytes"][kind] = raw_total / statistics.median(times) / 2**30
            for codec in args.codecs:
                times = [time_handoff(peer, codec, caches, src_ids, args, r)[0]
                         for r in range(args.repeats + 1)][1:]
                rows[codec][kind] = raw_total / statistics.median(times) / 2**30
        finally:
            peer.close()
    cols = list(args.transports)
    print(f"\n{'path':<14}" + "".join(f"{k + ' GiB/s':>12}" for k in cols)
          + f"{'ratio':>8}{'enc GiB/s':>11}{'dec GiB/s':>11}{'max |err|':>11}{'err/absmax':>12}")
    for name, bw in rows.items():
        q = quality.get(name)
        line = f"{name:<14}" + "".join(f"{bw[k]:>12.2f}" if k in bw else f"{'-':>12}" for k in cols)
        if q:
            line += f"{q['ratio']:>8.3f}{q['enc']:>11.2f}{q['dec']:>11.2f}"
            line += f"{q['max_err']:>11.4g}{q['max_rel']:>12.4g}" if q["max_rel"] else f"{'0':>11}{'0':>12}"
        print(line)
    print("GiB/s = raw KV bytes / (first send_chunk -> receiver wrote every block and saw done); "
          "enc/dec: one thread, raw bytes per second; err/absmax: worst error over its "
          "(block, K|V, head) absmax.")


def add_parser(sub) -> None:
    p = sub.add_parser("bench-kv", help="KV handoff bandwidth per codec/transport vs raw ZeroMQ.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="Prompt tokens whose KV moves (default 2048).")
    p.add_argument("--chunk-tokens", type=int, default=512, help="Tokens per prefill chunk (default 512).")
    p.add_argument("--layers", type=int, default=30, help="random source: layers (SmolLM2: 30).")
    p.add_argument("--kv-heads", type=int, default=3, help="random source: KV heads (SmolLM2: 3).")
    p.add_argument("--head-dim", type=int, default=64, help="random source: head dim (SmolLM2: 64).")
    p.add_argument("--block-size", type=int, default=16, help="random source: tokens per block.")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--codecs", nargs="+", default=["raw", "lz4", "int8", "fp8"],
                   choices=["raw", "lz4", "lz4-plain", "int8", "fp8"])
    p.add_argument("--transports", nargs="+", default=["ipc", "tcp"], choices=["ipc", "tcp", "gloo"])
    p.add_argument("--source", choices=["random", "model"], default="random",
                   help="KV data: random normal (default) or a real prefill of --model (slow: ~20 s).")
    p.add_argument("--model", default=None, help="model source: model dir/GGUF (default SmolLM2).")
    p.add_argument("--frame-mib", type=int, default=4, help="Frame payload size in MiB (default 4).")
    p.add_argument("--repeats", type=int, default=5, help="Runs per cell; the median is shown.")
    p.set_defaults(func=main)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench-kv")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    ns = parser.parse_args()
    ns.func(ns)
