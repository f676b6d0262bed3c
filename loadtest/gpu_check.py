"""The full model on one GPU: speed and memory per weight format, against the memory plan. Run by
deploy/gpu_check.sh on a machine with a CUDA GPU (it refuses to run without one).

    python -m loadtest.gpu_check [--formats dense,fp8,int4] [--batches 1,8,16] [--steps 16]
    python -m loadtest.gpu_check --preset tiny --device cpu --batches 1,2 --steps 2   # the script's own test

For each weight format, one network of the released shape with random weights (quantized as a bf16 checkpoint
would be on load) and one Denoiser of `--slots` slots at `--max-context` tokens. For each batch size: one
canvas (256 tokens) per request at a fixed number of denoising steps (adaptive stop and EOS off), median of
`--repeats` runs after a warm-up: tokens/s (per request and in aggregate), the time to the first draft (prefill
and one denoising step, batch 1) and the device memory: after loading (weights), and the peak while serving
(torch.cuda.max_memory_allocated), next to model/memory.py's plan of the same configuration. Also, per quantized
format, the logits' relative error and argmax agreement against the dense network on one forward (the fp8
products run on FP8 tensor cores here, unlike on a CPU). One JSON object per line; the last line sums up.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from functools import partial

import torch

from loadtest.bench_denoiser import sync, timed
from model.config import SamplerSettings, TextConfig
from model.denoiser import Denoiser, Request
from model.kv_cache import KVCache
from model.memory import plan
from model.presets import PRESETS
from model.weights import random_network

GB = 1e9


def gb(n: int) -> float:
    return round(n / GB, 3)


def forward_logits(net, prompt: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    cache = KVCache(net.config, 1, 1024, net.device, net.dtype)
    slots = torch.tensor([0], device=net.device)
    net.prefill(cache, slots, prompt[None], torch.tensor([len(prompt)], device=net.device))
    return net.logits(net.denoise(cache, slots, canvas[None], None))[0]


def measure(fmt: str, args, config: TextConfig, device: torch.device, prompts, canvas, reference: list) -> dict:
    cuda = device.type == "cuda"
    row: dict = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    net = random_network(config, device, torch.bfloat16, seed=0, compute_mode="native", weights=fmt)
    sync(device)
    row["load_s"] = round(time.perf_counter() - t0, 1)
    if cuda:
        row["weights_gb"] = gb(torch.cuda.memory_allocated(device))
        row["load_peak_gb"] = gb(torch.cuda.max_memory_allocated(device))
    probe = forward_logits(net, prompts[0].to(device), canvas).float().cpu()
    if fmt == "dense":
        reference.append(probe)
    elif reference:
        row["logits_rel_err_vs_dense"] = round(float((probe - reference[0]).norm() / reference[0].norm()), 4)
        row["argmax_agreement_vs_dense"] = round(float((probe.argmax(-1) == reference[0].argmax(-1)).float().mean()), 4)
    denoiser = Denoiser(net, args.slots, args.max_context, eos_token_ids=(), compile=args.compile)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    settings = SamplerSettings(max_denoising_steps=args.steps, confidence_threshold=None)
    batches = [int(b) for b in args.batches.split(",")]
    for b in batches:
        requests = [Request(p.tolist(), config.canvas_length, settings, seed=i) for i, p in enumerate(prompts[:b])]
        run = partial(denoiser.generate, requests)
        timed(run, device)  # warm-up (and compilation, with --compile)
        times = [timed(run, device) for _ in range(args.repeats)]
        med = statistics.median(times)
        row[f"batch{b}_tokens_per_s"] = round(b * config.canvas_length / med, 1)
        row[f"batch{b}_per_request_tokens_per_s"] = round(config.canvas_length / med, 1)
        row[f"batch{b}_s"] = [round(t, 4) for t in times]
    one = [Request(prompts[0].tolist(), config.canvas_length, SamplerSettings(max_denoising_steps=1), seed=0)]
    first = [timed(partial(denoiser.generate, one), device) for _ in range(5)]
    row["first_draft_ms"] = round(1000 * statistics.median(first), 1)
    if cuda:
        row["serve_peak_gb"] = gb(torch.cuda.max_memory_allocated(device))
    p = plan(config, fmt, args.slots, args.max_context, min(max(batches), args.slots))
    row["planned_total_gb"] = gb(p.total)
    row["planned_weights_gb"] = gb(sum(p.weights.values()))
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to test this script (no memory figures)")
    ap.add_argument("--formats", default="dense,fp8,int4")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="compiled forward with CUDA graphs (slow to build)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (or --device cpu to test the script)")
    config = TextConfig.from_hf(PRESETS[args.preset])
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, config.vocab_size - 3, (max(batches), args.prompt_len), generator=gen)
    canvas = torch.randint(3, config.vocab_size - 3, (config.canvas_length,), generator=gen).to(device)
    head = {
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "preset": args.preset,
        "torch": torch.__version__,
        "steps": args.steps,
        "slots": args.slots,
        "max_context": args.max_context,
        "compile": args.compile,
    }
    print(json.dumps({"check": "start", **head}), flush=True)
    summary: dict[str, dict] = {}
    reference: list[torch.Tensor] = []  # the dense network's probe logits, once measured
    for fmt in args.formats.split(","):
        row: dict = {"weights": fmt}
        try:
            row |= measure(fmt, args, config, device, prompts, canvas, reference)
        except Exception as e:  # one format failing must not hide the others' figures
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print(json.dumps({"check": "format", **head, **row}), flush=True)
        summary[fmt] = row
    print(json.dumps({"check": "summary", **head, "by_weights": summary}), flush=True)


if __name__ == "__main__":
    main()
