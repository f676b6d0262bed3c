"""The experts of one MoE layer as two Triton grouped GEMMs, for bf16, fp8 and packed int4 weights.

The T tokens' top-k choices are P = T*k token-expert pairs. `align` sorts them by expert into blocks of
`block_m` rows, every block one expert's (its last block padded with an empty pair), at fixed sizes: the most
rows any routing can need, so shapes depend on the token count alone and a CUDA graph can hold them; blocks past
the end are marked and return at once. Then:

1. gate/up: each block's rows (gathered from the tokens in the kernel: no permuted copy of the activations)
   times its expert's [gate | up] rows, both in one pass over K, then GELU-tanh(gate) * up, into a [rows, M]
   intermediate in the sorted order;
2. down: the intermediate times the expert's down matrix, each row times its pair's routing weight, written to
   its pair's row of a [P, H] output; the top-k sum is one reduction over it, after.

Weights are read where they lie ([E, out, in], the input dim contiguous) and dequantized in registers: fp8 is cast
to the MMA dtype (exact) and the per-channel scale multiplies the finished sum; int4 nibbles become -8..7 and the
group's scale multiplies each K block's partial sum (a K block lies inside one group). With fp8 activations
(many rows per expert, where FP8 tensor cores pay), the rows are quantized per row beforehand and both operands
go to the MMA as fp8.

`reference` is the same computation in torch, in fp32 on dequantized weights, rounding where the kernels round
(each GEMM's output to the weights' dtype, as a bf16 GEMM would): what the kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.kernels.common import by_bits, mma_dtype, rounded, tl_dtype
from model.quant import Fp8Weight, Int4Weight, Weight, expert_linear, grouped_linear, quantize_rows_fp8, unpack_int4

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch paths need none of this
    triton = None

DENSE, FP8, INT4 = 0, 1, 2  # the FORMAT a kernel is specialized for


@dataclass(frozen=True)
class Tiles:
    block_m: int  # rows of a block: one expert's
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def tiles_for(pairs: int, experts: int) -> Tiles:
    """Tiles by rows per expert: few rows (a canvas or two) are a weight read, so small blocks waste no work on
    padding; many rows are compute, so large blocks reuse each weight tile over more rows. Each stage of the
    gate/up kernel holds an activation tile and two weight tiles in shared memory: bf16 at these sizes, 36, 48
    and 32 KB, three stages well within a Hopper SM's 228 KB."""
    per_expert = pairs / experts
    if per_expert <= 24:
        return Tiles(16, 64, 128, 4, 3)
    if per_expert <= 96:
        return Tiles(64, 64, 128, 4, 3)
    return Tiles(128, 64, 64, 8, 3)


@dataclass
class Blocks:
    pairs: torch.Tensor  # int32 [R]: the pair (token * k + choice) in each sorted row, P in padding rows
    expert: torch.Tensor  # int32 [R // block_m]: each block's expert, -1 past the last
    block_m: int


def align(experts: torch.Tensor, num_experts: int, block_m: int) -> Blocks:
    """Sort the pairs of `experts` [T, k] by expert into blocks of `block_m` rows, with torch ops of fixed sizes
    (no host reads): R = P + E * (block_m - 1) rows, rounded up to whole blocks, hold any routing."""
    flat = experts.reshape(-1)
    p, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    rank = torch.arange(p, device=dev) - (torch.cumsum(counts, 0) - counts)[by_expert]  # place among its expert's
    rows = -(-(p + num_experts * (block_m - 1)) // block_m) * block_m
    pairs = torch.full((rows,), p, dtype=torch.int32, device=dev)
    pairs.scatter_(0, (ends - padded)[by_expert] + rank, order.to(torch.int32))
    first_rows = torch.arange(0, rows, block_m, device=dev)
    expert = torch.searchsorted(ends, first_rows, right=True)  # the expert whose rows hold the block's first
    return Blocks(pairs, torch.where(expert < num_experts, expert, -1).to(torch.int32), block_m)


# ---------------------------------------------------------------- the torch reference


def dequantized(w: Weight) -> torch.Tensor:
    """[E, out, in] fp32 values of an expert weight."""
    if isinstance(w, Fp8Weight):
        return w.data.float() * w.scale
    if isinstance(w, Int4Weight):
        return unpack_int4(w.packed, w.scale, w.group, torch.float32)
    return w.float()


def _fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """x as per-row fp8 activations hold it (the values the FP8 GEMMs multiply)."""
    q, scale = quantize_rows_fp8(x)
    return q.float() * scale


def reference(
    z: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    gate_up: Weight,
    down: Weight,
    fp8_activations: bool = False,
) -> torch.Tensor:
    """sum_j weights[t, j] * down_e(GELU(gate_e(z_t)) * up_e(z_t)), e = experts[t, j]: [T, H] fp32."""
    w1, w2, dtype = dequantized(gate_up), dequantized(down), gate_up.dtype
    m = w1.shape[1] // 2
    rows = _fp8_rows if fp8_activations else (lambda x: x.float())
    out = torch.zeros(z.shape[0], w2.shape[1], dtype=torch.float32, device=z.device)
    for e in experts.unique().tolist():
        token, choice = (experts == e).nonzero(as_tuple=True)
        gate, up = (rows(z[token].to(dtype)) @ w1[e].T).to(dtype).float().split(m, dim=-1)
        inter = (F.gelu(gate, approximate="tanh").to(dtype).float() * up).to(dtype)
        y = (rows(inter) @ w2[e].T).to(dtype).float()
        out.index_add_(0, token, y * weights[token, choice, None])
    return out


def torch_experts(
    z: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: Weight, down: Weight, grouped: bool
) -> torch.Tensor:
    """What the network runs without the kernels: the pairs sorted by expert (a copy of their rows), then one
    grouped GEMM per projection (`grouped`: torch's grouped_mm; quantized weights dequantized a slice at a time)
    or a loop over the experts (which reads the counts on the host), and the weighted sum by index_add."""
    k, n_experts, dtype = experts.shape[1], gate_up.shape[0], gate_up.dtype
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    rows = z[token]
    # a fixed-size count (bincount's length depends on the data: no meta tensors, no whole compiled graph)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=z.device).scatter_add_(0, flat, torch.ones_like(flat))
    if grouped:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        gate, up = grouped_linear(rows, gate_up, offs).chunk(2, dim=-1)
        y = grouped_linear(F.gelu(gate, approximate="tanh") * up, down, offs)
    else:
        y = torch.empty(rows.shape[0], down.shape[1], dtype=dtype, device=z.device)
        begin = 0
        for e, cnt in enumerate(counts.tolist()):
            if cnt:
                sl = slice(begin, begin + cnt)
                gate, up = expert_linear(rows[sl], gate_up, e).chunk(2, dim=-1)
                y[sl] = expert_linear(F.gelu(gate, approximate="tanh") * up, down, e)
                begin += cnt
    y = y.float() * weights.reshape(-1)[order, None]
    out = torch.zeros(z.shape[0], down.shape[1], dtype=torch.float32, device=z.device)
    return out.index_add_(0, token, y)


# ---------------------------------------------------------------- the kernels

if triton is not None:

    @triton.jit
    def _gelu_tanh(x):
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * inner)  # 0.5 * x * (1 + tanh(inner)), as tanh(u) = 2 * sigmoid(2u) - 1

    @triton.jit
    def _accumulate(acc, a, w_ptr, s_ptr, e, n, n_ok, k0, K, stride_we, stride_wn, stride_se, stride_sn,
                    FORMAT: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr, MMA: tl.constexpr):  # fmt: skip
        """acc [BM, BN] += a [BM, BK] @ W[e, n, k0:k0+BK].T, W dequantized in registers (int4: with the
        group's scales; fp8: the channel scales are the caller's, once at the end)."""
        w_rows = w_ptr + e * stride_we + n[:, None] * stride_wn
        if FORMAT == 2:  # int4: bytes hold columns 2i (low nibble) and 2i+1 (high), stored + 8
            half = k0 // 2 + tl.arange(0, BK // 2)
            packed = tl.load(w_rows + half[None, :], mask=n_ok[:, None] & (half < K // 2)[None, :], other=0x88)
            low = (packed & 0xF).to(tl.int8) - 8
            high = (packed >> 4).to(tl.int8) - 8
            w = tl.interleave(low, high)  # [BN, BK]
            scale = tl.load(s_ptr + e * stride_se + n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
            part = tl.dot(a.to(MMA), tl.trans(w.to(MMA)))
            return acc + part * scale.to(tl.float32)[None, :]
        k = k0 + tl.arange(0, BK)
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
        return acc + tl.dot(a.to(MMA), tl.trans(w.to(MMA)))

    @triton.jit
    def _finish(acc, a_scale_ptr, rows, s_ptr, e, n, n_ok, stride_se, stride_sn,
                FORMAT: tl.constexpr, A_SCALED: tl.constexpr):  # fmt: skip
        """The scales that factor out of the whole sum: fp8 weights' per channel, fp8 activations' per row."""
        if FORMAT == 1:
            acc = acc * tl.load(s_ptr + e * stride_se + n * stride_sn, mask=n_ok, other=0.0)[None, :]
        if A_SCALED:
            acc = acc * tl.load(a_scale_ptr + rows)[:, None]
        return acc

    @triton.jit
    def _block(pairs_ptr, block_expert_ptr, P, BM: tl.constexpr):
        """This program's block: its expert (-1 past the last block), sorted rows, their pairs, which are real."""
        pid_m = tl.program_id(0)
        rows = pid_m * BM + tl.arange(0, BM)
        pair = tl.load(pairs_ptr + rows)
        return tl.load(block_expert_ptr + pid_m), rows, pair, pair < P

    @triton.jit
    def _rows_tile(a_ptr, a_rows, ok, stride_a, k0, K, BK: tl.constexpr):
        k = k0 + tl.arange(0, BK)
        return tl.load(a_ptr + a_rows[:, None] * stride_a + k[None, :], mask=ok[:, None] & (k < K)[None, :], other=0.0)

    @triton.jit
    def _gate_up_kernel(a_ptr, a_scale_ptr, pairs_ptr, block_expert_ptr, w_ptr, s_ptr, out_ptr,
                        P, K, M, stride_a, stride_we, stride_wn, stride_se, stride_sn, stride_out,
                        TOP_K: tl.constexpr, GATHER: tl.constexpr, FORMAT: tl.constexpr, GROUP: tl.constexpr,
                        A_SCALED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        MMA: tl.constexpr, BY_BITS: tl.constexpr):  # fmt: skip
        """out[row, j] = GELU(a_row @ gate_j) * (a_row @ up_j) for one block of sorted rows and BN columns j;
        a_row is the token's row (GATHER) or the sorted row itself (activations quantized beforehand)."""
        e, rows, pair, ok = _block(pairs_ptr, block_expert_ptr, P, BM)
        if e < 0:
            return
        if GATHER:
            a_rows = pair // TOP_K
        else:
            a_rows = rows
        j = tl.program_id(1) * BN + tl.arange(0, BN)
        j_ok = j < M
        gate = tl.zeros((BM, BN), dtype=tl.float32)
        up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = _rows_tile(a_ptr, a_rows, ok, stride_a, k0, K, BK)
            gate = _accumulate(gate, a, w_ptr, s_ptr, e, j, j_ok, k0, K, stride_we, stride_wn, stride_se, stride_sn,
                               FORMAT, GROUP, BK, MMA)  # fmt: skip
            up = _accumulate(up, a, w_ptr, s_ptr, e, j + M, j_ok, k0, K, stride_we, stride_wn, stride_se, stride_sn,
                             FORMAT, GROUP, BK, MMA)  # fmt: skip
        gate = _finish(gate, a_scale_ptr, rows, s_ptr, e, j, j_ok, stride_se, stride_sn, FORMAT, A_SCALED)
        up = _finish(up, a_scale_ptr, rows, s_ptr, e, j + M, j_ok, stride_se, stride_sn, FORMAT, A_SCALED)
        out_t = out_ptr.dtype.element_ty
        gate, up = rounded(gate, out_t, BY_BITS), rounded(up, out_t, BY_BITS)  # each GEMM's output dtype
        inter = rounded(rounded(_gelu_tanh(gate), out_t, BY_BITS) * up, out_t, BY_BITS)
        tl.store(out_ptr + rows[:, None] * stride_out + j[None, :], inter.to(out_t), mask=j_ok[None, :])

    @triton.jit
    def _down_kernel(a_ptr, a_scale_ptr, pairs_ptr, block_expert_ptr, route_ptr, w_ptr, s_ptr, out_ptr,
                     P, K, N, stride_a, stride_we, stride_wn, stride_se, stride_sn, stride_out,
                     FORMAT: tl.constexpr, GROUP: tl.constexpr, A_SCALED: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, MMA: tl.constexpr, ROUND_T: tl.constexpr,
                     BY_BITS: tl.constexpr):  # fmt: skip
        """out[pair, n] = route[pair] * (inter_row @ down_n) for one block of sorted rows and BN columns n."""
        e, rows, pair, ok = _block(pairs_ptr, block_expert_ptr, P, BM)
        if e < 0:
            return
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = n < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = _rows_tile(a_ptr, rows, ok, stride_a, k0, K, BK)
            acc = _accumulate(acc, a, w_ptr, s_ptr, e, n, n_ok, k0, K, stride_we, stride_wn, stride_se, stride_sn,
                              FORMAT, GROUP, BK, MMA)  # fmt: skip
        acc = _finish(acc, a_scale_ptr, rows, s_ptr, e, n, n_ok, stride_se, stride_sn, FORMAT, A_SCALED)
        route = tl.load(route_ptr + pair, mask=ok, other=0.0)
        y = rounded(acc, ROUND_T, BY_BITS) * route[:, None]
        tl.store(out_ptr + pair[:, None] * stride_out + n[None, :], y, mask=ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------- launching


@dataclass
class _Operand:
    """An expert weight as the kernels read it: values [E, out, in or in/2], scales, format, int4 group."""

    values: torch.Tensor
    scale: torch.Tensor
    fmt: int
    group: int
    dtype: torch.dtype

    @staticmethod
    def of(w: Weight) -> _Operand:
        if isinstance(w, Fp8Weight):
            return _Operand(w.data, w.scale, FP8, 1, w.dtype)
        if isinstance(w, Int4Weight):
            return _Operand(w.packed, w.scale, INT4, w.group, w.dtype)
        return _Operand(w, w, DENSE, 1, w.dtype)  # scale unused

    def block_k(self, wanted: int) -> int:
        """int4 K blocks lie within one group: the largest power-of-two split of `wanted` dividing the group."""
        k = wanted
        while self.fmt == INT4 and self.group % k:
            k //= 2
        if k < 16:
            raise ValueError(f"int4 group {self.group} admits no K block of 16 or more (a dot needs 16)")
        return k


def fused_experts(
    z: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: Weight, down: Weight
) -> torch.Tensor:
    """`run` as one opaque operator (dgs::fused_experts): torch.compile traces around it whole (fullgraph) and
    a CUDA graph captures its launches, with tiles and activations chosen from the shapes as `run` chooses."""
    w1, w2 = _Operand.of(gate_up), _Operand.of(down)
    fp8_tensor_cores = isinstance(gate_up, Fp8Weight) and gate_up.scaled_mm
    return _experts_op(z, experts, weights, w1.values, w1.scale, w2.values, w2.scale, w1.fmt, w1.group, w2.group,
                       fp8_tensor_cores)  # fmt: skip


def _weight(values: torch.Tensor, scale: torch.Tensor, fmt: int, group: int, dtype: torch.dtype, fp8_mm: bool):
    if fmt == FP8:
        return Fp8Weight(values, scale, dtype, fp8_mm)
    if fmt == INT4:
        return Int4Weight(values, scale, group, dtype)
    return values


@torch.library.custom_op("dgs::fused_experts", mutates_args=())
def _experts_op(
    z: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    s1: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    fmt: int,
    group1: int,
    group2: int,
    fp8_mm: bool,
) -> torch.Tensor:
    dtype = z.dtype
    gate_up, down = _weight(w1, s1, fmt, group1, dtype, fp8_mm), _weight(w2, s2, fmt, group2, dtype, fp8_mm)
    return run(z, experts, weights, gate_up, down)


@_experts_op.register_fake
def _(z, experts, weights, w1, s1, w2, s2, fmt, group1, group2, fp8_mm):
    return z.new_empty(z.shape[0], w2.shape[1], dtype=torch.float32)


def run(
    z: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    gate_up: Weight,
    down: Weight,
    tiles: Tiles | None = None,
    fp8_activations: bool | None = None,
) -> torch.Tensor:
    """The layer's experts on tokens z [T, H]: experts [T, k] chosen, weights [T, k] fp32 their routing weights
    (per-expert scales in); gate_up [E, 2M, H], down [E, H, M]. Returns [T, H] fp32, as `reference` does.
    fp8_activations: quantize the rows for FP8 tensor cores (default: fp8 weights on a device that has them,
    at blocks of 64 rows or more)."""
    t, k = experts.shape
    w1, w2 = _Operand.of(gate_up), _Operand.of(down)
    n_experts, two_m = w1.values.shape[:2]
    m, h_out = two_m // 2, w2.values.shape[1]
    tiles = tiles or tiles_for(t * k, n_experts)
    if fp8_activations is None:
        fp8_activations = isinstance(gate_up, Fp8Weight) and gate_up.scaled_mm and tiles.block_m >= 64
    if fp8_activations and not (w1.fmt == w2.fmt == FP8):
        raise ValueError("fp8 activations need fp8 weights")
    blocks = align(experts, n_experts, tiles.block_m)
    rows, p = blocks.pairs.numel(), t * k
    launch = dict(BM=tiles.block_m, BN=tiles.block_n, MMA=mma_dtype(w1.dtype, fp8_activations),
                  A_SCALED=fp8_activations, BY_BITS=by_bits(w1.dtype),
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages)  # fmt: skip
    if fp8_activations:  # the rows in sorted order, quantized per row (padding rows read token 0, masked after)
        a, a_scale = quantize_rows_fp8(z[blocks.pairs.clamp(max=p - 1).long() // k])
    else:
        a, a_scale = z.to(w1.dtype).contiguous(), z.new_zeros(1, dtype=torch.float32)
    inter = torch.empty(rows, m, dtype=w1.dtype, device=z.device)
    _gate_up_kernel[(rows // tiles.block_m, triton.cdiv(m, tiles.block_n))](
        a, a_scale, blocks.pairs, blocks.expert, w1.values, w1.scale, inter,
        p, z.shape[1], m, a.stride(0), *w1.values.stride()[:2], *w1.scale.stride()[:2], inter.stride(0),
        TOP_K=k, GATHER=not fp8_activations, FORMAT=w1.fmt, GROUP=w1.group, BK=w1.block_k(tiles.block_k), **launch,
    )  # fmt: skip
    a, a_scale = quantize_rows_fp8(inter) if fp8_activations else (inter, a_scale)
    out = torch.empty(p, h_out, dtype=torch.float32, device=z.device)
    _down_kernel[(rows // tiles.block_m, triton.cdiv(h_out, tiles.block_n))](
        a, a_scale, blocks.pairs, blocks.expert, weights.reshape(-1).float().contiguous(), w2.values, w2.scale, out,
        p, m, h_out, a.stride(0), *w2.values.stride()[:2], *w2.scale.stride()[:2], out.stride(0),
        FORMAT=w2.fmt, GROUP=w2.group, BK=w2.block_k(tiles.block_k), ROUND_T=tl_dtype(w2.dtype), **launch,
    )  # fmt: skip
    return out.view(t, k, h_out).sum(1)
