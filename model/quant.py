"""Quantized weights: what stands in NetworkWeights where a dense [out, in] matrix or [E, out, in] expert stack
would, and the products the network runs on them.

- fp8: float8 e4m3 values with one fp32 scale per output channel (the layout of the published FP8-dynamic
  checkpoints). Because the scale belongs to an output channel it factors out of the product:
  x @ (q * s).T == (x @ q.T) * s.T, so a product casts the fp8 values to the compute dtype (exact: every e4m3
  value is a bf16 value) and scales the output. On a GPU with FP8 tensor cores (compute capability 8.9 and
  up) the product runs in FP8 instead: activations are quantized per token on the fly (dynamic scales) and
  torch._scaled_mm multiplies with both scales.
- int4: weight-only, symmetric 4-bit integers in [-8, 7] packed two to a byte (even column in the low
  nibble), one scale per output channel and group of `group` input columns. A product dequantizes the matrix
  it needs (one layer's matrix, or one expert's) to the compute dtype and multiplies: the transient is one
  matrix, never a bf16 copy of the model.

Which tensors are quantized: the attention projections (QKV, O), the dense MLP (gate/up, down) and the
experts' fused 3-D tensors, which hold 90% of the parameters. The embedding (also the LM head), the router,
the self-conditioning MLP and the norms stay in the dense dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

WeightFormat = Literal["dense", "fp8", "int4"]
WEIGHT_FORMATS: tuple[str, ...] = ("dense", "fp8", "int4")
# F.grouped_mm is the public name from torch 2.10; torch._grouped_mm is the same operator in earlier releases
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
INT4_GROUP = 128
# A grouped expert product that dequantizes does it a slice of output channels at a time, for every expert of
# the layer at once: at most this many bytes of dequantized weights exist at any time (the released model's
# layer of experts is 1.5 GB in bf16). The slices are static, so a compiled graph keeps them.
DEQUANT_SLICE_BYTES = 256 << 20


def fp8_tensor_cores(device: torch.device) -> bool:
    """FP8 matrix products need Ada or Hopper (compute capability 8.9+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass
class Fp8Weight:
    data: torch.Tensor  # float8_e4m3fn [..., out, in]
    scale: torch.Tensor  # float32 [..., out, 1]
    dtype: torch.dtype  # what products run in when not in FP8
    scaled_mm: bool = False  # FP8 tensor cores (set on devices that have them)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def nbytes(self) -> int:
        return tensor_bytes(self.data, self.scale)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.data.float() * self.scale).to(dtype or self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W.T -> [..., out] in the compute dtype."""
        if self.scaled_mm:
            flat = x.reshape(-1, x.shape[-1])
            rows = flat.shape[0]
            if rows % 16:  # FP8 GEMMs take row counts in multiples of 16 (a prompt's tokens need not be)
                flat = F.pad(flat, (0, 0, 0, 16 - rows % 16))
            q, s = quantize_rows_fp8(flat)
            y = torch._scaled_mm(q, self.data.T, scale_a=s, scale_b=self.scale.T.contiguous(), out_dtype=self.dtype)
            return y[:rows].view(*x.shape[:-1], -1)
        return self._scale_out(x.to(self.dtype) @ self.data.to(self.dtype).T, self.scale)

    def expert_linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Rows routed to expert e: x [n, in] @ W[e].T."""
        return self._scale_out(x.to(self.dtype) @ self.data[e].to(self.dtype).T, self.scale[e])

    def _scale_out(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (y * scale.T).to(self.dtype)  # the product times fp32 scales: no bf16 rounding of the scale

    def grouped_linear(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, group ends `offs`: each group times its expert's W.T, in one grouped product."""
        if self.scaled_mm:
            q, s = quantize_rows_fp8(x)
            # rowwise scales: one per row of x, one per (expert, output channel)
            w = self.data.transpose(1, 2)
            return torch._scaled_grouped_mm(
                q, w, s.squeeze(-1), self.scale.squeeze(-1), offs=offs, out_dtype=self.dtype
            )
        return sliced_grouped_mm(x.to(self.dtype), offs, self.data.shape, self.dtype, self._dequantize_channels)

    def _dequantize_channels(self, a: int, b: int) -> torch.Tensor:
        w = self.data[:, a:b].to(self.dtype)  # one buffer of the slice, scaled in place
        return w.mul_(self.scale[:, a:b].to(self.dtype))


@dataclass
class Int4Weight:
    packed: torch.Tensor  # uint8 [..., out, in // 2]: column 2j in the low nibble, 2j+1 in the high one
    scale: torch.Tensor  # [..., out, in // group], the compute dtype (bf16 on GPU)
    group: int
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 2))

    def nbytes(self) -> int:
        return tensor_bytes(self.packed, self.scale)

    def dequantize(self, dtype: torch.dtype | None = None, e: int | None = None) -> torch.Tensor:
        packed, scale = (self.packed, self.scale) if e is None else (self.packed[e], self.scale[e])
        return unpack_int4(packed, scale, self.group, dtype or self.dtype)

    def _dequantize_channels(self, a: int, b: int) -> torch.Tensor:
        return unpack_int4(self.packed[:, a:b], self.scale[:, a:b], self.group, self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) @ self.dequantize().T

    def expert_linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return x.to(self.dtype) @ self.dequantize(e=e).T

    def grouped_linear(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return sliced_grouped_mm(x.to(self.dtype), offs, self.shape, self.dtype, self._dequantize_channels)


QuantizedWeight = Fp8Weight | Int4Weight
Weight = torch.Tensor | Fp8Weight | Int4Weight


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def nbytes(w: Weight) -> int:
    return tensor_bytes(w) if isinstance(w, torch.Tensor) else w.nbytes()


def sliced_grouped_mm(
    x: torch.Tensor, offs: torch.Tensor, shape: torch.Size, dtype: torch.dtype, dequantize
) -> torch.Tensor:
    """Rows sorted by expert times each expert's W.T, W [E, out, in] dequantized by `dequantize(a, b)` (output
    channels a:b of every expert) one slice at a time, so no more than DEQUANT_SLICE_BYTES of it exists."""
    experts, out, cols = shape
    per_channel = experts * cols * torch.finfo(dtype).bits // 8
    step = max(1, min(out, DEQUANT_SLICE_BYTES // per_channel))
    if step >= out:
        return grouped_mm(x, dequantize(0, out).transpose(1, 2), offs=offs)
    parts = [grouped_mm(x, dequantize(a, min(out, a + step)).transpose(1, 2), offs=offs) for a in range(0, out, step)]
    return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------- products the network calls


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x [..., in] @ w.T for a dense or quantized weight."""
    return x @ w.T if isinstance(w, torch.Tensor) else w.linear(x)


def expert_linear(x: torch.Tensor, w: Weight, e: int) -> torch.Tensor:
    return x @ w[e].T if isinstance(w, torch.Tensor) else w.expert_linear(x, e)


def grouped_linear(x: torch.Tensor, w: Weight, offs: torch.Tensor) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return grouped_mm(x, w.transpose(1, 2), offs=offs)
    return w.grouped_linear(x, offs)


def concat(ws: list[QuantizedWeight]) -> QuantizedWeight:
    """Matrices of one format joined along their output channels (QKV from Q, K and V; gate with up)."""
    first = ws[0]
    if len(ws) == 1:
        return first
    if isinstance(first, Fp8Weight):
        return Fp8Weight(
            torch.cat([w.data for w in ws], -2), torch.cat([w.scale for w in ws], -2), first.dtype, first.scaled_mm
        )
    if any(w.group != first.group for w in ws):
        raise ValueError("int4 matrices with different group sizes cannot be concatenated")
    return Int4Weight(
        torch.cat([w.packed for w in ws], -2), torch.cat([w.scale for w in ws], -2), first.group, first.dtype
    )


def stack(ws: list[QuantizedWeight]) -> QuantizedWeight:
    """Per-expert matrices [out, in] as one [E, out, in] weight."""
    first = ws[0]
    if isinstance(first, Fp8Weight):
        return Fp8Weight(
            torch.stack([w.data for w in ws]), torch.stack([w.scale for w in ws]), first.dtype, first.scaled_mm
        )
    return Int4Weight(torch.stack([w.packed for w in ws]), torch.stack([w.scale for w in ws]), first.group, first.dtype)


# ---------------------------------------------------------------- quantizers


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) FP8: x [n, k] -> (fp8 [n, k], fp32 scales [n, 1])."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_fp8(w: torch.Tensor, dtype: torch.dtype) -> Fp8Weight:
    """One scale per output channel (the second-to-last dim), from the channel's largest magnitude."""
    w = w.float()
    amax = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    scale = amax / FP8_MAX
    data = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return Fp8Weight(data, scale, dtype, scaled_mm=fp8_tensor_cores(w.device))


def int4_group(columns: int, group: int = INT4_GROUP) -> int:
    """The group size used for a matrix of `columns` inputs: `group` where it divides them, else one group per
    row (small shapes such as the test presets' 16-wide experts)."""
    return group if columns % group == 0 else columns


# Clipping ratios tried per group: the scale that rounds a group with the least squared error wins. Gaussian-like
# groups clip their largest values a little (about 0.9): 10-15% less error than scaling to the largest value.
INT4_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def quantize_int4(w: torch.Tensor, dtype: torch.dtype, group: int = INT4_GROUP) -> Int4Weight:
    """Symmetric round-to-nearest into [-8, 7] with one scale per group, chosen among clipping ratios of the
    group's largest magnitude / 7 for the least squared error. An expert stack goes a few experts at a time
    (about 64M values), so the transient is a slice of the layer, not the layer."""
    *lead, out, cols = w.shape
    if cols % 2:
        raise ValueError(f"int4 packing needs an even number of input columns, got {cols}")
    g = int4_group(cols, group)
    flat = w.reshape(-1, out, cols)
    step = max(1, (1 << 26) // (out * cols))
    parts = [_quantize_int4_groups(flat[i : i + step].float(), dtype, g) for i in range(0, flat.shape[0], step)]
    packed = torch.cat([p for p, _ in parts]).reshape(*lead, out, cols // 2)
    scale = torch.cat([s for _, s in parts]).reshape(*lead, out, cols // g)
    return Int4Weight(packed, scale, g, dtype)


def _quantize_int4_groups(w: torch.Tensor, dtype: torch.dtype, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [n, out, cols] fp32 -> (packed uint8 [n, out, cols // 2], scales [n, out, cols // g] in dtype)."""
    n, out, cols = w.shape
    grouped = w.reshape(n, out, cols // g, g)
    amax = grouped.abs().amax(dim=-1, keepdim=True)
    best_scale, best_err = None, None
    for ratio in INT4_CLIP_RATIOS:
        # the scale rounded to its stored dtype first, so dequantization uses exactly the stored value
        scale = (amax * ratio / 7).clamp(min=1e-12).to(dtype).float()
        err = (torch.round(grouped / scale).clamp(-8, 7) * scale - grouped).pow(2).sum(-1, keepdim=True)
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = torch.where(better, scale, best_scale), torch.minimum(err, best_err)
    q = torch.round(grouped / best_scale).clamp(-8, 7).to(torch.int16).reshape(n, out, cols)
    return pack_int4(q), best_scale.squeeze(-1).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed values in [-8, 7] [..., cols] -> uint8 [..., cols // 2] (stored with an offset of 8)."""
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, scale: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., out, cols // 2] and scales [..., out, cols // group] -> [..., out, cols] in `dtype`, written
    into one buffer in place (the transient is that buffer and one uint8 half)."""
    *lead, out, half = packed.shape
    w = torch.empty(*lead, out, half, 2, dtype=dtype, device=packed.device)
    w[..., 0].copy_(packed & 0x0F)
    w[..., 1].copy_(packed >> 4)
    w = w.view(*lead, out, 2 * half // group, group)
    return w.sub_(8).mul_(scale.unsqueeze(-1).to(dtype)).view(*lead, out, 2 * half)


def quantize(w: torch.Tensor, fmt: str, dtype: torch.dtype, group: int = INT4_GROUP) -> Weight:
    """w (fp32 values) in format `fmt`; "dense" casts it to `dtype`."""
    if fmt == "dense":
        return w.to(dtype).contiguous()
    if fmt == "fp8":
        return quantize_fp8(w, dtype)
    if fmt == "int4":
        return quantize_int4(w, dtype, group)
    raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, got {fmt!r}")
