"""Memory plans (model/memory.py) against the CPU allocator, and the budgets the deploy configs rely on."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from model.config import TextConfig
from model.denoiser import Denoiser
from model.memory import GB, main, plan
from model.presets import PRESETS
from model.weights import random_network


def allocated(fn) -> tuple[int, int]:
    """(bytes still allocated after fn, peak above the start while it ran), from the CPU allocator's own events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, n in events:
        now += n
        peak = max(peak, now)
    return now, peak


@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
def test_plan_equals_the_measured_allocation_on_the_mid_preset(fmt):
    config = TextConfig.from_hf(PRESETS["mid"])
    slots, context, rows = 4, 1024, 4
    planned = plan(config, fmt, slots, context, rows)  # on the meta device
    built = {}

    def build():
        net = random_network(config, dtype=torch.bfloat16, compute_mode="native", weights=fmt)
        net.use_grouped_mm = True
        d = Denoiser(net, slots, context, static_shapes=True)
        d._scratch(d.vocab_tile(rows * d.canvas_length), config.vocab_size)
        built["denoiser"] = d

    persistent, _ = allocated(build)
    d = built["denoiser"]
    idx = torch.arange(rows)

    def step():
        hidden = d.net.denoise(d.cache, idx, d.canvas[idx], d.soft[idx], static=True)
        d._vocab_pass(hidden, torch.ones(rows), idx, d.step_index[idx])

    step()  # the first call may allocate once-only state
    _, peak = allocated(step)
    measured = persistent + peak
    print(f"{fmt}: planned {planned.total / GB:.4f} GB, measured {measured / GB:.4f} GB")
    assert abs(planned.total - measured) <= 0.05 * measured


def test_vocabulary_workspace_does_not_grow_with_rows():
    config = TextConfig.from_hf(PRESETS["mid"])
    small, large = plan(config, "dense", 16, 512, 1), plan(config, "dense", 16, 512, 16)
    assert small.vocab_buffers < large.vocab_buffers  # one row: half a canvas per tile
    assert large.vocab_buffers == plan(config, "dense", 64, 512, 64).vocab_buffers  # the budget caps it


@pytest.mark.slow  # the full model's plans build 30 layers of quantized meta tensors: about 20 s
def test_full_model_budgets(capsys):
    """The claims deploy/gpu-24gb.yaml and deploy/gpu.yaml rest on: int4 with 8 slots of 4,096 tokens within
    18 GB; fp8 with 64 slots within one 80 GB H100."""
    main(["--preset", "full", "--weights", "int4", "--slots", "8", "--max-context", "4096"])
    int4 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert int4["total_gb"] <= 18.0 and int4["weights_by_group_gb"]["experts"] < 12.0
    main(["--preset", "full", "--weights", "fp8", "--slots", "64", "--max-context", "4096"])
    fp8 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fp8["total_gb"] <= 80.0
