"""Memory plans: what one replica of a model shape needs on its device, from the code that allocates it.

    python -m model.memory --preset full --weights int4 --slots 8 --max-context 4096 [--rows 8]

Nothing is estimated by formula. The plan builds the replica on PyTorch's meta device, where tensors have
shapes, dtypes and byte counts but no memory:

- weights: `random_network` with the weight format: the same builders and quantizers a real load runs, so
  every tensor a load keeps is there with its bytes, summed by group (experts, attention, MLP, embedding,
  other: norms, router, self-conditioning);
- KV cache and per-slot state: a `Denoiser` on that network, as a replica makes one;
- workspace: the vocabulary pass's persistent buffers for a batch of `rows` canvases, plus the peak of what one
  denoising step creates and frees (the forward's activations and dequantized weight slices, then the
  vocabulary pass's outputs), tracked operation by operation while that step runs on meta tensors.

The last line printed is one JSON object; sizes are in GB (10^9 bytes).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model.config import TextConfig
from model.denoiser import VOCAB_WORKSPACE_BYTES, Denoiser
from model.network import LayerWeights, Network
from model.quant import WEIGHT_FORMATS, nbytes, tensor_bytes
from model.weights import random_network

GB = 1e9
GROUPS = {
    "qkv": "attention",
    "o": "attention",
    "q_norm": "other",
    "k_norm": "other",
    "ffn_in": "mlp",
    "down": "mlp",
    "router": "other",
    "expert_gate_up": "experts",
    "expert_down": "experts",
}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created while active and still alive; keeps the peak. Storages that existed
    before (weights, caches, buffers) are not counted, nor are writes into them."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output sharing an input's storage is a view or an in-place write: nothing new was allocated
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in inputs and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def weight_groups(net: Network) -> dict[str, int]:
    """Bytes of the network's weights by group."""
    groups = dict.fromkeys(("experts", "attention", "mlp", "embedding", "other"), 0)
    groups["embedding"] = nbytes(net.w.embed)
    for lw in net.w.layers:
        for f in fields(LayerWeights):
            value = getattr(lw, f.name)
            if value is not None:
                groups[GROUPS.get(f.name, "other")] += nbytes(value)
    for t in (net.w.final_norm, net.w.sc_gate_up, net.w.sc_down):
        groups["other"] += nbytes(t)
    return groups


def state_bytes(denoiser: Denoiser) -> int:
    """The denoiser's per-slot tensors (canvases, drafts, soft embeddings, settings), the cache aside."""
    return tensor_bytes(*(t for t in vars(denoiser).values() if isinstance(t, torch.Tensor)))


def step_peak(denoiser: Denoiser, rows: int) -> tuple[int, int]:
    """(vocabulary buffers, peak of everything else one step of `rows` canvases creates) in bytes: the
    denoising forward, then the vocabulary pass with the forward's output alive."""
    idx = torch.arange(rows, device=denoiser.net.device)
    tile = denoiser.vocab_tile(rows * denoiser.canvas_length)
    buffers = tensor_bytes(*denoiser._scratch(tile, denoiser.config.vocab_size))
    with LiveBytes() as live:
        soft = denoiser.soft[idx]
        hidden = denoiser.net.denoise(denoiser.cache, idx, denoiser.canvas[idx], soft, static=True)
        del soft
        step = denoiser.step_index[idx]
        temp = torch.ones(rows, device=hidden.device)
        outputs = denoiser._vocab_pass(hidden, temp, idx, step)
        del hidden, outputs
    return buffers, live.peak


@dataclass
class Plan:
    weights: dict[str, int]
    kv_cache: int
    state: int
    vocab_buffers: int
    step_peak: int
    prefix_cache: int = 0

    @property
    def total(self) -> int:
        parts = (self.kv_cache, self.state, self.vocab_buffers, self.step_peak, self.prefix_cache)
        return sum(self.weights.values()) + sum(parts)

    def report(self) -> dict:
        gb = lambda n: round(n / GB, 3)  # noqa: E731
        return {
            "weights_gb": gb(sum(self.weights.values())),
            "weights_by_group_gb": {k: gb(v) for k, v in self.weights.items()},
            "kv_cache_gb": gb(self.kv_cache),
            "prefix_cache_gb": gb(self.prefix_cache),
            "state_gb": gb(self.state),
            "workspace_gb": gb(self.vocab_buffers + self.step_peak),
            "vocab_buffers_gb": gb(self.vocab_buffers),
            "step_peak_gb": gb(self.step_peak),
            "total_gb": gb(self.total),
        }


def plan(
    config: TextConfig,
    weights: str,
    slots: int,
    max_context: int,
    rows: int,
    dtype: torch.dtype = torch.bfloat16,
    vocab_workspace_bytes: int = VOCAB_WORKSPACE_BYTES,
    device: torch.device | str = "meta",
    prefix_cache_bytes: int = 0,
) -> Plan:
    """The replica's memory for `slots` requests of up to `max_context` tokens, stepping `rows` canvases at once
    on the grouped-expert path (the GPU's; the CPU's per-expert loop holds less). device: "meta" plans; a real
    device measures the same quantities on a real allocation (tests do that on small presets)."""
    net = random_network(config, device=device, dtype=dtype, weights=weights, compute_mode="native")
    net.use_grouped_mm = True
    denoiser = Denoiser(
        net, slots, max_context, vocab_workspace_bytes=vocab_workspace_bytes, static_shapes=True,
        prefix_cache_bytes=prefix_cache_bytes,
    )  # fmt: skip
    buffers, peak = step_peak(denoiser, min(rows, slots))
    prefix = denoiser.prefix.nbytes() if denoiser.prefix is not None else 0
    return Plan(weight_groups(net), denoiser.cache.nbytes(), state_bytes(denoiser), buffers, peak, prefix)


def main(argv: list[str] | None = None) -> None:
    from model.presets import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--weights", default="bf16", choices=["bf16", *WEIGHT_FORMATS], help="bf16: dense bf16")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=None, help="canvases stepped at once (default: all slots)")
    ap.add_argument("--vocab-workspace-mib", type=int, default=VOCAB_WORKSPACE_BYTES >> 20)
    ap.add_argument("--prefix-cache-mb", type=float, default=0, help="the pool's prefix_cache_mb")
    args = ap.parse_args(argv)
    fmt = "dense" if args.weights == "bf16" else args.weights
    config = TextConfig.from_hf(PRESETS[args.preset])
    rows = args.rows or args.slots
    p = plan(
        config, fmt, args.slots, args.max_context, rows, vocab_workspace_bytes=args.vocab_workspace_mib << 20,
        prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
    )  # fmt: skip
    out = {
        "preset": args.preset,
        "weights": args.weights,
        "slots": args.slots,
        "max_context": args.max_context,
        "rows": rows,
        **p.report(),
    }
    for key, value in out.items():
        print(f"{key:>22}: {value}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
