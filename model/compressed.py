"""Published quantized checkpoints in the compressed-tensors format (what LLM Compressor writes, and what the
FP8-dynamic and W4A16 checkpoints on the hub are), read as they are stored.

A checkpoint is one when config.json has `quantization_config.quant_method == "compressed-tensors"`. Two
weight schemes are read:

- FP8, `float-quantized`, 8-bit float weights with `strategy: channel` (FP8_DYNAMIC: the activations' dynamic
  per-token scales are computed at run time, nothing about them is stored): `X.weight` float8_e4m3fn
  [out, in] and `X.weight_scale` [out, 1];
- W4A16, `pack-quantized`, symmetric 4-bit integers with `strategy: group`: `X.weight_packed` int32
  [out, in / 8] (eight values per word, value j in bits 4j..4j+3, stored plus 8), `X.weight_scale`
  [out, in / group_size] and `X.weight_shape`.

Anything else (NVFP4, MXFP4, asymmetric or activation-static schemes, 8-bit integers) is refused by name.
The experts are stored per expert (`experts.{e}.gate_proj` / `up_proj` / `down_proj`, the layout the
quantizing tools linearize the fused 3-D tensors into); this module presents them under the bf16 checkpoint's
fused names, so model/weights.py checks and builds a compressed checkpoint like any other.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.checkpoint import CheckpointError
from model.config import TextConfig
from model.quant import FP8, Fp8Weight, Int4Weight, QuantizedWeight, concat, fp8_tensor_cores, stack

EXPERT = re.compile(
    r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale|weight_packed|weight_shape)$"
)


@dataclass(frozen=True)
class Scheme:
    fmt: str  # "fp8" or "int4"
    group: int | None = None  # int4's group size

    @classmethod
    def from_config(cls, qc: dict) -> Scheme:
        """The one weight scheme of a compressed-tensors `quantization_config`, or a CheckpointError naming
        what is not supported."""
        groups = qc.get("config_groups") or {}
        if not groups:
            raise CheckpointError("compressed-tensors quantization_config has no config_groups")
        schemes = set()
        for name, group in groups.items():
            w = group.get("weights") or {}
            fmt = group.get("format") or qc.get("format")
            desc = (
                f"config group {name!r}: format {fmt!r}, weights {w.get('type')} {w.get('num_bits')}-bit "
                f"{w.get('strategy')}{', asymmetric' if w.get('symmetric') is False else ''}"
            )
            acts = group.get("input_activations")
            if acts and not acts.get("dynamic", False):
                raise CheckpointError(f"{desc}: static activation scales are not supported (dynamic ones are)")
            if fmt == "float-quantized" and w.get("type") == "float" and w.get("num_bits") == 8:
                if w.get("strategy") != "channel":
                    raise CheckpointError(f"{desc}: FP8 weights are read with per-channel scales only")
                schemes.add(cls("fp8"))
            elif fmt == "pack-quantized" and w.get("type") == "int" and w.get("num_bits") == 4:
                if w.get("strategy") != "group" or w.get("symmetric") is False or w.get("actorder"):
                    raise CheckpointError(f"{desc}: 4-bit weights are read as symmetric groups only")
                schemes.add(cls("int4", int(w["group_size"])))
            else:
                raise CheckpointError(f"{desc}: not supported (FP8 per-channel and W4A16 pack-quantized are)")
        if len(schemes) != 1:
            raise CheckpointError(f"compressed-tensors checkpoint mixes weight schemes {sorted(map(str, schemes))}")
        return schemes.pop()


class CompressedCheckpoint:
    """A compressed-tensors checkpoint under the bf16 checkpoint's names: `names` and `shape_of` are what
    model/weights.py checks, `get` reads unquantized tensors, `matrix` a quantized matrix as stored."""

    def __init__(
        self,
        config: TextConfig,
        quantization_config: dict,
        stored: set[str],
        read: Callable[[str], torch.Tensor],
        stored_shape: Callable[[str], tuple[int, ...]],
    ):
        self.config = config
        self.scheme = Scheme.from_config(quantization_config)
        self._read = read
        self._stored_shape = stored_shape
        self._stored = stored
        values = "weight" if self.scheme.fmt == "fp8" else "weight_packed"
        self.quantized = {n.removesuffix("." + values) for n in stored if n.endswith("." + values)}
        self.quantized = {m for m in self.quantized if m + ".weight_scale" in stored}
        self.experts: dict[str, int] = {}  # "<layer>.experts" -> expert count
        for name in stored:
            if m := EXPERT.match(name):
                self.experts[m.group(1)] = max(self.experts.get(m.group(1), 0), int(m.group(2)) + 1)
        self.names = self._logical_names()

    @property
    def fmt(self) -> str:
        return self.scheme.fmt

    def _logical_names(self) -> set[str]:
        names = set()
        for n in self._stored:
            if EXPERT.match(n):
                continue
            module = n.rsplit(".", 1)[0]
            if module in self.quantized:
                names.add(module + ".weight")
            else:
                names.add(n)
        for prefix in self.experts:
            names |= {prefix + ".gate_up_proj", prefix + ".down_proj"}
        return names

    def shape_of(self, name: str) -> tuple[int, ...]:
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            prefix, kind = name.rsplit(".", 1)
            n = self.experts[prefix]
            if kind == "gate_up_proj":
                out, cols = self._matrix_shape(f"{prefix}.0.gate_proj")
                return (n, 2 * out, cols)
            return (n, *self._matrix_shape(f"{prefix}.0.down_proj"))
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in self.quantized:
            return self._matrix_shape(module)
        return tuple(self._stored_shape(name))

    def _matrix_shape(self, module: str) -> tuple[int, int]:
        if self.fmt == "fp8":
            return tuple(self._stored_shape(module + ".weight"))
        out, words = self._stored_shape(module + ".weight_packed")
        return (out, words * 8)

    def get(self, name: str) -> torch.Tensor:
        if name.removesuffix(".weight") in self.quantized or name.endswith(".experts.gate_up_proj"):
            raise CheckpointError(f"{name} is stored quantized; it is read as a quantized matrix")
        return self._read(name)

    def matrix(self, name: str, dtype: torch.dtype) -> QuantizedWeight:
        """A quantized matrix by its bf16 name; fused expert names are stacked from the per-expert ones."""
        if name.endswith(".experts.gate_up_proj"):
            prefix = name.rsplit(".", 1)[0]
            return stack(
                [
                    concat(
                        [self._module(f"{prefix}.{e}.gate_proj", dtype), self._module(f"{prefix}.{e}.up_proj", dtype)]
                    )
                    for e in range(self.experts[prefix])
                ]
            )
        if name.endswith(".experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            return stack([self._module(f"{prefix}.{e}.down_proj", dtype) for e in range(self.experts[prefix])])
        module = name.removesuffix(".weight")
        if module not in self.quantized:
            raise CheckpointError(f"{name} is not quantized in this checkpoint; a quantized format needs it to be")
        return self._module(module, dtype)

    def _module(self, module: str, dtype: torch.dtype) -> QuantizedWeight:
        scale = self._read(module + ".weight_scale")
        if self.fmt == "fp8":
            data = self._read(module + ".weight")
            if data.dtype != FP8:
                raise CheckpointError(f"{module}.weight is {data.dtype}, not float8_e4m3fn")
            return Fp8Weight(data, scale.float().reshape(-1, 1), dtype, scaled_mm=fp8_tensor_cores(data.device))
        packed = self._read(module + ".weight_packed")
        out, cols = self._matrix_shape(module)
        group = self.scheme.group
        if packed.dtype != torch.int32 or cols % group or scale.shape != (out, cols // group):
            raise CheckpointError(
                f"{module}: packed {packed.dtype} {tuple(packed.shape)} with scales {tuple(scale.shape)} do not "
                f"make a [{out}, {cols}] matrix in groups of {group}"
            )
        # Eight offset nibbles per little-endian int32, value j in bits 4j: as bytes, value 2k in byte k's low
        # nibble and 2k+1 in its high one, which is Int4Weight's layout.
        as_bytes = packed.contiguous().view(torch.uint8)
        return Int4Weight(as_bytes, scale.to(dtype), group, dtype)


def quantization_config(raw_config: dict) -> dict | None:
    qc = raw_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise CheckpointError(f"quantization_config.quant_method {method!r} is not supported (compressed-tensors is)")
    return qc
