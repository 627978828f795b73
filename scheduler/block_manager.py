"""Paged KV-cache bookkeeping in plain ints: which physical blocks each request owns.

The block table of a request is `request.block_ids` (block i holds tokens [i*B, (i+1)*B)); this class
is the only writer of it. The engine turns block tables into FlashInfer-style paged metadata; the
simulator just counts blocks. Verb pairs: `can_allocate`/`allocate`, and `free`.

Automatic prefix caching (`enable_caching`): a block whose B tokens all have their KV computed is
registered under a hash chained from the previous block's hash and its own token ids, so the hash
names the whole prefix up to the block's end. A request allocated with `reuse=True` first takes the
cached blocks of its longest cached prefix (whole blocks, and never its last token: the step that
computes it samples the next one), so it starts with those tokens computed. Blocks are refcounted:
one shared by several requests returns to the pool only when the last of them frees it. A freed
block that holds a registered prefix stays cached: it counts as free and is handed out (evicted,
least recently freed first) only when no free block without a cached prefix is left. A request
only ever writes KV at positions past its computed tokens, and a block is registered only when all
of its positions are computed, so nobody writes into a block that is cached or shared.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable

from scheduler.request import Request

HASH_BYTES = 16
"""Digest size of a block hash (blake2b): 128 bits, so a collision between two different prefixes
(which would hand one request another's KV) is about as likely as a random 128-bit match."""
_ROOT_HASH = b"\0" * HASH_BYTES
"""The `previous hash` of a request's first block."""


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block: blake2b over the previous block's hash and the block's token ids
    (packed as signed 64-bit ints, so no two id lists pack alike)."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=HASH_BYTES).digest()


def prefix_hashes(token_ids, block_size: int, count: int, known: list[bytes] | None = None) -> list[bytes]:
    """The chained hashes of the first `count` full blocks of `token_ids` (a sequence, or a
    callable `(start, end) -> ids`): hash i names tokens [0, (i+1)*block_size). `known`, if given,
    holds the first hashes already computed and is extended in place. The gateway's prefix
    routing calls this on prompts, so that what it remembers is keyed exactly as replicas cache."""
    hashes = known if known is not None else []
    ids = token_ids if callable(token_ids) else (lambda start, end: token_ids[start:end])
    while len(hashes) < count:
        i = len(hashes)
        hashes.append(block_hash(hashes[-1] if hashes else _ROOT_HASH,
                                 ids(i * block_size, (i + 1) * block_size)))
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_blocks))
        """Unreferenced blocks holding no cached prefix: handed out first."""
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Unreferenced blocks holding a cached prefix, least recently freed first."""
        self._ref = [0] * num_blocks
        """Block tables that hold each block."""
        self._hash_of: dict[int, bytes] = {}      # block -> the prefix hash it is cached under
        self._cached: dict[bytes, int] = {}       # prefix hash -> its block (inverse of _hash_of)
        self._owner: dict[str, list[int]] = {}    # request_id -> its block table (same list object)
        self._hashes: dict[str, list[bytes]] = {}
        """Request id -> hashes of its first full blocks, computed once (tokens are only appended)."""
        self._num_done: dict[str, int] = {}
        """Request id -> leading blocks of its table already taken from or offered to the cache."""
        self.num_queried_tokens = 0
        """Tokens of the requests allocated with `reuse` (the prefix cache's queries), since start."""
        self.num_hit_tokens = 0
        """Of those, tokens found cached (their KV reused, not computed), since start."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached or not): what can be allocated."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered under a prefix hash, held or not."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1 (the KV-cache usage gauge)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks `request` still lacks to hold `num_tokens` tokens in total."""
        return max(0, self.blocks_for(num_tokens) - len(request.block_ids))

    # -- prefix lookups -----------------------------------------------------------------------
    def _block_hashes(self, request: Request, count: int) -> list[bytes]:
        """Hashes of the first `count` full blocks of `request` (computed once per request)."""
        return prefix_hashes(request.token_ids, self.block_size, count,
                             self._hashes.setdefault(request.request_id, []))

    def cached_blocks(self, request: Request) -> list[int]:
        """The cached blocks of the longest cached prefix of `request` (changes nothing): whole
        blocks, ending before its last token (the step that computes that one samples), and none
        for a request that already holds blocks or when caching is off."""
        if not self.enable_caching or request.block_ids:
            return []
        found = []
        for h in self._block_hashes(request, (request.num_tokens - 1) // self.block_size):
            block = self._cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def cached_tokens(self, request: Request) -> int:
        """Tokens of `request` an allocation with `reuse` would start with computed."""
        return len(self.cached_blocks(request)) * self.block_size

    # -- allocation ---------------------------------------------------------------------------
    def _blocks_taken(self, request: Request, num_tokens: int, reuse: bool) -> int:
        """Free blocks (cached or not) an allocation would take: the new ones plus the cached
        blocks it reuses that nobody held."""
        hits = self.cached_blocks(request) if reuse else []
        return (self.num_new_blocks(request, num_tokens) - len(hits)
                + sum(1 for b in hits if self._ref[b] == 0))

    def can_allocate(self, request: Request, num_tokens: int, reserve: int = 0,
                     reuse: bool = False) -> bool:
        """Whether `request` can grow to `num_tokens` tokens and still leave `reserve` blocks free
        (`reuse`: counting the cached prefix `allocate(..., reuse=True)` would take)."""
        return self._blocks_taken(request, num_tokens, reuse) + reserve <= self.num_free_blocks

    def allocate(self, request: Request, num_tokens: int, reuse: bool = False) -> int:
        """Grow the block table of `request` to hold `num_tokens` tokens. With `reuse` and caching
        on, a request holding no blocks yet first takes its cached prefix's blocks. Returns the
        tokens so found cached (0 without reuse): the caller counts them as computed."""
        need = self._blocks_taken(request, num_tokens, reuse)
        if need > self.num_free_blocks:
            raise RuntimeError(
                f"cannot allocate {need} blocks for {request.request_id}: {self.num_free_blocks} free"
            )
        table = self._owner.setdefault(request.request_id, request.block_ids)
        if table is not request.block_ids:
            raise RuntimeError(f"request id {request.request_id!r} already owns other blocks")
        hits = self.cached_blocks(request) if reuse else []
        if reuse and self.enable_caching:
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += len(hits) * self.block_size
        # Claim the hits before taking new blocks, so that no eviction below can take one of them.
        for block in hits:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            table.append(block)
        if hits:
            self._num_done[request.request_id] = len(hits)
        for _ in range(self.num_new_blocks(request, num_tokens)):
            block = self._take_free_block()
            self._ref[block] = 1
            table.append(block)
        return len(hits) * self.block_size

    def _take_free_block(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)   # least recently freed cached prefix
        del self._cached[self._hash_of.pop(block)]
        return block

    def cache_computed(self, request: Request) -> None:
        """Register the blocks of `request` that are now full of computed tokens (call after its
        computed count advanced, i.e. after the step wrote their KV). A prefix already cached in
        another block (two requests computed it at once) keeps that block; this one stays
        unregistered and returns to the pool as a plain free block."""
        if not self.enable_caching:
            return
        full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        done = self._num_done.get(request.request_id, 0)
        if full <= done:
            return
        hashes = self._block_hashes(request, full)
        for i in range(done, full):
            block = request.block_ids[i]
            if hashes[i] not in self._cached and block not in self._hash_of:
                self._cached[hashes[i]] = block
                self._hash_of[block] = hashes[i]
        self._num_done[request.request_id] = full

    def free(self, request: Request) -> None:
        """Drop every block of `request`; a block returns to the pool when nobody else holds it
        (kept cached if it holds a registered prefix). Safe to call twice."""
        table = self._owner.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)
        self._num_done.pop(request.request_id, None)
        if table is not None:
            # The tail first: it becomes the least recently freed, so eviction takes a prefix's
            # end before its start (a block is only reusable while every block before it is).
            for block in reversed(table):
                self._ref[block] -= 1
                if self._ref[block] == 0:
                    if block in self._hash_of:
                        self._evictable[block] = None
                    else:
                        self._free.append(block)
        request.block_ids = []

    def check_integrity(self, live_requests: Iterable[Request] = ()) -> None:
        """Raise if a block is leaked, in two places, out of range, its refcount is not the number
        of tables holding it, a free or cached block is held, the hash index is inconsistent, a
        request holds a cached block at a position it has still to compute (it would write into
        it), or a live table is not ours."""
        held = [0] * self.num_blocks
        for rid, table in self._owner.items():
            if len(set(table)) != len(table):
                raise AssertionError(f"{rid} holds a block twice: {table}")
            for b in table:
                if not 0 <= b < self.num_blocks:
                    raise AssertionError(f"{rid} holds block {b}, outside [0, {self.num_blocks})")
                held[b] += 1
        if held != self._ref:
            wrong = [b for b in range(self.num_blocks) if held[b] != self._ref[b]]
            raise AssertionError(f"refcounts wrong for blocks {wrong[:8]}: "
                                 f"held {[held[b] for b in wrong[:8]]}, counted {[self._ref[b] for b in wrong[:8]]}")
        pooled = list(self._free) + list(self._evictable)
        in_use = [b for b in range(self.num_blocks) if held[b]]
        every = in_use + pooled
        if sorted(every) != list(range(self.num_blocks)):
            seen: set[int] = set()
            dup = sorted({b for b in every if b in seen or seen.add(b)})
            missing = sorted(set(range(self.num_blocks)) - set(every))
            raise AssertionError(f"block accounting broken: duplicated {dup}, leaked {missing}")
        if any(b in self._hash_of for b in self._free):
            raise AssertionError("a block in the uncached free pool is registered under a hash")
        if any(b not in self._hash_of for b in self._evictable):
            raise AssertionError("a block in the cached free pool has no hash")
        if len(self._cached) != len(self._hash_of) or any(
                self._hash_of.get(b) != h for h, b in self._cached.items()):
            raise AssertionError("the hash index and the blocks' hashes disagree")
        if not self.enable_caching and self._cached:
            raise AssertionError("blocks registered with caching off")
        for r in live_requests:
            if r.block_ids and self._owner.get(r.request_id) is not r.block_ids:
                raise AssertionError(f"{r.request_id} holds blocks the manager does not track")
            for i, b in enumerate(r.block_ids):
                if b in self._hash_of and (i + 1) * self.block_size > r.num_computed_tokens:
                    raise AssertionError(
                        f"{r.request_id} holds cached block {b} at position {i} but has computed "
                        f"only {r.num_computed_tokens} tokens: it would write into a cached block")
