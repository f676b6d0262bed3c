"""The prefix cache: committed K/V of whole prompt blocks, kept after their request ends and copied into the slot
of a later request whose prompt starts with the same tokens (a shared system prompt, the earlier turns of a
conversation), so that only the rest of its prompt is encoded.

A block is `block_tokens` prompt tokens at positions [k*B, (k+1)*B), named by a hash chained over every token
before it (model/prefix_keys.py: a block means the same K/V only after the same prefix). K/V at a position depend
on the tokens up to it alone (causal encoding), so a block stored from one request serves any other with that
prefix.

- Store: one preallocated tensor pair per layer, [blocks, B, kv_heads, head_dim], within the byte budget the
  pool gives it; nothing grows at run time.
- Capture: K/V are copied out during the prefill forward itself (KVCache.capture), because a sliding layer's
  ring keeps only the last window-1 tokens of a slot: by the end of a long prompt its first blocks are gone.
- Restore: full layers get every cached position; sliding layers get the last window-1 of them, each at its
  ring index (position p at p % ring), exactly the ring a prefill of those tokens would have left.
- Reference counts: a block is held by each cached block that continues it (a chain is matched from its first
  block, so a parent must outlive its children) and by a request between its match and the end of its encode.
  A block held by nothing is evictable; eviction takes the least recently used of those.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from model.kv_cache import KVCache
from model.prefix_keys import block_chain


@dataclass
class Block:
    index: int  # row of the store's tensors
    key: int  # the chained hash
    parent: int
    tokens: tuple[int, ...]  # checked on a match: a hash collision never serves another prefix's K/V
    refs: int = 0  # cached children + requests holding it


@dataclass
class Capture:
    """What one prefill row stores: its new blocks, at token offsets within the row's new tokens."""

    row: int
    offsets: list[int]
    blocks: list[Block]


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, restored from the cache instead of encoded
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, cache: KVCache, capacity_bytes: int, block_tokens: int = 64):
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.cache = cache
        self.block_tokens = block_tokens
        c = cache.config
        per_block = (
            sum(2 * block_tokens * cache.config.kv_heads[i] * cache.config.head_dims[i] for i in range(c.num_layers))
            * cache.keys[0].element_size()
        )
        self.capacity = capacity_bytes // per_block if per_block else 0
        dev, dtype = cache.lengths.device, cache.keys[0].dtype
        shapes = [(self.capacity, block_tokens, c.kv_heads[i], c.head_dims[i]) for i in range(c.num_layers)]
        self.keys = [torch.zeros(s, device=dev, dtype=dtype) for s in shapes]
        self.values = [torch.zeros(s, device=dev, dtype=dtype) for s in shapes]
        self.blocks: dict[int, Block] = {}
        self.recent: OrderedDict[int, None] = OrderedDict()  # every cached block, least recently used first
        self.free = list(range(self.capacity))[::-1]
        self.stats = PrefixStats()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ---------------------------------------------------------------- lookups

    def chain(self, prompt: list[int]) -> list[tuple[int, int, tuple[int, ...]]]:
        return block_chain(prompt, self.block_tokens)

    def recent_keys(self, limit: int) -> list[int]:
        """The names of the `limit` most recently used cached blocks (what a replica tells routers)."""
        for _ in range(3):  # the runner's thread may change the order meanwhile: read again
            try:
                return list(self.recent)[-limit:]
            except RuntimeError:
                continue
        return []

    def match(self, prompt: list[int]) -> list[Block]:
        """The cached blocks the prompt starts with, held (release them after the encode). At least one prompt
        token is always left to encode: the prefill writes the row's last position."""
        usable = (len(prompt) - 1) // self.block_tokens
        found: list[Block] = []
        for key, _, tokens in self.chain(prompt)[:usable]:
            block = self.blocks.get(key)
            if block is None or block.tokens != tokens:
                break
            found.append(block)
        for block in found:
            block.refs += 1
            self.recent.move_to_end(block.key)
        self.stats.queried_tokens += len(prompt)
        self.stats.hit_tokens += len(found) * self.block_tokens
        return found

    def release(self, blocks: list[Block]) -> None:
        for block in blocks:
            block.refs -= 1

    # ---------------------------------------------------------------- restore and capture

    def restore(self, slot: int, blocks: list[Block]) -> None:
        """Write the blocks' K/V into an empty slot as a prefill of their tokens would have: the slot then holds
        len(blocks) * B tokens."""
        if not blocks:
            return
        cache, b = self.cache, self.block_tokens
        n = len(blocks) * b
        idx = torch.tensor([blk.index for blk in blocks], device=cache.lengths.device)
        keep = min(cache.ring, n)  # a sliding layer's ring: the last window-1 positions, at p % ring
        ring_pos = torch.arange(n - keep, n, device=idx.device)
        for layer in range(cache.config.num_layers):
            for store, dest in ((self.keys, cache.keys), (self.values, cache.values)):
                flat = store[layer][idx].flatten(0, 1)  # [n, kv_heads, head_dim], positions 0..n-1
                if cache.config.is_sliding(layer):
                    dest[layer][slot, ring_pos % cache.ring] = flat[n - keep :]
                else:
                    dest[layer][slot, :n] = flat
        cache.lengths[slot] = n

    def plan_capture(self, row: int, prompt: list[int], cached: int) -> Capture | None:
        """Blocks to store from a prefill row whose first `cached` blocks came from the cache: store rows for the
        prompt's other whole blocks (evicting the least recently used blocks held by nothing where the store is
        full), held until `commit`. None when there is nothing to store."""
        chain = self.chain(prompt)
        offsets, blocks = [], []
        for k in range(cached, len(chain)):
            key, parent, tokens = chain[k]
            if key in self.blocks:  # stored meanwhile (another row of this batch): never twice
                break
            index = self._allocate()
            if index is None:
                break
            blocks.append(Block(index, key, parent, tokens, refs=1))  # held until committed
            offsets.append((k - cached) * self.block_tokens)
        return Capture(row, offsets, blocks) if blocks else None

    def commit(self, captures: list[Capture], ok: bool) -> None:
        """After the encode: its captured blocks become cached (ok) or go back to the free list."""
        for cap in captures:
            for block in cap.blocks:
                block.refs -= 1
                if not ok or block.key in self.blocks:
                    self.free.append(block.index)
                    continue
                self.blocks[block.key] = block
                self.recent[block.key] = None
                parent = self.blocks.get(block.parent)
                if parent is not None:
                    parent.refs += 1
                self.stats.stored_blocks += 1

    def _allocate(self) -> int | None:
        if self.free:
            return self.free.pop()
        victim = next((k for k in self.recent if self.blocks[k].refs == 0), None)
        if victim is None:
            return None
        block = self.blocks.pop(victim)
        del self.recent[victim]
        parent = self.blocks.get(block.parent)
        if parent is not None:
            parent.refs -= 1
        self.stats.evicted_blocks += 1
        return block.index

    def write_captured(self, layer: int, k: torch.Tensor, v: torch.Tensor, captures: list[Capture]) -> None:
        """From one causal forward's new K/V [B, n, kv_heads, head_dim], the captured blocks' tokens into the store."""
        rows = [c.row for c in captures for _ in c.blocks]
        offsets = [o for c in captures for o in c.offsets]
        index = [blk.index for c in captures for blk in c.blocks]
        dev = k.device
        r = torch.tensor(rows, device=dev)[:, None]
        pos = torch.tensor(offsets, device=dev)[:, None] + torch.arange(self.block_tokens, device=dev)[None, :]
        where = torch.tensor(index, device=dev)
        self.keys[layer][where] = k[r, pos]
        self.values[layer][where] = v[r, pos]
