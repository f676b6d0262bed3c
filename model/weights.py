"""Load a Hugging Face-format DiffusionGemma checkpoint into our network (model/checkpoint.py finds and reads it).

Tensors are read one at a time with safetensors, straight onto the target device, and each layer is folded
(norm scales into the linear layer that follows, QKV and dense-MLP+router concatenated) in fp32 before the
cast to the target dtype. Every text tensor the config implies must be present with its exact shape; anything
else that is not the vision tower is an error, never a silently random weight.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from model.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from model.compressed import CompressedCheckpoint, quantization_config
from model.config import TextConfig
from model.network import LayerWeights, Network, NetworkWeights, compute_dtype
from model.quant import INT4_GROUP, WEIGHT_FORMATS, QuantizedWeight, Weight, concat, quantize

log = logging.getLogger(__name__)

DEC = "model.decoder."
ENC = "model.encoder.language_model."
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
PROGRESS_BYTES = 1 << 30  # show a progress bar for checkpoints above 1 GiB


def expected_shapes(c: TextConfig) -> dict[str, tuple[int, ...]]:
    """Every text tensor a checkpoint must hold, by its transformers name."""
    h, inter = c.hidden_size, c.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        DEC + "embed_tokens.weight": (c.vocab_size, h),
        DEC + "norm.weight": (h,),
        DEC + "self_conditioning.pre_norm.weight": (h,),
        DEC + "self_conditioning.gate_proj.weight": (inter, h),
        DEC + "self_conditioning.up_proj.weight": (inter, h),
        DEC + "self_conditioning.down_proj.weight": (h, inter),
    }
    for i in range(c.num_layers):
        p = f"{DEC}layers.{i}."
        hd, kvh, heads = c.head_dims[i], c.kv_heads[i], c.num_attention_heads
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (heads * hd, h),
                p + "self_attn.k_proj.weight": (kvh * hd, h),
                p + "self_attn.o_proj.weight": (h, heads * hd),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "router.proj.weight": (c.num_experts, h),
                p + "router.scale": (h,),
                p + "router.per_expert_scale": (c.num_experts,),
                p + "experts.gate_up_proj": (c.num_experts, 2 * c.moe_intermediate_size, h),
                p + "experts.down_proj": (c.num_experts, h, c.moe_intermediate_size),
                p + "layer_scalar": (1,),
                f"{ENC}layers.{i}.layer_scalar": (1,),
            }
        )
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
        ):
            shapes[p + norm + ".weight"] = (h,)
        if c.is_sliding(i):
            shapes[p + "self_attn.v_proj.weight"] = (kvh * hd, h)
    return shapes


def _tied_duplicate(name: str) -> bool:
    """Tensors some exporters store twice although they are tied to a decoder tensor."""
    if name == "lm_head.weight" or name.startswith("model.encoder.language_model.embed_tokens."):
        return True
    return name.startswith(ENC) and not name.endswith("layer_scalar")


def build_weights(
    c: TextConfig,
    get: Callable[[str], torch.Tensor],
    names: set[str],
    shape_of: Callable[[str], tuple[int, ...]],
    device: torch.device | str,
    dtype: torch.dtype,
    progress: bool = False,
    compute_mode: str = "auto",
    weights: str = "dense",
    group: int = INT4_GROUP,
    prequantized: Callable[[str, torch.dtype], QuantizedWeight] | None = None,
) -> NetworkWeights:
    """Check names and shapes, then fold and cast tensors fetched one by one with `get`. weights: "dense", or
    "fp8" / "int4" to quantize the attention, dense-MLP and expert matrices as they load (model/quant.py).
    prequantized: for a checkpoint already in that format, reads a matrix (by its bf16 name) as stored.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    want = expected_shapes(c)
    missing = sorted(set(want) - names)
    vision = [n for n in names if n.startswith(VISION_PREFIXES)]
    unexpected = sorted(n for n in names - set(want) if not n.startswith(VISION_PREFIXES) and not _tied_duplicate(n))
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match its config: "
            + (f"missing {len(missing)} tensors {missing[:8]}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} tensors {unexpected[:8]}" if unexpected else "")
        )
    wrong = [f"{n}: {tuple(shape_of(n))} != {want[n]}" for n in sorted(want) if tuple(shape_of(n)) != want[n]]
    if wrong:
        raise CheckpointError(f"tensors with wrong shapes: {wrong[:8]}")
    if vision:
        log.info("skipping %d vision-tower tensors (text-only serving)", len(vision))

    bar = tqdm(total=len(want), desc="loading weights", unit="tensor", disable=not progress)

    def f32(name: str) -> torch.Tensor:
        bar.update(1)
        return get(name).to(device=device, dtype=torch.float32)

    compute = compute_dtype(device, dtype, compute_mode)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).to(compute).contiguous()

    def matrix(*names: str) -> Weight:
        """The rows of these checkpoint matrices, concatenated, in the weight format: read as stored where the
        checkpoint is already quantized, else quantized from values rounded to the checkpoint dtype (what a dense
        load would hold)."""
        if prequantized is not None:
            bar.update(len(names))
            return concat([prequantized(n, compute) for n in names])
        return quantize(torch.cat([f32(n) for n in names]).to(dtype), weights, compute, group)

    h = c.hidden_size
    layers = []
    for i in range(c.num_layers):
        p = f"{DEC}layers.{i}."
        dec_scalar, enc_scalar = f32(p + "layer_scalar"), f32(f"{ENC}layers.{i}.layer_scalar")
        if not torch.equal(dec_scalar, enc_scalar):
            raise CheckpointError(
                f"layer {i}: encoder layer_scalar {enc_scalar.item()} != decoder layer_scalar {dec_scalar.item()}; "
                "one network cannot serve both"
            )
        qkv = [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight"]
        if c.is_sliding(i):
            qkv.append(p + "self_attn.v_proj.weight")
        gate_up = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        in_norm = f32(p + "input_layernorm.weight")
        pre_ff = f32(p + "pre_feedforward_layernorm.weight")
        pre_ff2 = f32(p + "pre_feedforward_layernorm_2.weight")
        router = f32(p + "router.proj.weight") * (f32(p + "router.scale") * h**-0.5)
        if weights == "dense":  # norm scales folded into the products that follow them
            dense = dict(
                qkv=cast(torch.cat([f32(n) for n in qkv]) * in_norm),
                o=cast(f32(p + "self_attn.o_proj.weight")),
                ffn_in=cast(torch.cat([f32(n) * pre_ff for n in gate_up] + [router])),
                down=cast(f32(p + "mlp.down_proj.weight")),
                expert_gate_up=cast(f32(p + "experts.gate_up_proj") * pre_ff2),
                expert_down=cast(f32(p + "experts.down_proj")),
            )
        else:  # the checkpoint's own matrices; the norm scales multiply activations (LayerWeights says why)
            dense = dict(
                qkv=matrix(*qkv),
                o=matrix(p + "self_attn.o_proj.weight"),
                ffn_in=matrix(*gate_up),
                down=matrix(p + "mlp.down_proj.weight"),
                expert_gate_up=matrix(p + "experts.gate_up_proj"),
                expert_down=matrix(p + "experts.down_proj"),
                router=cast(router),
                in_norm=in_norm,
                pre_ff=pre_ff,
                pre_ff2=pre_ff2,
            )
        layers.append(
            LayerWeights(
                q_norm=f32(p + "self_attn.q_norm.weight"),
                k_norm=f32(p + "self_attn.k_norm.weight"),
                post_attn_norm=f32(p + "post_attention_layernorm.weight"),
                post_ff1=f32(p + "post_feedforward_layernorm_1.weight"),
                post_ff2=f32(p + "post_feedforward_layernorm_2.weight"),
                post_ff=f32(p + "post_feedforward_layernorm.weight"),
                per_expert_scale=f32(p + "router.per_expert_scale"),
                layer_scalar=dec_scalar.reshape(()),
                **dense,
            )
        )
    sc = DEC + "self_conditioning."
    sc_gate_up = torch.cat([f32(sc + "gate_proj.weight"), f32(sc + "up_proj.weight")])
    built = NetworkWeights(
        embed=cast(f32(DEC + "embed_tokens.weight")),
        layers=layers,
        final_norm=f32(DEC + "norm.weight"),
        sc_gate_up=cast(sc_gate_up * f32(sc + "pre_norm.weight")),
        sc_down=cast(f32(sc + "down_proj.weight")),
    )
    bar.close()
    return built


def from_state_dict(
    c: TextConfig,
    state: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype=torch.float32,
    compute_mode: str = "auto",
    weights: str = "dense",
) -> Network:
    """Build our network from a transformers state dict (used to share one set of random weights in benchmarks)."""
    built = build_weights(
        c,
        state.__getitem__,
        set(state),
        lambda n: state[n].shape,
        device,
        dtype,
        compute_mode=compute_mode,
        weights=weights,
    )
    return Network(c, built, weight_dtype=dtype)


def _tensor_files(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / f for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def load_network(
    path_or_id: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    compute_mode: str = "auto",
    weights: str = "auto",
) -> tuple[Network, Checkpoint]:
    """dtype None means the checkpoint's own dtype. weights: "auto" keeps the checkpoint's format (dense, or the
    FP8 / INT4 of a compressed-tensors checkpoint, read as stored); "fp8" / "int4" quantize a dense checkpoint
    as it loads; a quantized checkpoint cannot be loaded in another format."""
    ckpt = read_checkpoint(path_or_id)
    dtype = dtype or getattr(torch, ckpt.dtype_name)
    files = _tensor_files(ckpt.path)
    handles: dict[Path, object] = {}
    device_str = str(device)

    def handle(name: str):
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(f, framework="pt", device=device_str)
        return handles[f]

    def tensor(name: str) -> torch.Tensor:
        # safetensors (0.8) hands out CPU tensors that map the file itself, at the file's byte offsets: a cast to
        # the same dtype keeps that storage, unaligned (float sums then split differently with the file's layout:
        # a sharded copy of a checkpoint gave logits 1e-7 apart) and tied to a file that may be rewritten under a
        # running server. One copy per tensor gives every weight memory of its own.
        t = handle(name).get_tensor(name)
        return t.clone() if t.device.type == "cpu" else t

    def stored_shape(name: str) -> tuple[int, ...]:
        return tuple(handle(name).get_slice(name).get_shape())

    names, get, shape_of, prequantized = set(files), tensor, stored_shape, None
    qc = quantization_config(ckpt.raw_config)
    if qc is not None:
        stored = CompressedCheckpoint(ckpt.config, qc, set(files), tensor, stored_shape)
        if weights not in ("auto", stored.fmt):
            raise CheckpointError(f"{ckpt.path} holds {stored.fmt} weights; it cannot be served as {weights!r}")
        weights = stored.fmt
        names, get, shape_of, prequantized = stored.names, stored.get, stored.shape_of, stored.matrix
    elif weights == "auto":
        weights = "dense"

    total = sum(os.path.getsize(f) for f in set(files.values()))
    built = build_weights(
        ckpt.config,
        get,
        names,
        shape_of,
        device,
        dtype,
        progress=total > PROGRESS_BYTES,
        compute_mode=compute_mode,
        weights=weights,
        prequantized=prequantized,
    )
    handles.clear()
    return Network(ckpt.config, built, weight_dtype=dtype), ckpt


def random_network(
    c: TextConfig,
    device: torch.device | str = "cpu",
    dtype=torch.float32,
    seed: int = 0,
    compute_mode: str = "auto",
    weights: str = "dense",
) -> Network:
    """Random weights created directly on the device in the target dtype (for benchmarks of large shapes, and on
    the meta device for model/memory.py's plans). weights: as load_network's."""
    meta = torch.device(device).type == "meta"
    gen = None if meta else torch.Generator(device=device).manual_seed(seed)
    compute = compute_dtype(device, dtype, compute_mode)

    # Every format draws the same values in the same order (the dense-MLP and router rows as one matrix), so the
    # networks of one seed differ by their quantization alone.
    def values(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype) * 0.02

    def normal(*shape: int) -> torch.Tensor:
        return values(*shape).to(compute).contiguous()

    def matrix(*shape: int, t: torch.Tensor | None = None):
        t = values(*shape) if t is None else t
        return t.to(compute).contiguous() if weights == "dense" else quantize(t, weights, compute)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device)

    h, inter, m, e = c.hidden_size, c.intermediate_size, c.moe_intermediate_size, c.num_experts
    layers = []
    for i in range(c.num_layers):
        hd, kvh, heads = c.head_dims[i], c.kv_heads[i], c.num_attention_heads
        kv_out = kvh * hd * (2 if c.is_sliding(i) else 1)
        ffn = values(2 * inter + e, h)  # [gate | up | router] rows
        layers.append(
            LayerWeights(
                qkv=matrix(heads * hd + kv_out, h),
                q_norm=ones(hd),
                k_norm=ones(hd),
                o=matrix(h, heads * hd),
                post_attn_norm=ones(h),
                ffn_in=matrix(t=ffn) if weights == "dense" else matrix(t=ffn[: 2 * inter]),
                router=None if weights == "dense" else ffn[2 * inter :].to(compute).clone(),  # not a view of ffn
                down=matrix(h, inter),
                post_ff1=ones(h),
                post_ff2=ones(h),
                post_ff=ones(h),
                expert_gate_up=matrix(e, 2 * m, h),
                expert_down=matrix(e, h, m),
                per_expert_scale=ones(e),
                layer_scalar=1 + 0.1 * torch.randn((), generator=gen, device=device),  # distinct per layer, as real
            )
        )
    built = NetworkWeights(
        embed=normal(c.vocab_size, h),
        layers=layers,
        final_norm=ones(h),
        sc_gate_up=normal(2 * inter, h),
        sc_down=normal(h, inter),
    )
    return Network(c, built, weight_dtype=dtype)
