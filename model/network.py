"""The DiffusionGemma text network: one set of weights, three forward kinds.

- prefill: causal encode of a prompt; writes the KV cache.
- denoise: bidirectional pass over a canvas that reads the cached context (sliding layers see the same last
  window-1 context tokens for every canvas row: the "rectangle" rule) and never writes the cache.
- commit: causal encode of a committed canvas at its positions; writes the cache.

Rows of one batch may sit at different context lengths. The residual stream is kept in fp32 whatever the
weight dtype; matrix products run in the compute dtype (see `compute_dtype`). Norm scales that feed a linear
layer are folded into its weight at build time, so each layer does one fused QKV product and one fused
dense-MLP+router product.
docs/architecture.md ("The network") gives the maths and the traps a re-implementation falls into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import FULL, SLIDING, TextConfig
from model.kernels import attention, moe, resolve
from model.kv_cache import KVCache, denoise_attention
from model.quant import Weight, linear


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim in fp32 (transformers uses pow(-0.5); rsqrt agrees to an ulp)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def scaled(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x (fp32) times a norm scale that was not folded into the next weight (see LayerWeights)."""
    return x if scale is None else x * scale.float()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x [B, n, heads, d] fp32, cos/sin [B, n, 1, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def inverse_frequencies(head_dim: int, theta: float, partial: float, proportional: bool) -> torch.Tensor:
    if proportional:
        # Only the first partial*head_dim/2 pairs rotate, with exponents over the FULL head_dim; the rest get 0.
        n_rot = int(partial * head_dim // 2)
        freq = 1.0 / theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.float) / head_dim)
        return torch.cat([freq, torch.zeros(head_dim // 2 - n_rot)])
    dim = int(head_dim * partial)
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def compute_dtype(device: torch.device | str, dtype: torch.dtype, mode: str = "auto") -> torch.dtype:
    """The dtype matrix products run in for weights of `dtype`.

    On a CPU without native bf16/fp16 dot-product instructions (no avx512_bf16 / amx), torch multiplies
    low-precision matrices 3-4x slower than fp32. There, "auto" keeps the weights' values (rounded to `dtype`)
    but stores and multiplies them in fp32: faster and at least as accurate. "native" always uses `dtype`.
    """
    if mode not in ("auto", "native"):
        raise ValueError(f"compute mode must be 'auto' or 'native', got {mode!r}")
    if mode == "native" or dtype == torch.float32 or torch.device(device).type != "cpu":
        return dtype
    native = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
    return dtype if _cpu_flags() & set(native.get(dtype, ())) else torch.float32


@dataclass
class LayerWeights:
    qkv: Weight  # [q + k (+ v), H], input-norm scale folded in
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: Weight
    post_attn_norm: torch.Tensor
    ffn_in: Weight  # [gate 2I | router E, H]: dense gate/up (pre-ff scale folded) and router (scale folded)
    down: Weight
    post_ff1: torch.Tensor
    post_ff2: torch.Tensor
    post_ff: torch.Tensor
    expert_gate_up: Weight  # [E, 2M, H], pre-ff-2 scale folded in
    expert_down: Weight  # [E, H, M]
    per_expert_scale: torch.Tensor
    # 0-d fp32, a tensor and not a float: a compiled region shared by every layer of one shape would otherwise
    # specialize on each layer's value and recompile per layer (they differ in every real checkpoint)
    layer_scalar: torch.Tensor
    # Quantized weights (model/quant.py) keep the router in the dense dtype, out of ffn_in, which is then
    # [gate 2I, H] only: top-k choices are where a small logit error changes the answer.
    router: torch.Tensor | None = None
    # Quantized weights are the checkpoint's own matrices, unfolded (a published FP8/INT4 checkpoint holds them
    # that way, and a norm scale folded into an input column would move every value off the quantized grid):
    # the input norm, pre-FF and pre-FF-2 scales then multiply the activations instead.
    in_norm: torch.Tensor | None = None
    pre_ff: torch.Tensor | None = None
    pre_ff2: torch.Tensor | None = None


@dataclass
class NetworkWeights:
    embed: torch.Tensor  # [V, H], also the tied LM head
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    sc_gate_up: torch.Tensor  # self-conditioning [2I, H], pre-norm scale folded in
    sc_down: torch.Tensor


@dataclass
class Positions:
    """Where a batch's new tokens sit: per row, its cache slot, first position and number of valid tokens."""

    slots: torch.Tensor  # [B] int64
    start: torch.Tensor  # [B] int64: tokens already cached for that slot
    count: torch.Tensor  # [B] int64: valid tokens in this row (rows are right-padded to the longest)


class Network:
    def __init__(
        self,
        config: TextConfig,
        weights: NetworkWeights,
        weight_dtype: torch.dtype | None = None,
        use_grouped_mm: bool | None = None,
        kernels: str = "auto",
    ):
        self.config = config
        self.w = weights
        self.dtype = weights.embed.dtype  # what products run in
        self.weight_dtype = weight_dtype or self.dtype  # the precision of the weight values
        self.device = weights.embed.device
        c = config
        # sqrt(hidden) rounded to the weight dtype, as transformers' scaled embedding does (53.0 in bf16 for 2816).
        self.embed_scale = float(torch.tensor(c.hidden_size**0.5).to(self.weight_dtype))
        self.inv_freq = {}
        for kind in (SLIDING, FULL):
            if kind in c.layer_types:
                hd = c.head_dims[c.layer_types.index(kind)]
                spec = c.rope[kind]
                self.inv_freq[kind] = inverse_frequencies(
                    hd, spec.theta, spec.partial_rotary_factor, spec.proportional
                ).to(self.device)
        if use_grouped_mm is None:  # one grouped GEMM for all experts where torch has a fast kernel for it
            use_grouped_mm = self.device.type == "cuda" and self.dtype == torch.bfloat16
        self.use_grouped_mm = use_grouped_mm
        self.kernels = resolve(kernels, self.device)  # "triton": model/kernels/ (CUDA); "torch": the code here
        self.regions: dict[tuple[bool, int, int], object] | None = None  # compile_regions: the compiled layers

    # ---------------------------------------------------------------- the three forward kinds

    @torch.inference_mode()
    def prefill(self, cache: KVCache, slots: torch.Tensor, ids: torch.Tensor, count: torch.Tensor) -> None:
        """Encode prompts (right-padded ids [B, n]) causally after whatever the slots already hold."""
        self._encode(cache, slots, ids, count)

    @torch.inference_mode()
    def commit(self, cache: KVCache, slots: torch.Tensor, canvas: torch.Tensor) -> None:
        """Encode committed canvases [B, C] at their positions, appending them to the cache."""
        count = torch.full((canvas.shape[0],), canvas.shape[1], dtype=torch.int64, device=canvas.device)
        self._encode(cache, slots, canvas, count)

    def denoise_graph(
        self,
        cache: KVCache,
        slots: torch.Tensor,
        canvas: torch.Tensor,
        soft_embedding: torch.Tensor | None,
        static: bool = False,
    ) -> torch.Tensor:
        """One bidirectional pass over canvases [B, C]; returns final-normed hidden states [B, C, H] fp32.

        soft_embedding [B, C, H] is the previous step's probabilities @ embedding * scale (zeros for a row on
        its first step, which gives exactly the signal transformers gives when it has no logits to feed back).
        static: shapes that depend on the row count only (see KVCache.attention_plan), for compiled graphs.

        This is what torch.compile traces; eager callers use `denoise`, the same forward in inference mode.
        Traced inside a graph, the inference-mode context makes AOT autograd fail on the expert weights'
        transposes ("Cannot set version_counter for inference tensor"), so a compiled caller enters it outside.
        """
        c = self.config
        b, n = canvas.shape
        x = self.embed(canvas)
        if soft_embedding is not None:
            u = (rms(soft_embedding, c.rms_norm_eps)).to(self.dtype)
            gate, up = (u @ self.w.sc_gate_up.T).chunk(2, dim=-1)
            x = x + ((gelu_tanh(gate) * up) @ self.w.sc_down.T).float()
        x = rms(x, c.rms_norm_eps)  # post-norm without a scale
        start = cache.lengths[slots]
        pos = Positions(slots, start, torch.full_like(start, n))
        x = self._layers(x, pos, cache, causal=False, static=static)
        return rms(x, c.rms_norm_eps) * self.w.final_norm.float()

    denoise = torch.inference_mode()(denoise_graph)

    # ---------------------------------------------------------------- heads

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.w.embed[ids].float() * self.embed_scale

    def soft_embedding(self, probs: torch.Tensor) -> torch.Tensor:
        """Self-conditioning state: probabilities [.., V] @ embedding * scale, in fp32 [.., H]."""
        return (probs.to(self.dtype) @ self.w.embed).float() * self.embed_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Plain softcapped fp32 logits, exactly as transformers computes them (used by tests and tools)."""
        cap = self.config.final_logit_softcapping
        raw = (hidden.to(self.dtype) @ self.w.embed.T).float()
        return torch.tanh(raw / cap) * cap

    # ---------------------------------------------------------------- internals

    def _encode(self, cache: KVCache, slots: torch.Tensor, ids: torch.Tensor, count: torch.Tensor) -> None:
        start = cache.lengths[slots]
        end = start + count
        if int(end.max()) > cache.max_context:
            raise ValueError(f"context of {int(end.max())} tokens exceeds the cache's {cache.max_context}")
        x = self.embed(ids)
        self._layers(x, Positions(slots, start, count), cache, causal=True)
        cache.lengths[slots] = end

    def _rope(self, kind: str, pos: Positions, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = (pos.start[:, None] + torch.arange(n, device=pos.start.device)[None, :]).float()
        freqs = p[..., None] * self.inv_freq[kind]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()

    def _layers(
        self, x: torch.Tensor, pos: Positions, cache: KVCache, causal: bool, static: bool = False
    ) -> torch.Tensor:
        c = self.config
        n = x.shape[1]
        rope = {kind: self._rope(kind, pos, n) for kind in self.inv_freq}
        masks: dict[str, tuple] = {}
        regional = self.regions is not None and static and not causal
        if regional and x.shape[0] > 1:  # every row count past one shares a region's graph (one row: its own)
            for t in (x, pos.slots, *(t for pair in rope.values() for t in pair)):
                torch._dynamo.mark_dynamic(t, 0)
        for i, lw in enumerate(self.w.layers):
            kind = c.layer_types[i]
            if kind not in masks:  # the kernel takes each row's visible cache entries instead of a mask
                kernel = not causal and self._attention_kernel(c.head_dims[i])
                masks[kind] = (
                    (None, cache.visible(i, pos.start)) if kernel else cache.attention_plan(i, pos, n, causal, static)
                )
            if regional:  # one compiled region per layer shape, reused by every layer of that shape
                if x.shape[0] > 1:
                    torch._dynamo.mark_dynamic(masks[kind][1], 0)
                cos, sin = rope[kind]
                region = self.regions[self._shape_of(i)]
                x = region(lw, x, cos, sin, masks[kind][1], pos.slots, cache.keys[i], cache.values[i])
            else:
                x = self._layer(i, lw, x, rope[kind], masks[kind], pos, cache, causal)
        return x

    def _shape_of(self, i: int) -> tuple[bool, int, int]:
        c = self.config
        return c.is_sliding(i), c.head_dims[i], c.kv_heads[i]

    def compile_regions(self, backend: str = "inductor") -> None:
        """Compile the denoising pass layer by layer: one `torch.compile(fullgraph=True)` region per distinct
        layer shape (sliding or full, head size, KV heads), which every layer of that shape then calls with its
        own weights and cache. The released model's 30 layers are two shapes: two graphs to build instead of one
        30-layer graph (which took over 200 s to compile on an H200). Weights, the layer scalar and the cache are
        tensor arguments, not constants of the graph, which is what lets the layers share it; the row count is
        dynamic past one row (`_layers` marks it), so a region is two graphs whatever the row buckets."""
        self.regions = {}
        for shape in sorted({self._shape_of(i) for i in range(self.config.num_layers)}):
            sliding, hd, kvh = shape

            def region(lw, x, cos, sin, mask, slots, ck, cv, sliding=sliding, hd=hd, kvh=kvh):
                return self._denoise_layer(sliding, hd, kvh, lw, x, cos, sin, mask, slots, ck, cv)

            self.regions[shape] = torch.compile(region, fullgraph=True, backend=backend)

    def _denoise_layer(self, sliding: bool, hd: int, kvh: int, lw, x, cos, sin, mask, slots, ck, cv):
        """One layer of a static denoising pass, as a function of its shape and tensors alone (a compiled
        region): the cache is read over its whole capacity (ck.shape[1] entries) under the mask."""
        q, k, v = self._qkv(sliding, hd, kvh, lw, x, cos, sin)
        if self._attention_kernel(hd):  # `mask` is then each row's visible cache entries (KVCache.visible)
            attn = attention.denoise(ck, cv, q, k, v, slots, mask)
        else:
            attn = denoise_attention(ck, cv, q, k, v, ck.shape[1], mask, slots)
        return self._after_attention(lw, x, attn)

    def _attention_kernel(self, head_dim: int) -> bool:
        return self.kernels == "triton" and attention.supports(head_dim)

    def _layer(self, i, lw: LayerWeights, x, rope, plan, pos: Positions, cache: KVCache, causal: bool):
        cos, sin = rope
        q, k, v = self._qkv(*self._shape_of(i), lw, x, cos, sin)
        if not causal and self._attention_kernel(q.shape[-1]):
            attn = attention.denoise(cache.keys[i], cache.values[i], q, k, v, pos.slots, plan[1])
        else:
            attn = cache.attend(i, q, k, v, plan, pos, causal)  # [B, n, heads*hd]
        return self._after_attention(lw, x, attn)

    def _qkv(self, sliding: bool, hd: int, kvh: int, lw: LayerWeights, x, cos, sin):
        c = self.config
        eps = c.rms_norm_eps
        b, n, _ = x.shape
        heads = c.num_attention_heads
        qkv = linear(scaled(rms(x, eps), lw.in_norm).to(self.dtype), lw.qkv)
        q_size, k_size = heads * hd, kvh * hd
        q = qkv[..., :q_size].view(b, n, heads, hd)
        k_raw = qkv[..., q_size : q_size + k_size].view(b, n, kvh, hd)
        v_raw = qkv[..., q_size + k_size :].view(b, n, kvh, hd) if sliding else k_raw
        q = rotate(rms(q, eps) * lw.q_norm.float(), cos, sin).to(self.dtype)
        k = rotate(rms(k_raw, eps) * lw.k_norm.float(), cos, sin).to(self.dtype)
        v = rms(v_raw, eps).to(self.dtype)  # full layers: V is the normalised raw k_proj, no learned scale
        return q, k, v

    def _after_attention(self, lw: LayerWeights, x, attn):
        """The attention output's projection, then the dense MLP and the experts, with their norms."""
        c = self.config
        eps = c.rms_norm_eps
        b, n, _ = x.shape
        x = x + rms(linear(attn, lw.o), eps) * lw.post_attn_norm.float()

        residual = x
        normed = rms(residual, eps)
        z = normed.to(self.dtype)
        if lw.router is None:  # folded: [gate | up | router] in one product
            fused = z @ lw.ffn_in.T
            router_logits = fused[..., 2 * c.intermediate_size :]
        else:
            fused = linear(scaled(normed, lw.pre_ff).to(self.dtype), lw.ffn_in)
            router_logits = z @ lw.router.T
        inter = c.intermediate_size
        gate, up = fused[..., :inter], fused[..., inter : 2 * inter]
        m1 = rms(linear(gelu_tanh(gate) * up, lw.down), eps) * lw.post_ff1.float()
        expert_in = z if lw.pre_ff2 is None else scaled(normed, lw.pre_ff2).to(self.dtype)
        m2 = self._experts(lw, expert_in.reshape(b * n, -1), router_logits.reshape(b * n, -1))
        m2 = rms(m2.view(b, n, -1), eps) * lw.post_ff2.float()
        x = residual + rms(m1 + m2, eps) * lw.post_ff.float()
        return x * lw.layer_scalar

    def _experts(self, lw: LayerWeights, z: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """Top-k MoE; routing probabilities in fp32 from the raw-residual router, renormalised, per-expert scaled."""
        c = self.config
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, experts = torch.topk(probs, c.top_k_experts, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True) * lw.per_expert_scale.float()[experts]
        if self.kernels == "triton":
            return moe.fused_experts(z, experts, weights, lw.expert_gate_up, lw.expert_down)
        return moe.torch_experts(z, experts, weights, lw.expert_gate_up, lw.expert_down, self.use_grouped_mm)
