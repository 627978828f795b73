"""Paged attention over a mixed batch: prefill chunks and decodes in one forward.

KV cache, per layer: `[num_blocks, 2, block_size, num_kv_heads, head_dim]` (FlashInfer's NHD
single-tensor layout; [:, 0] is K, [:, 1] is V).

Metadata is FlashInfer's paged format, built once per step from the scheduler's block tables and
shared by both backends, so the CUDA path and the CPU path run the same bookkeeping:

    qo_indptr        [B+1]  query rows of sequence b are q[qo_indptr[b]:qo_indptr[b+1]]
    kv_indptr        [B+1]  its pages are kv_indices[kv_indptr[b]:kv_indptr[b+1]]
    kv_indices       [P]    physical block ids
    kv_last_page_len [B]    tokens in its last page (1..block_size)

The KV length of a sequence includes this step's tokens: they are written to the cache first, and
each query attends to every key at a position <= its own (causal, aligned to the end of the KV).
Batch order is decodes (one query row) first, then prefill chunks; `num_decodes` marks the split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DecodeGroup:
    """Decode rows whose KV lengths are within 2x of each other, attended in one padded call:
    padding to the longest row of the whole batch would make one long-context request multiply
    the cost of every short one."""

    rows: torch.Tensor         # [G] int64, query rows (= sequences, decodes come first)
    block_table: torch.Tensor  # [G, max_blocks] int64, padded with block 0
    mask: torch.Tensor         # [G, 1, 1, max_blocks*block_size] bool, True = a real key


def _decode_groups(kv_indptr: list[int], kv_indices: list[int], kv_lens: list[int],
                   num_decodes: int, block_size: int, device) -> list[DecodeGroup]:
    order = sorted(range(num_decodes), key=lambda b: kv_lens[b])
    groups, current = [], []
    for b in order:
        if current and kv_lens[b] > 2 * kv_lens[current[0]]:
            groups.append(current)
            current = []
        current.append(b)
    if current:
        groups.append(current)
    out = []
    for members in groups:
        pages = [kv_indices[kv_indptr[b]:kv_indptr[b + 1]] for b in members]
        width = max(len(p) for p in pages)
        table = torch.tensor([p + [0] * (width - len(p)) for p in pages], dtype=torch.int64, device=device)
        lens = torch.tensor([kv_lens[b] for b in members], device=device)
        span = torch.arange(width * block_size, device=device)
        mask = (span[None, :] < lens[:, None])[:, None, None, :]
        out.append(DecodeGroup(torch.tensor(members, dtype=torch.int64, device=device), table, mask))
    return out


@dataclass
class AttentionMetadata:
    qo_indptr: torch.Tensor        # [B+1] int32
    kv_indptr: torch.Tensor        # [B+1] int32
    kv_indices: torch.Tensor       # [P] int32
    kv_last_page_len: torch.Tensor  # [B] int32
    positions: torch.Tensor        # [T] int64, absolute position of each query row
    batch_indices: torch.Tensor    # [T] int64, sequence of each query row
    slot_blocks: torch.Tensor      # [T] int64, block that receives each row's K/V
    slot_offsets: torch.Tensor     # [T] int64, offset inside that block
    q_lens: list[int]
    kv_lens: list[int]
    num_decodes: int
    block_size: int
    decode_groups: list["DecodeGroup"]
    """Decode rows grouped by similar KV length (built once per step, used by every layer)."""

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)


def build_metadata(
    seqs: list[tuple[list[int], int, int]], block_size: int, device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """`seqs`: (block table, first position computed this step, tokens this step), decodes first."""
    qo_indptr, kv_indptr, kv_indices, last_len = [0], [0], [], []
    positions, batch_idx, q_lens, kv_lens = [], [], [], []
    num_decodes = 0
    for b, (blocks, start, n) in enumerate(seqs):
        kv_len = start + n
        pages = -(-kv_len // block_size)
        if pages > len(blocks):
            raise ValueError(f"sequence {b} needs {pages} blocks for {kv_len} tokens, has {len(blocks)}")
        qo_indptr.append(qo_indptr[-1] + n)
        kv_indptr.append(kv_indptr[-1] + pages)
        kv_indices.extend(blocks[:pages])
        last_len.append(kv_len - (pages - 1) * block_size)
        positions.extend(range(start, kv_len))
        batch_idx.extend([b] * n)
        q_lens.append(n)
        kv_lens.append(kv_len)
        if n == 1 and num_decodes == b:
            num_decodes += 1

    def i32(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32, device=device)

    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    bidx = torch.tensor(batch_idx, dtype=torch.int64, device=device)
    table_rows = [seqs[b][0] for b in range(len(seqs))]
    slot_blocks = torch.tensor(
        [table_rows[b][p // block_size] for b, p in zip(batch_idx, positions)],
        dtype=torch.int64, device=device,
    )


    return AttentionMetadata(
        qo_indptr=i32(qo_indptr), kv_indptr=i32(kv_indptr), kv_indices=i32(kv_indices),
        kv_last_page_len=i32(last_len), positions=pos, batch_indices=bidx,
        slot_blocks=slot_blocks, slot_offsets=pos % block_size,
        q_lens=q_lens, kv_lens=kv_lens, num_decodes=num_decodes, block_size=block_size,
        decode_groups=_decode_groups(kv_indptr, kv_indices, kv_lens, num_decodes, block_size, device),
    )


class TorchPagedAttention:
    """Paged attention with plain torch ops (CPU or GPU); the reference for every backend."""

    name = "torch"

    def plan(self, meta: AttentionMetadata, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.scale = head_dim ** -0.5

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        kv_cache: torch.Tensor, meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for this step's rows -> out [T, Hq, D]."""
        # Rows of the cache viewed as [num_blocks * 2 * block_size, Hkv, D]: K of (block, offset)
        # is row (2 * block) * bs + offset, its V is block_size rows further.
        rows = kv_cache.view(-1, *kv_cache.shape[-2:])
        k_rows = meta.slot_blocks * (2 * meta.block_size) + meta.slot_offsets
        rows.index_copy_(0, k_rows, k)
        rows.index_copy_(0, k_rows + meta.block_size, v)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        for group in meta.decode_groups:
            # index_select is several times faster than advanced indexing on CPU.
            table = group.block_table
            gathered = kv_cache.index_select(0, table.view(-1)).view(*table.shape, *kv_cache.shape[1:])
            g, mb, _, bs, hkv, dh = gathered.shape  # [G, max_blocks, 2, bs, Hkv, Dh]
            keys = gathered[:, :, 0].reshape(g, mb * bs, hkv, dh).transpose(1, 2)
            values = gathered[:, :, 1].reshape(g, mb * bs, hkv, dh).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q.index_select(0, group.rows).unsqueeze(2), keys, values, attn_mask=group.mask,
                scale=self.scale, enable_gqa=True,
            )  # [G, Hq, 1, Dh]
            out.index_copy_(0, group.rows, o.squeeze(2))
        qo = meta.qo_indptr.tolist()
        kvp = meta.kv_indptr.tolist()
        for b in range(nd, meta.num_seqs):
            q_len, kv_len = meta.q_lens[b], meta.kv_lens[b]
            pages = meta.kv_indices[kvp[b]:kvp[b + 1]].long()
            blocks = kv_cache.index_select(0, pages)  # [pages, 2, bs, Hkv, Dh]
            keys = blocks[:, 0].reshape(-1, *blocks.shape[-2:])[:kv_len].transpose(0, 1)
            values = blocks[:, 1].reshape(-1, *blocks.shape[-2:])[:kv_len].transpose(0, 1)
            qb = q[qo[b]:qo[b + 1]].transpose(0, 1)  # [Hq, q_len, Dh]
            if q_len == kv_len:
                o = F.scaled_dot_product_attention(qb, keys, values, is_causal=True,
                                                   scale=self.scale, enable_gqa=True)
            else:
                # Causal aligned to the end: query i sits at position kv_len - q_len + i.
                mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
                o = F.scaled_dot_product_attention(qb, keys, values, attn_mask=mask,
                                                   scale=self.scale, enable_gqa=True)
            out[qo[b]:qo[b + 1]] = o.transpose(0, 1)
        return out


class FlashInferPagedAttention:
    """FlashInfer's batch prefill kernel over the same paged metadata (CUDA only).

    Decodes are query rows of length 1 in the same ragged batch, so one wrapper serves the whole
    hybrid batch. Written against FlashInfer's documented API; it cannot run on this CPU machine.
    """

    name = "flashinfer"

    def __init__(self, device: torch.device, workspace_bytes: int = 128 * 1024 * 1024) -> None:
        import flashinfer  # noqa: PLC0415 - optional, CUDA only

        self._flashinfer = flashinfer
        self._workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self._wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")

    def plan(self, meta: AttentionMetadata, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self._wrapper.plan(
            meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len,
            num_heads, num_kv_heads, head_dim, meta.block_size, causal=True,
        )

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        self._flashinfer.page.append_paged_kv_cache(
            k, v, meta.batch_indices.int(), meta.positions.int(), kv_cache,
            meta.kv_indices, meta.kv_indptr, meta.kv_last_page_len, kv_layout="NHD",
        )
        return self._wrapper.run(q, kv_cache)


def make_attention_backend(name: str, device: torch.device):
    if name == "torch":
        return TorchPagedAttention()
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device; use --attention torch")
        return FlashInferPagedAttention(device)
    raise ValueError(f"unknown attention backend {name!r}; choose torch or flashinfer")
