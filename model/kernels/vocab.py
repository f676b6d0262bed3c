"""The vocabulary pass between the LM head and the soft embedding as one Triton kernel per tile of tokens.

The denoiser's pass (model/denoiser.py `_vocab_pass`, model/sampler.py) turns each token's raw LM-head row into:
the softcapped logit's argmax and max (as sigmoid(raw), since cap * tanh(x / cap) = 2 * cap * sigmoid(2x / cap) -
cap and the raw row is already 2x / cap), the tempered unnormalised weights w = exp((sig - max) * s) with
s = 2 * cap / T, their sum z, the entropy log z - sum(w * shifted) / z, and a categorical sample by inverse CDF over
128-wide blocks (the block holding u * z, then the index within it). In torch that is about ten passes over an
fp32 [tokens, V] tile. Here each token's row is read twice (max and argmax; then the weights, written in the
GEMM dtype for the soft embedding's product, their 128-block sums and the entropy's sums) and one block a third
time (the draw), with nothing in fp32 the size of the vocabulary. The GEMMs on either side stay torch's.

The reference is the torch pass itself: sampler.row_max, entropy_and_weights and draw on sigmoid(raw).
"""

from __future__ import annotations

import torch

from model.kernels.common import by_bits, rounded

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SUB = 128  # the draw's block: model/sampler.py's BLOCK

if triton is not None:

    @triton.jit
    def _tempered(raw_ptrs, ok, top, scale):
        """(sigmoid(raw) - top) * scale, and its exp, over one chunk of a row (masked entries weigh nothing)."""
        sig = tl.sigmoid(tl.load(raw_ptrs, mask=ok, other=0.0).to(tl.float32))
        shifted = tl.where(ok, (sig - top) * scale, 0.0)
        return shifted, tl.where(ok, tl.exp(shifted), 0.0)

    @triton.jit
    def _row_max(raw_row, V, BV: tl.constexpr):
        """The row's largest sigmoid(raw) and its first index."""
        best = tl.full((), -float("inf"), tl.float32)
        best_at = tl.full((), 0, tl.int64)
        for v0 in range(0, V, BV):
            v = v0 + tl.arange(0, BV)
            sig = tl.where(v < V, tl.sigmoid(tl.load(raw_row + v, mask=v < V, other=0.0).to(tl.float32)), -float("inf"))
            m = tl.max(sig, 0)
            at = v0 + tl.argmax(sig, 0, tie_break_left=True).to(tl.int64)
            best_at = tl.where(m > best, at, best_at)  # strictly greater: the first index on ties
            best = tl.maximum(best, m)
        return best, best_at

    @triton.jit
    def _vocab_kernel(raw_ptr, scale_ptr, uniform_ptr, w_ptr, bsum_ptr, top_ptr, argmax_ptr, entropy_ptr, norm_ptr,
                      sample_ptr, V, stride_raw, stride_w, stride_bs, BV: tl.constexpr, SUBV: tl.constexpr,
                      CHUNK: tl.constexpr, BY_BITS: tl.constexpr):  # fmt: skip
        t = tl.program_id(0)
        raw_row, scale = raw_ptr + t * stride_raw, tl.load(scale_ptr + t)
        top, top_at = _row_max(raw_row, V, BV)
        z = tl.zeros((), tl.float32)
        dot = tl.zeros((), tl.float32)
        w_t = w_ptr.dtype.element_ty
        for v0 in range(0, V, BV):  # the weights, their block sums, the entropy's sums
            v = v0 + tl.arange(0, BV)
            shifted, w = _tempered(raw_row + v, v < V, top, scale)
            tl.store(w_ptr + t * stride_w + v, rounded(w, w_t, BY_BITS).to(w_t), mask=v < V)
            sums = tl.sum(tl.reshape(w, (BV // SUBV, SUBV)), 1)
            blocks = v0 // SUBV + tl.arange(0, BV // SUBV)
            tl.store(bsum_ptr + t * stride_bs + blocks, sums, mask=blocks < V // SUBV)
            z += tl.sum(w, 0)
            dot += tl.sum(w * shifted, 0)
        # the draw: the first block whose cumulative sum passes u * z, then the index within it
        target = tl.load(uniform_ptr + t) * z
        n_blocks = V // SUBV
        running = tl.zeros((), tl.float32)
        k = tl.full((), -1, tl.int64)
        before = tl.zeros((), tl.float32)
        for b0 in range(0, n_blocks, CHUNK):
            b = b0 + tl.arange(0, CHUNK)
            sums = tl.load(bsum_ptr + t * stride_bs + b, mask=b < n_blocks, other=0.0)
            cum = tl.cumsum(sums, 0) + running
            past = (cum > target) & (b < n_blocks)
            first = tl.min(tl.where(past, b, n_blocks), 0)
            found = (k < 0) & (first < n_blocks)
            # the cumulative sum before the block: its predecessor's, or the last chunk's end
            prior = tl.where(first == b0, running, tl.sum(tl.where(b == first - 1, cum, 0.0), 0))
            before = tl.where(found, prior, before)
            k = tl.where(found, first.to(tl.int64), k)
            running = tl.max(tl.where(b < n_blocks, cum, 0.0), 0)
        last = k < 0  # u * z rounded past the total: the last block, as the torch draw clamps
        before = tl.where(last, running - tl.load(bsum_ptr + t * stride_bs + n_blocks - 1), before)
        k = tl.where(last, n_blocks - 1, k)
        inner = k * SUBV + tl.arange(0, SUBV)
        _, w = _tempered(raw_row + inner, inner < V, top, scale)
        cum = tl.cumsum(w, 0)
        j = tl.min(tl.where(cum > target - before, tl.arange(0, SUBV), SUBV - 1), 0)
        tl.store(top_ptr + t, top)
        tl.store(argmax_ptr + t, top_at)
        tl.store(entropy_ptr + t, tl.log(z) - dot / z)
        tl.store(norm_ptr + t, z)
        tl.store(sample_ptr + t, k * SUBV + j)


def supports(vocab_size: int) -> bool:
    return vocab_size % SUB == 0


@torch.library.custom_op("dgs::vocab_pass", mutates_args=("weights",))
def fused(
    raw: torch.Tensor, scale: torch.Tensor, uniform: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw [n, V] the LM head's rows of hidden * 2 / cap; scale [n] 2 * cap / T; uniform [n] the draws' numbers.
    Writes the unnormalised weights into `weights` [n, V] (their dtype: the soft embedding's GEMM) and returns
    (top sigmoid [n], argmax [n], entropy [n], z [n], sample [n]) as the torch pass gives them."""
    n, v = raw.shape
    dev = raw.device
    outs = [torch.empty(n, device=dev) for _ in range(3)]
    ids = [torch.empty(n, dtype=torch.int64, device=dev) for _ in range(2)]
    block_sums = torch.empty(n, v // SUB, device=dev)
    bv = min(4096, triton.next_power_of_2(v))
    _vocab_kernel[(n,)](
        raw, scale, uniform, weights, block_sums, outs[0], ids[0], outs[1], outs[2], ids[1], v,
        raw.stride(0), weights.stride(0), block_sums.stride(0),
        BV=bv, SUBV=SUB, CHUNK=min(1024, triton.next_power_of_2(v // SUB)), BY_BITS=by_bits(weights.dtype),
        num_warps=8 if bv >= 2048 else 4,
    )  # fmt: skip
    top, entropy, norm = outs
    return top, ids[0], entropy, norm, ids[1]


@fused.register_fake
def _(raw, scale, uniform, weights):
    n = raw.shape[0]
    f, i = raw.new_empty(n, dtype=torch.float32), raw.new_empty(n, dtype=torch.int64)
    return f, i, f.clone(), f.clone(), i.clone()
