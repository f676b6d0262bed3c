"""A denoising pass's attention as one Triton kernel that reads the slot cache where it lies.

Each canvas token of row b sees the row's first ctx[b] cached entries (a full layer's tokens; a sliding layer's
ring, whose valid entries are its first min(start, ring): the same set for every canvas token) and the whole
canvas, bidirectionally; scale 1 (queries and keys are RMS-normed). One program takes BM queries of one head:
it walks the row's cache entries in place (no gather, no concatenation with the canvas, no mask tensor: ctx is
the bound) and then the canvas keys, with an online softmax in fp32; query heads share their group's KV head.
Head dims 256 and 512 are one tile each (FlashAttention stops at 256). Nothing waits on the host: ctx is read on
the device, so a CUDA graph holds it.

The reference is model/kv_cache.py's `denoise_attention` (SDPA over the gathered keys under a mask).
"""

from __future__ import annotations

import torch

from model.kernels.common import by_bits, mma_dtype, rounded

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _attend_block(q, acc, m_i, l_i, k_ptrs, v_ptrs, ok, MMA: tl.constexpr):
        """Fold one block of keys (those with `ok`) into the running softmax (max m_i, sum l_i, output acc)."""
        keys = tl.load(k_ptrs, mask=ok[:, None], other=0.0).to(MMA)
        s = tl.dot(q, tl.trans(keys)) * 1.4426950408889634  # base 2: exp2 below
        s = tl.where(ok[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        values = tl.load(v_ptrs, mask=ok[:, None], other=0.0).to(MMA)
        acc = acc * alpha[:, None] + tl.dot(p.to(MMA), values)
        return acc, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _denoise_kernel(q_ptr, k_ptr, v_ptr, ck_ptr, cv_ptr, slots_ptr, ctx_ptr, out_ptr, n,
                        sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sc_s, sc_t, sc_h, so_b, so_n, so_h,
                        GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        MMA: tl.constexpr, BY_BITS: tl.constexpr):  # fmt: skip
        b, h = tl.program_id(0), tl.program_id(1)
        kv = h // GROUP
        rows = tl.program_id(2) * BM + tl.arange(0, BM)
        row_ok = rows < n
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_n + h * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
        q = q.to(MMA)
        m_i = tl.full((BM,), -float("inf"), dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, D), dtype=tl.float32)
        slot, ctx = tl.load(slots_ptr + b), tl.load(ctx_ptr + b)
        cache = slot * sc_s + kv * sc_h + d[None, :]
        for j0 in range(0, ctx, BN):  # the row's cached context, in place
            j = j0 + tl.arange(0, BN)
            at = cache + j[:, None] * sc_t
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, ck_ptr + at, cv_ptr + at, j < ctx, MMA)
        canvas = b * sk_b + kv * sk_h + d[None, :]
        for j0 in range(0, n, BN):  # the canvas
            j = j0 + tl.arange(0, BN)
            at = canvas + j[:, None] * sk_n
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, k_ptr + at, v_ptr + at, j < n, MMA)
        out_t = out_ptr.dtype.element_ty
        out = rounded(acc / l_i[:, None], out_t, BY_BITS).to(out_t)
        tl.store(out_ptr + b * so_b + rows[:, None] * so_n + h * so_h + d[None, :], out, mask=row_ok[:, None])


def supports(head_dim: int) -> bool:
    """One tile per head: a power of two, and at least 16 for the dot."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _blocks(head_dim: int) -> tuple[int, int, int]:
    """(BM, BN, warps). Shared memory holds the query tile and, per stage (two), a key and a value tile: 160 KB
    at either head dim, within a Hopper SM's 228 KB; the fp32 output tile in registers is 64 per thread."""
    return (32, 32, 8) if head_dim >= 512 else (64, 64, 8)


@torch.library.custom_op("dgs::denoise_attention", mutates_args=())
def denoise(
    ck: torch.Tensor,
    cv: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    ctx: torch.Tensor,
    blocks: list[int] | None = None,
) -> torch.Tensor:
    """q [B, n, heads, d], k/v [B, n, kv_heads, d] of the canvas; ck/cv [slots, capacity, kv_heads, d] the layer's
    cache; ctx [B] the cached entries each row sees. Returns [B, n, heads * d] in q's dtype. An opaque operator:
    compiled regions trace around it. blocks: (BM, BN, warps), else by head dim."""
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    b, n, heads, d = q.shape
    bm, bn, warps = blocks or _blocks(d)
    out = torch.empty(b, n, heads, d, dtype=q.dtype, device=q.device)
    _denoise_kernel[(b, heads, triton.cdiv(n, bm))](
        q, k, v, ck, cv, slots, ctx, out, n, *q.stride()[:3], *k.stride()[:3], *ck.stride()[:3], *out.stride()[:3],
        GROUP=heads // k.shape[2], D=d, BM=bm, BN=bn, MMA=mma_dtype(q.dtype), BY_BITS=by_bits(q.dtype),
        num_warps=warps, num_stages=2,
    )  # fmt: skip
    return out.view(b, n, heads * d)


@denoise.register_fake
def _(ck, cv, q, k, v, slots, ctx, blocks=None):
    b, n, heads, d = q.shape
    return q.new_empty(b, n, heads * d)
