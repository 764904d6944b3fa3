"""The paged KV pool of one decoder backbone: the daemon's memory, never exported to tasks.

Layout: for every layer, K and V of shape (num_blocks * block_size, kv_heads, head_dim), viewed as
fixed-size blocks of `block_size` token slots. A sequence owns a block table (a list of block ids);
its token at position p lives in slot  table[p // block_size] * block_size + p % block_size.
Blocks are allocated as a sequence grows (no reservation of the maximum length) and returned the
moment it finishes, is cancelled or is preempted. Allocation never blocks: it returns None when the
pool is short, and the runner decides whom to preempt.
"""
from __future__ import annotations

import torch


class KVPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, block_size: int,
                 num_blocks: int, dtype: torch.dtype = torch.float32):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one slot")
        self.block_size, self.num_blocks = block_size, num_blocks
        slots = num_blocks * block_size
        # Uninitialised: a slot is always written before any attention reads it (padding reads a
        # written slot), and untouched pages cost no memory until the pool fills.
        self.k = torch.empty(layers, slots, kv_heads, head_dim, dtype=dtype)
        self.v = torch.empty(layers, slots, kv_heads, head_dim, dtype=dtype)
        self._free = list(range(num_blocks - 1, -1, -1))       # a stack: pop() gives low ids

    @classmethod
    def sized(cls, mib: float, layers: int, kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype = torch.float32) -> "KVPool":
        """A pool of `mib` MiB (K and V of every layer), in whole blocks."""
        per_block = 2 * layers * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        return cls(layers, kv_heads, head_dim, block_size, max(1, int(mib * 2**20) // per_block),
                   dtype)

    @classmethod
    def holding(cls, sequences: int, tokens: int, layers: int, kv_heads: int, head_dim: int,
                block_size: int, dtype: torch.dtype = torch.float32) -> "KVPool":
        """A pool of exactly enough blocks for `sequences` sequences of `tokens` tokens each."""
        return cls(layers, kv_heads, head_dim, block_size,
                   sequences * -(-tokens // block_size), dtype)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def grow(self, table: list[int], tokens: int) -> bool:
        """Extend `table` to hold `tokens` slots; False (table unchanged) if the pool is short."""
        need = self.blocks_for(tokens) - len(table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        table.extend(self._free.pop() for _ in range(need))
        return True

    def release(self, table: list[int]) -> None:
        """Return a sequence's blocks (the table is emptied)."""
        self._free.extend(reversed(table))
        table.clear()

    def slots(self, table: list[int], start: int, count: int) -> torch.Tensor:
        """(count,) slot indices of positions start .. start + count - 1 of a sequence."""
        pos = torch.arange(start, start + count)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (rows, kv_heads, head_dim) at `slots` of `layer`."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)
