"""Checkpoint loading: both config forms, sharded files, vision skipping, and clear errors."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, read_checkpoint
from model.config import GenerationDefaults, TextConfig
from model.kv_cache import KVCache
from model.weights import load_network


def copy_with(src, dst, edit) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return str(dst)


def denoise_logits(net, prompt=(2, 5, 6, 7)) -> torch.Tensor:
    cache = KVCache(net.config, 1, 32, "cpu", net.dtype)
    slots = torch.tensor([0])
    net.prefill(cache, slots, torch.tensor([prompt]), torch.tensor([len(prompt)]))
    canvas = torch.arange(net.config.canvas_length)[None] % net.config.vocab_size
    return net.logits(net.denoise(cache, slots, canvas, None))


def test_both_config_forms_give_the_same_shapes(checkpoints, tmp_path):
    built = checkpoints["wide_global"]
    global_form = read_checkpoint(str(built.path)).config
    built.hf.config.save_pretrained(tmp_path)  # transformers writes the per_layer_config form
    assert "per_layer_config" in json.loads((tmp_path / "config.json").read_text())["text_config"]
    per_layer = TextConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert global_form == per_layer
    assert global_form.head_dims == (8, 32, 8, 32) and global_form.kv_heads == (4, 2, 4, 2)


def test_generation_config_is_read(window):
    ckpt = read_checkpoint(str(window.path))
    gen = ckpt.generation
    assert gen == GenerationDefaults.from_hf(
        json.loads((window.path / "generation_config.json").read_text()), ckpt.config
    )
    assert gen.sampler.max_denoising_steps == 6 and gen.eos_token_ids == (1,) and gen.max_new_tokens == 16


def test_sharded_checkpoint_loads_like_the_single_file(window, tmp_path):
    window.hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded, _ = load_network(str(tmp_path))
    single, _ = load_network(str(window.path))
    assert torch.equal(denoise_logits(sharded), denoise_logits(single))


def test_vision_tensors_are_skipped_with_a_log_line(window, caplog):
    with caplog.at_level(logging.INFO, logger="model.weights"):
        load_network(str(window.path))
    assert any("vision-tower tensors" in r.message for r in caplog.records)


def test_missing_tensor_is_named(window, tmp_path):
    name = "model.decoder.layers.1.self_attn.k_norm.weight"
    path = copy_with(window.path, tmp_path / "c", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing 1 tensors.*{name}"):
        load_network(path)


def test_unexpected_tensor_is_named(window, tmp_path):
    path = copy_with(window.path, tmp_path / "c", lambda t: t.update({"model.decoder.layers.0.bogus": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="unexpected 1 tensors.*bogus"):
        load_network(path)


def test_wrong_shape_is_named(window, tmp_path):
    name = "model.decoder.layers.0.mlp.down_proj.weight"
    path = copy_with(window.path, tmp_path / "c", lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=f"wrong shapes.*{name}"):
        load_network(path)


def test_encoder_and_decoder_layer_scalars_must_agree(window, tmp_path):
    name = "model.encoder.language_model.layers.1.layer_scalar"
    path = copy_with(window.path, tmp_path / "c", lambda t: t.update({name: t[name] * 2}))
    with pytest.raises(CheckpointError, match="layer 1: encoder layer_scalar"):
        load_network(path)


def test_unreachable_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot fetch 'google/diffusiongemma-26B-A4B-it'"):
        load_network("google/diffusiongemma-26B-A4B-it")


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_network(str(tmp_path))
