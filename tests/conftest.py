"""Tiny random DiffusionGemma checkpoints built with transformers and saved with save_pretrained.

- window: sliding window 8 is shorter than the contexts the tests reach, canvas 8, several canvases;
- wide_global: global_head_dim 32 != head_dim 8, 2 global KV heads, written in the `global_head_dim` config form;
- bf16: the tiny shape saved in bfloat16;
- fp8, int4: the bf16 one quantized with compressed-tensors (the library that writes the published FP8-dynamic
  and W4A16 checkpoints), experts stored per expert as those checkpoints store them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter here; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import DiffusionGemmaForBlockDiffusion

from model.presets import hf_generation_config, preset, random_hf_model, write_word_tokenizer


@dataclass
class Built:
    path: Path
    hf: DiffusionGemmaForBlockDiffusion
    dtype: torch.dtype


def build(path: Path, config: dict, seed: int, dtype: torch.dtype, global_form: bool = False) -> Built:
    hf = random_hf_model(config, seed=seed, dtype=dtype)
    hf.generation_config = hf_generation_config([1], max_denoising_steps=6, max_new_tokens=16)
    hf.save_pretrained(path)
    if global_form:  # rewrite the full-layer head sizes the way the released config.json spells them
        cfg_file = path / "config.json"
        raw = json.loads(cfg_file.read_text())
        text = raw["text_config"]
        text.pop("per_layer_config")
        text["global_head_dim"] = config["text_config"]["global_head_dim"]
        text["num_global_key_value_heads"] = config["text_config"]["num_global_key_value_heads"]
        cfg_file.write_text(json.dumps(raw, indent=2))
    write_word_tokenizer(path, config["text_config"]["vocab_size"])
    return Built(path, hf, dtype)


WIDE_GLOBAL = preset(
    "tiny",
    num_hidden_layers=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    num_key_value_heads=4,
    global_head_dim=32,
    num_global_key_value_heads=2,
    num_experts=8,
    top_k_experts=3,
    sliding_window=16,
)
WIDE_GLOBAL["canvas_length"] = 16


QUANTIZED_LINEAR = re.compile(
    r"^model\.decoder\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"
)


def compress(dense: Path, path: Path, scheme_name: str) -> Path:
    """A compressed-tensors copy of a dense checkpoint: the decoder's attention and MLP matrices and every expert
    (split from the fused 3-D tensors into per-expert Linear layers) quantized with `scheme_name` (FP8_DYNAMIC,
    W4A16 with groups of 16 to divide the tiny shapes), scales from each weight's range."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file, save_file
    from torch import nn

    state = load_file(dense / "model.safetensors")
    root = nn.Module()

    def put(name: str, weight: torch.Tensor) -> None:
        *parents, leaf = name.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        linear.weight.data.copy_(weight)
        node.add_module(leaf, linear)

    keep = {}
    for name, t in state.items():
        if QUANTIZED_LINEAR.match(name):
            put(name.removesuffix(".weight"), t)
        elif name.startswith("model.decoder.layers.") and name.endswith("experts.gate_up_proj"):
            prefix, m = name.removesuffix(".gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                put(f"{prefix}.{e}.gate_proj", t[e, :m])
                put(f"{prefix}.{e}.up_proj", t[e, m:])
        elif name.startswith("model.decoder.layers.") and name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                put(f"{name.removesuffix('.down_proj')}.{e}.down_proj", t[e])
        else:
            keep[name] = t
    scheme = preset_name_to_scheme(scheme_name, ["Linear"])
    if scheme.weights.strategy == "group":
        scheme.weights.group_size = 16
    apply_quantization_config(root, QuantizationConfig(config_groups={"group_0": scheme}))
    for module in root.modules():
        if isinstance(module, nn.Linear):
            args, w = module.quantization_scheme.weights, module.weight.data.float()
            if args.strategy == "group":
                w = w.reshape(w.shape[0], -1, args.group_size)
                low, high = w.amin(-1), w.amax(-1)
            else:
                low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale, zero = calculate_qparams(low, high, args)
            module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
            module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape).to(
                module.weight_zero_point.dtype
            )
    compressor = ModelCompressor.from_pretrained_model(root)
    compressor.compress_model(root)
    shutil.copytree(dense, path)
    save_file(keep | {k: v.contiguous() for k, v in root.state_dict().items()}, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = compressor.quantization_config.model_dump(mode="json", exclude_none=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="session")
def compressed(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compressed")
    dense = checkpoints["bf16"].path
    return {"fp8": compress(dense, root / "fp8", "FP8_DYNAMIC"), "int4": compress(dense, root / "int4", "W4A16")}


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """`serve run` of one config at a time (loadtest/serve_run.py), shared by every test that needs the app."""
    from loadtest.serve_run import ServeRun

    runs = ServeRun(tmp_path_factory.mktemp("serve"))
    yield runs
    runs.stop()


@pytest.fixture()
def shipped_app(served):
    """`serve run deploy/config.yaml` as shipped, on free ports."""
    from loadtest.serve_run import shipped_config

    return served.get(shipped_config())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "window": build(root / "window", preset("tiny"), seed=11, dtype=torch.float32),
        "wide_global": build(root / "wide_global", WIDE_GLOBAL, seed=12, dtype=torch.float32, global_form=True),
        "bf16": build(root / "bf16", preset("tiny"), seed=13, dtype=torch.bfloat16),
    }


@pytest.fixture(scope="session")
def window(checkpoints) -> Built:
    return checkpoints["window"]
