"""The full model on one GPU: speed, memory and a profile per weight format and forward mode, and transformers'
`generate` on the same weights beside ours. Run by deploy/gpu_check.sh on a machine with a CUDA GPU.

    python -m loadtest.gpu_check --out DIR [--formats dense,fp8,int4] [--modes eager,compiled] [--batches 1,8,16]
    python -m loadtest.gpu_check --preset tiny --device cpu --out DIR --batches 1,2 --steps 2 \\
        --compile-backend aot_eager                                  # the script's own test, on a CPU

One transformers model of the released shape with random weights is made on the device (bf16); ours is built
from its state dict in each weight format (quantized as a bf16 checkpoint would be on load), so both sides run
the same weights. For each format and mode (eager; compiled: `torch.compile(fullgraph=True)` with CUDA graphs)
and each batch size: one canvas (256 tokens) per request at `--steps` fixed denoising steps (adaptive stop and EOS
off), median of `--repeats` runs after a warm-up (which compiles):

- tokens/s in aggregate and per request; the time of one denoising forward (a `step` of the whole batch);
- time to first draft (prefill and one step) and to first canvas (prefill and every step), batch 1;
- device memory: weights after loading, peak while serving (ours alone), and, at the end if time is left,
  model/memory.py's plan of the same slots;
- the logits' relative error and argmax agreement against the dense network (quantized formats);
- a torch.profiler table of one denoising forward at batch 1: the 15 kernels that take the most device time,
  and how much of the forward's wall time no kernel covers (launch gaps).

transformers runs as its users run it: bf16, batch 1, the same steps (`confidence_threshold=None`, EOS off), with
its default cache and with its static cache (`cache_implementation="static"`, which compiles). Our tokens/s over
its is the ratio. `--budget-s` bounds the whole run: what would start past it is skipped and says so.

Files in `--out`: env.json (the machine), results.jsonl (one object per measurement, as it finishes),
profile.json (the tables), summary.json (the figures the targets are read from).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from loadtest.bench_denoiser import sync, timed
from model.config import SamplerSettings, TextConfig
from model.denoiser import Denoiser, Request
from model.kv_cache import KVCache
from model.memory import plan
from model.presets import PRESETS, random_hf_model
from model.weights import from_state_dict

GB = 1e9


def gb(n: int) -> float:
    return round(n / GB, 3)


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


class Out:
    """results.jsonl written line by line as measurements finish (a run cut short keeps what it measured)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.results = (folder / "results.jsonl").open("w")

    def row(self, obj: dict) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        self.results.write(line + "\n")
        self.results.flush()

    def write(self, name: str, obj: Any) -> None:
        (self.folder / name).write_text(json.dumps(obj, indent=1))


def forward_logits(net, prompt: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    cache = KVCache(net.config, 1, 1024, net.device, net.dtype)
    slots = torch.tensor([0], device=net.device)
    net.prefill(cache, slots, prompt[None], torch.tensor([len(prompt)], device=net.device))
    return net.logits(net.denoise(cache, slots, canvas[None], None))[0]


def step_time(denoiser: Denoiser, prompts: torch.Tensor, settings: SamplerSettings, device, repeats: int) -> float:
    """Median seconds of one denoising forward (`step`) of len(prompts) rows, after a warm-up step."""
    slots = list(range(len(prompts)))
    for s in slots:
        denoiser.admit(s, settings, seed=s)
    denoiser.prefill(slots, [p.tolist() for p in prompts])
    denoiser.start_canvas(slots)
    denoiser.step(slots)
    times = [timed(partial(denoiser.step, slots), device) for _ in range(repeats)]
    denoiser.release(slots)
    return statistics.median(times)


def kernel_table(denoiser: Denoiser, prompt: torch.Tensor, settings: SamplerSettings, device) -> dict:
    """One denoising forward of one row under torch.profiler: the top 15 kernels (or CPU ops) by device time, and
    the wall time no kernel covers."""
    from torch.profiler import ProfilerActivity, profile

    denoiser.admit(0, settings, seed=0)
    denoiser.prefill([0], [prompt.tolist()])
    denoiser.start_canvas([0])
    denoiser.step([0])  # warm
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    wall = time.perf_counter()
    with profile(activities=activities) as prof:
        denoiser.step([0])
        sync(device)
    wall = time.perf_counter() - wall
    denoiser.release([0])
    key = "device_time_total" if cuda else "cpu_time_total"
    rows = [e for e in prof.key_averages() if (getattr(e, key, 0) or 0) > 0]
    if cuda:  # kernels only: the device's own time
        rows = [e for e in rows if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda e: getattr(e, key), reverse=True)
    busy_us = sum(getattr(e, key) for e in rows) if cuda else None
    top = [
        {"name": e.key[:160], "calls": e.count, "total_us": round(getattr(e, key), 1),
         "mean_us": round(getattr(e, key) / max(1, e.count), 2)}
        for e in rows[:15]
    ]  # fmt: skip
    out: dict[str, Any] = {"forward_wall_ms": round(1000 * wall, 3), "top": top}
    if busy_us is not None:
        out["kernel_time_ms"] = round(busy_us / 1000, 3)
        out["not_in_kernels_ms"] = round(1000 * wall - busy_us / 1000, 3)  # launch gaps and host work
        out["kernels"] = sum(e.count for e in rows)
    return out


def measure_ours(fmt: str, mode: str, net, args, ctx: dict) -> tuple[dict, dict | None]:
    config, device, prompts = ctx["config"], ctx["device"], ctx["prompts"]
    cuda = device.type == "cuda"
    row: dict[str, Any] = {}
    compile_ = mode == "compiled"
    denoiser = Denoiser(
        net, args.slots, args.max_context, eos_token_ids=(), compile=compile_, compile_backend=args.compile_backend
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    settings = SamplerSettings(max_denoising_steps=args.steps, confidence_threshold=None)
    batches = ctx["batches"] if not compile_ else [int(b) for b in args.compiled_batches.split(",")]
    for b in batches:
        if ctx["budget"].left() < 20:
            row[f"batch{b}"] = "skipped: time budget"
            continue
        requests = [Request(p.tolist(), config.canvas_length, settings, seed=i) for i, p in enumerate(prompts[:b])]
        run = partial(denoiser.generate, requests)
        row[f"batch{b}_warmup_s"] = round(timed(run, device), 2)  # compiles this batch's graph in compiled mode
        times = [timed(run, device) for _ in range(args.repeats)]
        med = statistics.median(times)
        row[f"batch{b}_tokens_per_s"] = round(b * config.canvas_length / med, 1)
        row[f"batch{b}_per_request_tokens_per_s"] = round(config.canvas_length / med, 1)
        row[f"batch{b}_forward_ms"] = round(1000 * step_time(denoiser, prompts[:b], settings, device, 5), 3)
        if b == 1:
            row["first_canvas_ms"] = round(1000 * med, 1)  # prefill and every step of the first canvas
    one = [Request(prompts[0].tolist(), config.canvas_length, SamplerSettings(max_denoising_steps=1), seed=0)]
    row["first_draft_ms"] = round(1000 * statistics.median([timed(partial(denoiser.generate, one), device)
                                                            for _ in range(5)]), 2)  # fmt: skip
    if cuda:  # ours alone: transformers' copy stays resident beside it
        row["serve_peak_gb"] = gb(torch.cuda.max_memory_allocated(device) - ctx["resident"])
    profile = None
    if args.profile and ctx["budget"].left() > 15:
        profile = kernel_table(denoiser, prompts[0], settings, device)
    return row, profile


def reference(hf, args, ctx: dict, cache: str) -> dict:
    """transformers' generate, batch 1, the same steps and weights; cache: "dynamic" (its default) or "static"."""
    config, device, prompts = ctx["config"], ctx["device"], ctx["prompts"]
    kwargs = dict(
        max_new_tokens=config.canvas_length,
        max_denoising_steps=args.steps,
        confidence_threshold=None,
        eos_token_id=None,
        pad_token_id=config.pad_token_id,
    )
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    run = partial(hf.generate, prompts[:1].to(device), **kwargs)
    with torch.inference_mode():
        warm = timed(run, device)
        times = [timed(run, device) for _ in range(args.repeats)]
    med = statistics.median(times)
    return {"cache": cache, "warmup_s": round(warm, 2), "batch1_tokens_per_s": round(config.canvas_length / med, 1),
            "batch1_s": [round(t, 4) for t in times]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to test this script (no memory figures)")
    ap.add_argument("--out", required=True, help="the folder the JSON files go to")
    ap.add_argument("--formats", default="fp8,dense,int4", help="in this order (what the budget reaches first)")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--compiled-batches", default="1,16", help="compiled mode: each batch size is a graph to build")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference", default="dynamic,static", help="transformers' caches to run (none: skip)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--budget-s", type=float, default=450.0, help="what would start past this is skipped")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (or --device cpu to test the script)")
    out = Out(Path(args.out))
    cfg = PRESETS[args.preset]
    config = TextConfig.from_hf(cfg)
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, config.vocab_size - 3, (max(batches), args.prompt_len), generator=gen)
    canvas = torch.randint(3, config.vocab_size - 3, (config.canvas_length,), generator=gen).to(device)
    env = {
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "preset": args.preset,
        "steps": args.steps,
        "slots": args.slots,
        "max_context": args.max_context,
        "prompt_len": args.prompt_len,
    }
    out.write("env.json", env)
    ctx = {"config": config, "device": device, "prompts": prompts, "batches": batches, "budget": budget, "resident": 0}

    t0 = time.perf_counter()
    hf = random_hf_model(cfg, seed=0, dtype=torch.bfloat16, device=device)  # made on the device: seconds
    sync(device)
    out.row({"check": "reference_model", "made_s": round(time.perf_counter() - t0, 1)})
    state = dict(hf.state_dict())  # before generate: its static cache attaches compiled copies of the model
    summary: dict[str, Any] = {"env": env, "ours": {}, "transformers": {}}
    caches = [c for c in args.reference.split(",") if c and c != "none"]

    def run_reference(cache: str) -> None:
        if budget.left() < 60:
            summary["transformers"][cache] = "skipped: time budget"
            return
        try:
            row = reference(hf, args, ctx, cache)
        except Exception as e:  # its failure must not hide ours
            row = {"cache": cache, "error": f"{type(e).__name__}: {e}"[:2000]}
        out.row({"check": "transformers", **row})
        summary["transformers"][cache] = row

    for cache in caches[:1]:  # its default cache first (cheap); the static one compiles, so it comes last
        run_reference(cache)

    profiles: dict[str, dict] = {}
    probes: dict[str, torch.Tensor] = {}  # one forward's logits per format: the quantized ones against dense
    for fmt in args.formats.split(","):
        if budget.left() < 45:
            summary["ours"][fmt] = "skipped: time budget"
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = ctx["resident"] = torch.cuda.memory_allocated(device)  # transformers' copy, resident throughout
        t0 = time.perf_counter()
        net = from_state_dict(config, state, device, torch.bfloat16, "native", weights=fmt)
        sync(device)
        head: dict[str, Any] = {"weights": fmt, "load_s": round(time.perf_counter() - t0, 1)}
        if cuda:
            head["weights_gb"] = gb(torch.cuda.memory_allocated(device) - base)
        probes[fmt] = forward_logits(net, prompts[0].to(device), canvas).float().cpu()
        for mode in args.modes.split(","):
            if budget.left() < 30:
                summary["ours"][f"{fmt}/{mode}"] = "skipped: time budget"
                continue
            try:
                row, profile = measure_ours(fmt, mode, net, args, ctx)
            except Exception as e:  # one mode failing must not hide the others' figures
                row, profile = {"error": f"{type(e).__name__}: {e}"[:2000]}, None
            if profile is not None:
                profiles[f"{fmt}/{mode}"] = profile
                out.write("profile.json", profiles)
            row = head | {"mode": mode} | row
            out.row({"check": "ours", **row})
            summary["ours"][f"{fmt}/{mode}"] = row
            torch._dynamo.reset()  # the next mode or format compiles its own graphs
        del net
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if "dense" in probes:
        dense = probes["dense"]
        for fmt, probe in probes.items():
            if fmt != "dense":
                err = float((probe - dense).norm() / dense.norm())
                agree = float((probe.argmax(-1) == dense.argmax(-1)).float().mean())
                row = {
                    "weights": fmt,
                    "logits_rel_err_vs_dense": round(err, 4),
                    "argmax_agreement_vs_dense": round(agree, 4),
                }
                out.row({"check": "logits", **row})
                summary.setdefault("logits", {})[fmt] = row
    for cache in caches[1:]:
        run_reference(cache)
    for fmt in args.formats.split(","):  # model/memory.py's plan of the same slots (host work: last, if time is left)
        if budget.left() > 40:
            p = plan(config, fmt, args.slots, args.max_context, min(max(batches), args.slots))
            row = {"weights": fmt, "planned_total_gb": gb(p.total), "planned_weights_gb": gb(sum(p.weights.values()))}
            out.row({"check": "plan", **row})
            summary.setdefault("plans", {})[fmt] = row
    summary["ratios"] = ratios(summary)
    summary["elapsed_s"] = round(args.budget_s - budget.left(), 1)
    out.write("summary.json", summary)
    print(json.dumps({"check": "summary", **summary["ratios"], "elapsed_s": summary["elapsed_s"]}), flush=True)
    return summary


def ratios(summary: dict) -> dict:
    """Ours (each format and mode, batch 1) over transformers' best batch-1 tokens/s."""
    ref = [r["batch1_tokens_per_s"] for r in summary["transformers"].values() if isinstance(r, dict)
           and "batch1_tokens_per_s" in r]  # fmt: skip
    if not ref:
        return {}
    best = max(ref)
    return {
        f"{name}_vs_transformers": round(r["batch1_tokens_per_s"] / best, 2)
        for name, r in summary["ours"].items()
        if isinstance(r, dict) and "batch1_tokens_per_s" in r
    }


if __name__ == "__main__":
    main()
