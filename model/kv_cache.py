"""A static, slot-based KV cache and the attention that reads it.

Memory is sized up front: `slots` requests, each up to `max_context` tokens. Full-attention layers keep
every token; sliding layers keep a ring of the last window-1 tokens (position p lives at index p % (W-1)),
which is all any later token or canvas may see. Storage is token-major [slot, token, kv_head, head_dim] so
that writes of right-padded batches are one indexed copy.

Attention rules (docs/architecture.md, "The network"):
- causal passes (prefill, commit): key p is visible to query q if p <= q, and on sliding layers p > q - W;
- denoise: every canvas token sees the whole cached context of its row (sliding layers: its last W-1
  tokens, the same set for every canvas token) and the whole canvas. Nothing is written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.config import TextConfig


class KVCache:
    def __init__(
        self, config: TextConfig, slots: int, max_context: int, device: torch.device | str, dtype: torch.dtype
    ):
        self.config = config
        self.slots = slots
        self.max_context = max_context
        self.window = config.sliding_window
        self.ring = max(1, min(config.sliding_window - 1, max_context))
        self.lengths = torch.zeros(slots, dtype=torch.int64, device=device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for i in range(config.num_layers):
            cap = self.ring if config.is_sliding(i) else max_context
            shape = (slots, cap, config.kv_heads[i], config.head_dims[i])
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        # set for one causal forward by a prefix cache (model/prefix_cache.py): (store, captures) whose blocks
        # are copied out of every layer's new K/V as the forward computes them
        self.capture: tuple | None = None

    def reset(self, slots: torch.Tensor) -> None:
        """Free slots for new requests (their stale entries are masked by length, so nothing is cleared)."""
        self.lengths[slots] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ---------------------------------------------------------------- attention

    def attention_plan(self, layer: int, pos, n: int, causal: bool, static: bool = False) -> tuple:
        """Everything about a layer kind's attention that does not depend on the layer: key count and mask.

        static (denoise only): attend over the whole cache capacity with a mask instead of the longest row's
        context, so the shapes depend on the row count alone and nothing waits on the device (compiled graphs)."""
        sliding = self.config.is_sliding(layer)
        device = pos.start.device
        start = pos.start
        if not causal:  # denoise: [cached context of the row | canvas], bidirectional
            ctx = self.visible(layer, start)
            if static:
                n_ctx = self.ring if sliding else self.max_context
            else:
                n_ctx = int(ctx.max())
                if bool((ctx == n_ctx).all()):
                    return n_ctx, None
            idx = torch.arange(n_ctx + n, device=device)
            mask = (idx[None, :] < ctx[:, None]) | (idx[None, :] >= n_ctx)
            return n_ctx, mask[:, None, None, :]
        q_pos = start[:, None] + torch.arange(n, device=device)[None, :]  # [B, n]
        if not sliding:  # keys are the slot's cache after this pass writes into it
            n_keys = int((start + pos.count).max())
            k_pos = torch.arange(n_keys, device=device)
            mask = k_pos[None, None, :] <= q_pos[:, :, None]
            return n_keys, mask[:, None]
        # sliding: keys are [ring as it was before this pass | the new tokens]
        n_ring = int(torch.clamp(start, max=self.ring).max())
        i = torch.arange(n_ring, device=device)[None, :]
        last = start[:, None] - 1
        ring_pos = i + self.ring * torch.div(last - i, self.ring, rounding_mode="floor")  # newest p = i mod ring
        ring_ok = (i < torch.clamp(start, max=self.ring)[:, None])[:, None, :] & (
            ring_pos[:, None, :] > q_pos[:, :, None] - self.window
        )
        j = torch.arange(n, device=device)
        new_ok = (j[None, :] <= j[:, None]) & (j[:, None] - j[None, :] < self.window)
        mask = torch.cat([ring_ok, new_ok[None].expand(start.shape[0], n, n)], dim=-1)
        return n_ring, mask[:, None]

    def visible(self, layer: int, start: torch.Tensor) -> torch.Tensor:
        """Cached entries a canvas of each row sees, the first ones of its slot: a full layer's every token, a
        sliding layer's ring (its first min(start, ring) entries are the valid ones)."""
        return torch.clamp(start, max=self.ring) if self.config.is_sliding(layer) else start

    def attend(self, layer: int, q, k, v, plan: tuple, pos, causal: bool) -> torch.Tensor:
        """q [B, n, heads, d], k/v [B, n, kv_heads, d] of the new tokens; returns [B, n, heads*d]."""
        n_keys, mask = plan
        sliding = self.config.is_sliding(layer)
        ck, cv = self.keys[layer], self.values[layer]
        if causal and self.capture is not None:
            store, captures = self.capture
            store.write_captured(layer, k, v, captures)
        if not causal:
            return denoise_attention(ck, cv, q, k, v, n_keys, mask, pos.slots)
        if not sliding:
            self._write(ck, cv, k, v, pos, keep_last=None)
            keys, values = ck[pos.slots, :n_keys], cv[pos.slots, :n_keys]
        else:
            keys = torch.cat([ck[pos.slots, :n_keys], k], dim=1)
            values = torch.cat([cv[pos.slots, :n_keys], v], dim=1)
            self._write(ck, cv, k, v, pos, keep_last=self.ring)
        return _sdpa(q, keys, values, mask)

    def _write(self, ck, cv, k, v, pos, keep_last: int | None) -> None:
        """Copy the valid new tokens of each row into its slot (a ring keeps only the last `keep_last`)."""
        n = k.shape[1]
        j = torch.arange(n, device=k.device)[None, :]
        valid = j < pos.count[:, None]
        if keep_last is not None:
            valid &= j >= pos.count[:, None] - keep_last
        rows, cols = valid.nonzero(as_tuple=True)
        dest = pos.start[rows] + cols
        if keep_last is not None:
            dest = dest % keep_last
        ck[pos.slots[rows], dest] = k[rows, cols]
        cv[pos.slots[rows], dest] = v[rows, cols]


def denoise_attention(ck, cv, q, k, v, n_keys: int, mask, slots) -> torch.Tensor:
    """A denoising pass's attention of one layer: its rows' first `n_keys` cached entries (ck, cv: the layer's
    cache) and the canvas, under `mask`; nothing is written. A function of tensors alone, so a compiled region of
    the network can take a layer's cache as an argument (model/network.py)."""
    keys = torch.cat([ck[slots, :n_keys], k], dim=1)
    values = torch.cat([cv[slots, :n_keys], v], dim=1)
    return _sdpa(q, keys, values, mask)


def _sdpa(q, keys, values, mask) -> torch.Tensor:
    """q [B, n, heads, d], keys/values [B, keys, kv_heads, d]; returns [B, n, heads*d]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=1.0, enable_gqa=True
    )
    b, n = q.shape[:2]
    return out.transpose(1, 2).reshape(b, n, -1)
