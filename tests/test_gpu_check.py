"""The GPU check's script on a CPU, tiny preset: every part it calls on the GPU runs here first (transformers'
generate with both caches, our denoiser eager and compiled with fullgraph, the profile), and its files say what
the targets are read from."""

from __future__ import annotations

import json

import pytest
import torch

from bench.gpu_check import main
from model.config import SamplerSettings, TextConfig
from model.denoiser import Denoiser, Request
from model.kernels import resolve
from model.presets import preset
from model.weights import random_network

pytestmark = pytest.mark.slow  # two compilations (aot_eager) and transformers' static cache: about 30 s


def test_the_gpu_script_runs_every_stage_and_writes_its_files(tmp_path):
    summary = main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--batches", "1,2",
                    "--compiled-batches", "1", "--steps", "2", "--repeats", "1", "--formats", "fp8,int4,dense",
                    "--kernels", "torch", "--kernel-tokens", "16", "--max-context", "64",  # kernels: bench stage
                    "--compile-backend", "aot_eager"])  # fmt: skip
    assert {p.name for p in tmp_path.iterdir()} == {"env.json", "results.jsonl", "profile.json", "summary.json"}
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    ours = {f"{r['weights']}/{r['mode']}": r for r in rows if r["check"] == "ours"}
    assert set(ours) == {"fp8/graphed", "int4/graphed", "dense/graphed", "fp8/compiled"}
    for name, r in ours.items():
        assert not any(k.startswith("error") for k in r), r
        assert r["kernels"] == "torch" and r["cuda_graphs"] is False  # no graphs on a CPU: the static step
        assert r["batch1_tokens_per_s"] > 0 and r["batch1_forward_ms"] > 0 and r["first_draft_ms"] > 0
        assert r["first_canvas_ms"] > 0 and r["prefill_ms"] > 0
        assert ("batch2_tokens_per_s" in r) == name.endswith("graphed")  # compiled: only the batches asked for
    assert ours["int4/graphed"]["slots"] == 8 and ours["fp8/graphed"]["slots"] == 16  # gpu-24gb's slots for int4
    kernels = [r for r in rows if r["check"] == "kernel"]
    experts = {r["weights"]: r for r in kernels if r["kernel"] == "experts"}
    assert set(experts) == {"fp8", "int4", "dense"} and all(r["triton_rel_err"] < 1e-3 for r in experts.values())
    assert "triton_fp8_activations_ms" in experts["fp8"]
    assert any(r["kernel"] == "denoise_attention" and "triton_ms" in r for r in kernels)  # the full layer's 16
    (compiled,) = [r for r in rows if r["check"] == "compile"]
    assert compiled["unique_graphs"] >= 2 and compiled["compile_s"]["batch1_warmup_s"] > 0
    assert {r["cache"] for r in rows if r["check"] == "autoregressive"} == {"dynamic", "static"}
    assert [r["cache"] for r in rows if r["check"] == "transformers"] == ["dynamic"]
    logits = {r["weights"]: r for r in rows if r["check"] == "logits"}
    assert set(logits) == {"fp8", "int4"} and all(0 < r["logits_rel_err_vs_dense"] < 0.5 for r in logits.values())
    plans = {r["weights"]: r for r in rows if r["check"] == "plan"}
    assert set(plans) == {"fp8", "int4", "dense"} and plans["int4"]["slots"] == 8
    assert set(json.loads((tmp_path / "profile.json").read_text())) == set(ours)
    assert set(summary["ratios"]) == {f"{k}_vs_{ref}" for k in ours for ref in ("transformers", "autoregressive")}
    assert summary["targets"]["fp8_batch1_tokens_per_s"]["value"] == max(
        ours[k]["batch1_tokens_per_s"] for k in ("fp8/graphed", "fp8/compiled")
    )
    assert summary["targets"]["int4_peak_gb"]["met"] is None  # no device memory figures on a CPU
    assert json.loads((tmp_path / "summary.json").read_text())["targets"] == summary["targets"]


def test_the_compiled_denoiser_traces_whole_and_gives_the_eager_tokens():
    """Denoiser(compile=True) on a CPU: each layer shape one region traced whole (fullgraph: a graph break or a
    recompile past the limit would fail), shared by the layers of that shape although each has its own layer
    scalar, with the row count dynamic past one row, and the same tokens as the eager static path, across canvases
    and rows at different steps."""
    kinds = ["sliding_attention", "full_attention"] * 5  # ten layers of two shapes: past Dynamo's recompile limit
    cfg = TextConfig.from_hf(preset("tiny", num_hidden_layers=10, layer_types=kinds))
    net = random_network(cfg, dtype=torch.bfloat16, seed=3, compute_mode="native")  # the GPU's dtype (grouped GEMM)
    assert len({float(lw.layer_scalar) for lw in net.w.layers}) == cfg.num_layers  # as in a real checkpoint
    C = cfg.canvas_length
    reqs = [Request([2, 5, 6, 7], 2 * C, SamplerSettings(max_denoising_steps=4), seed=1),
            Request([2, 9], C, SamplerSettings(max_denoising_steps=3), seed=2),
            Request([2, 9, 4, 4, 4], C, SamplerSettings(max_denoising_steps=2), seed=3)]  # fmt: skip
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = Denoiser(net, slots=3, max_context=64, eos_token_ids=(), compile=True, compile_backend="aot_eager")
    eager = Denoiser(net, slots=3, max_context=64, eos_token_ids=(), static_shapes=True)  # grouped experts too
    assert [g.tokens for g in compiled.generate(reqs)] == [g.tokens for g in eager.generate(reqs)]
    # per layer shape: one graph for every row count past one (rows 3 and 2 here) and one for a single row
    shapes = {(cfg.is_sliding(i), cfg.head_dims[i], cfg.kv_heads[i]) for i in range(cfg.num_layers)}
    assert cfg.num_layers > len(shapes) == 2
    assert counters["stats"]["unique_graphs"] == 2 * len(shapes)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_a_whole_step_traces_as_one_graph_without_host_reads(kernels):
    """What a CUDA graph of a step needs, checked where none can be captured: the static step (forward,
    vocabulary pass, the sampler's decision and the state writes) traces whole (fullgraph: a host read of a
    tensor's value breaks the graph and fails), and the traced step gives the eager step's tokens and state."""
    cfg = TextConfig.from_hf(preset("tiny", head_dim=16, global_head_dim=32))  # the attention kernel's tiles
    net = random_network(cfg, dtype=torch.bfloat16, seed=5, compute_mode="native", weights="fp8")
    net.use_grouped_mm = True  # as on a GPU (the per-expert loop reads counts on the host)
    net.kernels = resolve(kernels, net.device)
    pair = [Denoiser(net, slots=3, max_context=64, eos_token_ids=(), static_shapes=True) for _ in range(2)]
    for d in pair:
        for slot, seed in ((0, 1), (2, 2)):
            d.admit(slot, SamplerSettings(max_denoising_steps=4), seed=seed)
        d.prefill([0, 2], [[2, 5, 6, 7, 8, 9, 3, 4, 5, 6], [2, 9]])
        d.start_canvas([0, 2])
    eager, traced = pair
    torch._dynamo.reset()
    step = torch.compile(traced._plain_step, fullgraph=True, backend="aot_eager")
    idx = torch.tensor([2, 0])
    for _ in range(3):
        want = eager.step([2, 0])
        with torch.inference_mode():
            done, steps, argmax = step(idx)
        assert done.tolist() == want.done and steps.tolist() == want.steps and torch.equal(argmax, want.argmax)
        for name in ("canvas", "history", "soft", "step_index"):
            assert torch.equal(getattr(traced, name), getattr(eager, name)), name
