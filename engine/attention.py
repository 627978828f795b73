"""Paged attention over a hybrid batch: decodes and prefill chunks in one forward.

KV cache, per layer: `[num_blocks, 2, block_size, num_kv_heads, head_dim]` ([:, 0] is K, [:, 1] is
V): FlashInfer's NHD single-tensor layout, so the CUDA and CPU paths share the cache, the block
manager's ids and the KV-transfer frames.

Every layer reads the same per-step `AttentionInputs`, built once from the `StepBatch`:

    slot_mapping [T]      cache slot (block * block_size + offset) receiving each row's K/V
    seq_info     [S, 3]   per sequence: (first row, rows this step, KV length including them)
    block_table  [S, W]   each sequence's KV blocks
    seq_counts   [2]      (short sequences, all sequences); rows past the count are padding

Query row i of a sequence sits at position kv_len - rows + i and sees keys [0, that position].

On CPU, attention is one custom op, `tandem::paged_attention`, so a compiled forward calls it as
a single extern kernel per layer and the shapes inside it never cause a recompile. It writes the
step's K/V into the cache, then attends with the native kernels of engine/kernels, which read the
keys where they lie in their blocks (no gathered copy per layer):
- decodes (the first `seq_counts[0]` sequences): work split by (sequence, 256-key partition) over
  all heads at once, with a merge of partial softmaxes (flash-decoding), so one long sequence
  still uses every thread;
- prefill chunks: blocked flash attention (tiles of query rows x 64 keys, online softmax), with
  bf16 pair dot products (AVX512-BF16) for bf16 caches. Measured against torch's SDPA (flash, 4-D)
  on SmolLM2's shapes: 512x512 causal 1.7 vs 4.6 ms per layer, 128 rows over 1024 keys 1.5 vs
  2.9 ms.
Without the native kernels (no C compiler, other head sizes, other devices) the op gathers each
sequence's blocks and uses SDPA.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from engine.kernels import load_paged_attention
from engine.step_batch import StepBatch

log = logging.getLogger("tandem.attention")


class AttentionInputs(NamedTuple):
    slot_mapping: torch.Tensor  # [T] int64
    seq_info: torch.Tensor      # [S_cap, 3] int32
    block_table: torch.Tensor   # [S_cap, W_cap] int32
    seq_counts: torch.Tensor    # [2] int32: (short sequences, sequences)


# ---------------------------------------------------------------------------------------- the op

_LIB = torch.library.Library("tandem", "DEF")
_LIB.define(
    "paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping, "
    "Tensor seq_info, Tensor block_table, Tensor seq_counts, float scale) -> Tensor"
)


def _write_kv_torch(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    # Cache rows viewed as [num_blocks * 2 * block_size, Hkv, D]: K of slot (block, offset) is row
    # 2 * block * block_size + offset, its V block_size rows further.
    block_size = kv_cache.shape[2]
    rows = kv_cache.view(-1, *kv_cache.shape[-2:])
    k_rows = (slot_mapping // block_size) * (2 * block_size) + slot_mapping % block_size
    rows.index_copy_(0, k_rows, k)
    rows.index_copy_(0, k_rows + block_size, v)


def _attend_dense(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, seq_info: torch.Tensor,
                  block_table: torch.Tensor, scale: float) -> None:
    """SDPA per sequence over its gathered blocks (prefill chunks; short runs without the kernel)."""
    block_size = kv_cache.shape[2]
    for (q0, rows, kv_len), table in zip(seq_info.tolist(), block_table):
        pages = -(-kv_len // block_size)
        blocks = kv_cache.index_select(0, table[:pages])  # [pages, 2, bs, Hkv, D]
        keys = blocks[:, 0].reshape(-1, *blocks.shape[-2:])[:kv_len].transpose(0, 1)
        values = blocks[:, 1].reshape(-1, *blocks.shape[-2:])[:kv_len].transpose(0, 1)
        # 4-D operands: torch's CPU flash-attention kernel takes them; 3-D ones fall back to the
        # unfused math path (1.5-2x slower, measured).
        queries = q[q0:q0 + rows].transpose(0, 1)[None]  # [1, Hq, rows, D]
        keys, values = keys[None], values[None]            # [1, Hkv, kv_len, D]
        if rows == kv_len:
            o = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:  # causal, aligned to the end of the KV
            mask = torch.ones(rows, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - rows)
            o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                               enable_gqa=True)
        o = o[0]
        out[q0:q0 + rows] = o.transpose(0, 1)


_NATIVE: dict[tuple, tuple | None] = {}
"""(head_dim, group, kv heads, dtype) -> (write_kv, attend) native kernels, or None (torch path)."""


def _native_kernels(head_dim: int, group: int, kv_heads: int, dtype: torch.dtype) -> tuple | None:
    key = (head_dim, group, kv_heads, dtype)
    if key not in _NATIVE:
        lib = (load_paged_attention(head_dim, group, kv_heads)
               if dtype in (torch.float32, torch.bfloat16) else None)
        name = str(dtype).removeprefix("torch.")
        _NATIVE[key] = None if lib is None else (lib.write_kv[name], lib.attend[name],
                                                 lib.prefill_attend[name])
    return _NATIVE[key]


def _dense_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows may be strided (slices of the fused QKV projection); each row must be dense."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def paged_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, seq_info: torch.Tensor,
                         block_table: torch.Tensor, seq_counts: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D]; writes k/v into `kv_cache` first.

    This runs once per layer per step, so the native path keeps Python work to a minimum."""
    num_short, num_seqs = seq_counts.tolist()
    rows, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    out = q.new_empty(rows, num_heads, head_dim)
    native = None
    if q.device.type == "cpu" and kv_cache.is_contiguous():
        native = _native_kernels(head_dim, num_heads // num_kv_heads, num_kv_heads, q.dtype)
    if native is None:
        _write_kv_torch(kv_cache, k, v, slot_mapping)
        _attend_dense(q, kv_cache, out, seq_info[:num_seqs], block_table[:num_seqs], scale)
        return out
    write_kv, attend, prefill_attend = native
    q, k, v = _dense_rows(q), _dense_rows(k), _dense_rows(v)
    block_size, width = kv_cache.shape[2], block_table.shape[1]
    cache, q_ptr, out_ptr = kv_cache.data_ptr(), q.data_ptr(), out.data_ptr()
    write_kv(cache, k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slot_mapping.data_ptr(),
             rows, block_size)
    if num_short and attend(q_ptr, q.stride(0), cache, out_ptr, seq_info.data_ptr(), num_short,
                            block_table.data_ptr(), width, block_size, scale):
        raise MemoryError("paged attention kernel could not allocate its partial results")
    if num_seqs > num_short:
        prefill_attend(q_ptr, q.stride(0), cache, out_ptr, seq_info[num_short].data_ptr(),
                       num_seqs - num_short, block_table[num_short].data_ptr(), width, block_size, scale)
    return out


_LIB.impl("paged_attention", paged_attention_impl, "CPU")
_LIB.impl("paged_attention", paged_attention_impl, "CUDA")  # torch reference path on GPU


@torch.library.register_fake("tandem::paged_attention")
def _paged_attention_fake(q, k, v, kv_cache, slot_mapping, seq_info, block_table, seq_counts, scale):
    return q.new_empty(q.shape)


# ------------------------------------------------------------------------------------ backends


class TorchPagedAttention:
    """The `tandem::paged_attention` op (native kernel + SDPA on CPU, SDPA on any device)."""

    name = "torch"

    def __init__(self, device: torch.device, max_seqs: int, max_blocks_per_seq: int) -> None:
        self.device = device
        # Fixed-size metadata buffers: their shapes never change, so a compiled forward
        # specialises on none of them.
        self.seq_info = torch.zeros(max_seqs, 3, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_counts = torch.zeros(2, dtype=torch.int32, device=device)

    def plan(self, batch: StepBatch, num_heads: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype) -> AttentionInputs:
        s, w = batch.block_table.shape
        if s > self.seq_info.shape[0] or w > self.block_table.shape[1]:
            raise ValueError(f"step has {s} sequences x {w} blocks; the attention buffers hold "
                             f"{self.seq_info.shape[0]} x {self.block_table.shape[1]}")
        self.seq_info[:s].copy_(torch.from_numpy(batch.seq_info))
        self.block_table[:s, :w].copy_(torch.from_numpy(batch.block_table))
        self.seq_counts.copy_(torch.tensor([batch.num_short_seqs, s], dtype=torch.int32))
        slots = torch.from_numpy(batch.slot_mapping).to(self.device)
        return AttentionInputs(slots, self.seq_info, self.block_table, self.seq_counts)

    @staticmethod
    def forward(q, k, v, kv_cache, attn: AttentionInputs, scale: float) -> torch.Tensor:
        return torch.ops.tandem.paged_attention(q, k, v, kv_cache, attn.slot_mapping, attn.seq_info,
                                                attn.block_table, attn.seq_counts, scale)


class PagedKVLayout(NamedTuple):
    """A StepBatch in the CSR form of FlashInfer's paged-KV API (numpy, int64)."""

    qo_indptr: np.ndarray
    """[S+1]: sequence s owns query rows [qo_indptr[s], qo_indptr[s+1])."""
    kv_indptr: np.ndarray
    """[S+1]: sequence s owns pages kv_indices[kv_indptr[s]:kv_indptr[s+1]]."""
    kv_indices: np.ndarray
    """[total pages]: the cache blocks of every sequence, in order."""
    last_page_len: np.ndarray
    """[S]: tokens in each sequence's last page (1..block_size)."""
    batch_indices: np.ndarray
    """[T]: the sequence of each query row (FlashInfer's `append_paged_kv_cache` takes it)."""


def paged_kv_layout(batch: StepBatch, block_size: int) -> PagedKVLayout:
    """The host-side bookkeeping of the FlashInfer backend, kept apart so it is tested on CPU."""
    info = batch.seq_info.astype(np.int64)
    num_seqs = len(info)
    pages = -(-info[:, 2] // block_size)
    qo_indptr = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(info[:, 1], out=qo_indptr[1:])
    kv_indptr = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(pages, out=kv_indptr[1:])
    in_use = np.arange(batch.block_table.shape[1])[None, :] < pages[:, None]
    kv_indices = batch.block_table[in_use].astype(np.int64)   # row-major: sequence by sequence
    last_page_len = info[:, 2] - (pages - 1) * block_size
    batch_indices = np.repeat(np.arange(num_seqs, dtype=np.int64), info[:, 1])
    return PagedKVLayout(qo_indptr, kv_indptr, kv_indices, last_page_len, batch_indices)


class FlashInferPagedAttention:
    """FlashInfer's batch prefill kernel over the same paged cache (CUDA only).

    Decodes are query rows of length 1 in the same ragged batch, so one wrapper serves the whole
    hybrid batch. Written against FlashInfer's documented API (`plan` with q_data_type and
    kv_data_type, `page.append_paged_kv_cache`, `run`); it has not run here (no GPU).
    """

    name = "flashinfer"

    def __init__(self, device: torch.device, block_size: int,
                 workspace_bytes: int = 128 * 1024 * 1024) -> None:
        import flashinfer  # noqa: PLC0415 - optional, CUDA only

        self._flashinfer = flashinfer
        self.device = device
        self.block_size = block_size
        self._workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self._wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
        self._append: tuple[torch.Tensor, ...] = ()

    def plan(self, batch: StepBatch, num_heads: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype) -> AttentionInputs:
        pages = paged_kv_layout(batch, self.block_size)

        def i32(x) -> torch.Tensor:
            return torch.from_numpy(x).to(device=self.device, dtype=torch.int32)

        qo, kvp, kvi, last = (i32(pages.qo_indptr), i32(pages.kv_indptr), i32(pages.kv_indices),
                              i32(pages.last_page_len))
        self._wrapper.plan(qo, kvp, kvi, last, num_heads, num_kv_heads, head_dim, self.block_size,
                           causal=True, q_data_type=dtype, kv_data_type=dtype)
        self._append = (i32(pages.batch_indices), i32(batch.positions), kvi, kvp, last)
        slots = torch.from_numpy(batch.slot_mapping).to(self.device)
        return AttentionInputs(slots, torch.empty(0), torch.empty(0), torch.empty(0))

    def forward(self, q, k, v, kv_cache, attn: AttentionInputs, scale: float) -> torch.Tensor:
        seq_of_row, positions, kv_indices, kv_indptr, last_page_len = self._append
        self._flashinfer.page.append_paged_kv_cache(
            k, v, seq_of_row, positions, kv_cache, kv_indices, kv_indptr, last_page_len,
            kv_layout="NHD")
        return self._wrapper.run(q, kv_cache)


def make_attention_backend(name: str, device: torch.device, max_seqs: int, max_blocks_per_seq: int,
                           block_size: int):
    if name == "torch":
        return TorchPagedAttention(device, max_seqs, max_blocks_per_seq)
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device; use --attention torch")
        return FlashInferPagedAttention(device, block_size)
    raise ValueError(f"unknown attention backend {name!r}; choose torch or flashinfer")
