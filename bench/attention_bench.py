"""Paged attention on CPU: the kernels Tandem uses against the alternatives it measured.

    tandem bench-attention [--dtype bfloat16] [--context 512] [--repeats 50]

Per step shape, ms for one layer (SmolLM2's 9 query heads, 3 KV heads, head dim 64 by default):
- native: `tandem::paged_attention` with the C kernels (writes the step's K/V into the paged cache,
  attends from the blocks in place) -- what the engine runs;
- gather + SDPA: the same op's torch fallback (gathers each sequence's blocks, then SDPA);
- flex_attention: torch.compile'd `flex_attention` with a per-sequence causal block mask, given K/V
  already gathered into one contiguous run (its best case: the gather is not timed).
"""
from __future__ import annotations

import argparse
import time

BLOCK = 16

STEPS = {
    "decode 8 seqs": lambda ctx: [(1, ctx)] * 8,
    "decode 32 seqs": lambda ctx: [(1, ctx)] * 32,
    "8 decodes + 128-row chunk": lambda ctx: [(1, ctx)] * 8 + [(min(128, ctx), ctx)],
}


def random_paged_step(seq_shapes, heads, kv_heads, head_dim, dtype, seed=0, short_rows=16, block=BLOCK):
    """Random paged cache and queries for `tandem::paged_attention`. seq_shapes: (rows this step,
    KV length) per sequence, runs of at most `short_rows` rows first (they go to the decode kernel).
    Returns the op's inputs and (seqs, tables): per sequence (first row, rows, KV length) and its
    blocks, for a reference computation."""
    import torch  # noqa: PLC0415 - the CLI imports this module without loading torch

    g = torch.Generator().manual_seed(seed)
    pages = [-(-kv // block) for _, kv in seq_shapes]
    num_blocks = sum(pages) + 3
    cache = torch.randn(num_blocks, 2, block, kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, seqs, slots, first = [], [], [], 0
    for (rows, kv), n in zip(seq_shapes, pages):
        tables.append(order[:n])
        order = order[n:]
        seqs.append((first, rows, kv))
        slots += [tables[-1][p // block] * block + p % block for p in range(kv - rows, kv)]
        first += rows
    q = torch.randn(first, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(first, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(first, kv_heads, head_dim, generator=g).to(dtype)
    seq_info = torch.zeros(len(seqs) + 2, 3, dtype=torch.int32)   # padded, as the runner's buffers
    seq_info[:len(seqs)] = torch.tensor(seqs, dtype=torch.int32)
    table = torch.zeros(len(seqs) + 2, max(pages) + 1, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, :len(t)] = torch.tensor(t)
    num_short = sum(rows <= short_rows for rows, _ in seq_shapes)
    counts = torch.tensor([num_short, len(seqs)], dtype=torch.int32)
    return (q, k, v, cache, torch.tensor(slots), seq_info, table, counts), (seqs, tables)


def _ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def _flex_inputs(inputs, seqs, tables, kv_heads, head_dim):
    import torch  # noqa: PLC0415
    from torch.nn.attention.flex_attention import create_block_mask  # noqa: PLC0415

    q, cache = inputs[0], inputs[3]
    ks, vs, q_seq, k_seq, q_pos, k_pos = [], [], [], [], [], []
    for i, ((_, rows, kv), table) in enumerate(zip(seqs, tables)):
        blocks = cache[torch.tensor(table)]
        ks.append(blocks[:, 0].reshape(-1, kv_heads, head_dim)[:kv])
        vs.append(blocks[:, 1].reshape(-1, kv_heads, head_dim)[:kv])
        q_seq += [i] * rows
        k_seq += [i] * kv
        q_pos += range(kv - rows, kv)
        k_pos += range(kv)
    qs, ks_, qp, kp = (torch.tensor(x) for x in (q_seq, k_seq, q_pos, k_pos))

    def mask_mod(b, h, qi, ki):
        return (qs[qi] == ks_[ki]) & (kp[ki] <= qp[qi])

    query = q.transpose(0, 1)[None]
    key, value = (torch.cat(x).transpose(0, 1)[None] for x in (ks, vs))
    mask = create_block_mask(mask_mod, 1, 1, query.shape[2], key.shape[2], device="cpu")
    return query, key, value, mask


def main(args: argparse.Namespace) -> None:
    import torch  # noqa: PLC0415

    import engine.attention as attention  # noqa: PLC0415 - registers the op
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        _run(args, attention, flex_attention)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, attention, flex_attention) -> None:
    import torch  # noqa: PLC0415

    dtype = getattr(torch, args.dtype)
    heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    flex = torch.compile(flex_attention, dynamic=False)
    scale = head_dim ** -0.5
    print(f"one layer, {heads} query / {kv_heads} KV heads, head dim {head_dim}, {args.dtype}, "
          f"context {args.context}, {torch.get_num_threads()} threads; ms per call")
    print(f"{'step':28s} {'native':>8s} {'gather+SDPA':>12s} {'flex_attention':>15s}")
    for name, shapes in STEPS.items():
        inputs, (seqs, tables) = random_paged_step(shapes(args.context), heads, kv_heads, head_dim, dtype)
        native = _ms(lambda: torch.ops.tandem.paged_attention(*inputs, scale), args.repeats)
        saved = attention._NATIVE, attention.load_paged_attention
        attention._NATIVE, attention.load_paged_attention = {}, (lambda *a: None)
        try:
            fallback = _ms(lambda: torch.ops.tandem.paged_attention(*inputs, scale), args.repeats)
        finally:
            attention._NATIVE, attention.load_paged_attention = saved
        query, key, value, mask = _flex_inputs(inputs, seqs, tables, kv_heads, head_dim)
        flexed = _ms(lambda: flex(query, key, value, block_mask=mask, enable_gqa=True), args.repeats)
        print(f"{name:28s} {native:8.3f} {fallback:12.3f} {flexed:15.3f}")


def add_parser(sub) -> None:
    p = sub.add_parser("bench-attention", help="Paged attention kernels vs gather+SDPA and flex_attention.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--context", type=int, default=512, help="KV length of every sequence (default 512).")
    p.add_argument("--heads", type=int, default=9, help="Query heads (SmolLM2: 9).")
    p.add_argument("--kv-heads", type=int, default=3, help="KV heads (SmolLM2: 3).")
    p.add_argument("--head-dim", type=int, default=64, help="Head dim (SmolLM2: 64).")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores).")
    p.add_argument("--repeats", type=int, default=50, help="Timed calls per cell (default 50).")
    p.set_defaults(func=main)
