"""BlockManager: the KV cache's block pool. Hands out block ids, counts references, and (with
prefix caching) keeps full blocks addressable by the tokens that produced them.

A full block's key is (key of the previous block, its token ids), so a hit means the whole
prefix is identical. Cached blocks nobody references stay valid in an LRU pool until a new
allocation needs the space. Pure Python: no torch, deterministic.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from .sequence import Sequence

BlockKey = tuple  # (parent BlockKey | None, tuple of token ids)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # never used or evicted
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but cached, least recently used first
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}
        self._seq_keys: dict[int, list[BlockKey]] = {}  # seq_id -> keys of its hashed blocks
        self.num_cache_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _take(self) -> int:
        if self._free:
            # last freed, first reused: a small working set of blocks stays warm in caches, and on CPU the
            # lazily committed cache memory grows only as far as the peak load needs
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released more often than taken"
        if self.ref_counts[block] == 0:
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def match_prefix(self, seq: Sequence) -> None:
        """Share cached blocks for the longest cached prefix of a sequence that holds no blocks yet.

        At least the last token is left to compute, so the step that admits it produces logits.
        """
        if not self.enable_prefix_caching or seq.block_ids:
            return
        bs, tokens = self.block_size, seq.token_ids
        parent, keys = None, []
        for i in range((len(tokens) - 1) // bs):
            key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            block = self._block_of.get(key)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1
            seq.block_ids.append(block)
            keys.append(key)
            parent = key
        seq.num_computed_tokens = len(keys) * bs
        seq.num_hashed_blocks = len(keys)
        self._seq_keys[seq.seq_id] = keys
        self.num_cache_hit_tokens += seq.num_computed_tokens

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the sequence can hold `num_tokens` tokens in total."""
        return self.num_blocks_for(num_tokens) - len(seq.block_ids) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the sequence's block table to hold `num_tokens` tokens in total."""
        need = self.num_blocks_for(num_tokens) - len(seq.block_ids)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {need}, have {self.num_free_blocks}")
        seq.block_ids.extend(self._take() for _ in range(need))

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make the sequence's newly computed full blocks findable by later requests."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        keys = self._seq_keys.setdefault(seq.seq_id, [])
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_ids))
        while seq.num_hashed_blocks < num_full:
            i = seq.num_hashed_blocks
            parent = keys[-1] if keys else None
            key = (parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            block = seq.block_ids[i]
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key
            keys.append(key)
            seq.num_hashed_blocks += 1

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references (blocks last in the table are evicted first)."""
        for block in reversed(seq.block_ids):
            self._release(block)
        seq.block_ids = []
        seq.num_hashed_blocks = 0
        self._seq_keys.pop(seq.seq_id, None)

    def check_invariants(self, live: list[Sequence]) -> None:
        """Every block is free, evictable or referenced exactly as often as live sequences hold it."""
        held = [0] * self.num_blocks
        for seq in live:
            for block in seq.block_ids:
                held[block] += 1
        assert held == self.ref_counts, "reference counts do not match the live block tables"
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not (free & evictable)
        for block in range(self.num_blocks):
            in_pool = block in free or block in evictable
            assert in_pool == (held[block] == 0), f"block {block}: ref {held[block]} but in_pool={in_pool}"
        assert all(self._block_of[k] == b for b, k in self._key_of.items())
