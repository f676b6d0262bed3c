"""Tiny random DiffusionGemma checkpoints built with transformers and saved with save_pretrained.

- window: sliding window 8 is shorter than the contexts the tests reach, canvas 8, several canvases;
- wide_global: global_head_dim 32 != head_dim 8, 2 global KV heads, written in the `global_head_dim` config form;
- bf16: the tiny shape saved in bfloat16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
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
