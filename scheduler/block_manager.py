"""Paged KV-cache bookkeeping in plain ints: which physical blocks each request owns.

The block table of a request is `request.block_ids` (block i holds tokens [i*B, (i+1)*B)); this class
is the only writer of it. The engine turns block tables into FlashInfer-style paged metadata; the
simulator just counts blocks. Verb pairs: `can_allocate`/`allocate`, and `free`.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from scheduler.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[str, list[int]] = {}   # request_id -> its block table (same list object)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1 (the KV-cache usage gauge)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks `request` still lacks to hold `num_tokens` tokens in total."""
        return max(0, self.blocks_for(num_tokens) - len(request.block_ids))

    def can_allocate(self, request: Request, num_tokens: int, reserve: int = 0) -> bool:
        """Whether `request` can grow to `num_tokens` tokens and still leave `reserve` blocks free."""
        return self.num_new_blocks(request, num_tokens) + reserve <= len(self._free)

    def allocate(self, request: Request, num_tokens: int) -> None:
        """Grow the block table of `request` to hold `num_tokens` tokens."""
        need = self.num_new_blocks(request, num_tokens)
        if need > len(self._free):
            raise RuntimeError(
                f"cannot allocate {need} blocks for {request.request_id}: {len(self._free)} free"
            )
        table = self._owner.setdefault(request.request_id, request.block_ids)
        if table is not request.block_ids:
            raise RuntimeError(f"request id {request.request_id!r} already owns other blocks")
        table.extend(self._free.popleft() for _ in range(need))

    def free(self, request: Request) -> None:
        """Return every block of `request`; safe to call twice."""
        table = self._owner.pop(request.request_id, None)
        if table is not None:
            self._free.extend(table)
        request.block_ids = []

    def check_integrity(self, live_requests: Iterable[Request] = ()) -> None:
        """Raise if a block is leaked, owned twice, out of range, or a live table is not ours."""
        owned = [b for table in self._owner.values() for b in table]
        every = owned + list(self._free)
        if sorted(every) != list(range(self.num_blocks)):
            seen: set[int] = set()
            dup = sorted({b for b in every if b in seen or seen.add(b)})
            missing = sorted(set(range(self.num_blocks)) - set(every))
            raise AssertionError(f"block accounting broken: duplicated {dup}, leaked {missing}")
        for r in live_requests:
            if r.block_ids and self._owner.get(r.request_id) is not r.block_ids:
                raise AssertionError(f"{r.request_id} holds blocks the manager does not track")
