"""The released model's shape on one GPU, in stages, most valuable first; run by bench/gpu_check.sh.

    python -m bench.gpu_check --out DIR [--formats fp8,int4,dense] [--stages graphed,kernels,compiled,...]
    python -m bench.gpu_check --preset tiny --device cpu --out DIR ...   # the script's own test, on a CPU

Stages (each skipped, and saying so, when `--budget-s` would not hold it):
1. graphed: our denoiser with every step replayed as a CUDA graph of the eager kernels (no compile), per weight
   format (random weights of the released shape made on the device; int4 with deploy/gpu-24gb.yaml's slots):
   tokens/s in aggregate and per request at each batch (one canvas of 256 tokens per request, `--steps` fixed
   steps, adaptive stop and EOS off, median of `--repeats` after a warm-up that captures), the time of one
   denoising forward, prefill, first draft and first canvas (a `--prompt-len` prompt, and a 4,096-token one),
   device memory (weights, peak); a profiler table of one replay (the 15 kernels with the most device time, and
   the wall time no kernel covers); the logits of one forward, for the quantized formats' error against dense.
2. kernels: bench/bench_kernels.py on the same shapes (the Triton experts and attention against torch's).
3. compiled: fp8 with torch.compile regions under the graphs, at `--compiled-batches`; recompiles logged
   (TORCH_LOGS=recompiles), compile seconds, graphs built, and the compile cache (torch.compiler.
   save_cache_artifacts) written beside the results.
4. autoregressive: a Gemma 4 MoE of the same shape (transformers' Gemma4ForCausalLM, bf16, random weights)
   decoding 256 tokens at batch 1 with transformers' generate, static cache (which compiles) and default cache.
5. transformers: DiffusionGemma's own generate, bf16, batch 1, the same steps, default cache.
Then model/memory.py's plan of each format's slots.

Files in `--out`: env.json, results.jsonl (one object per measurement, as it finishes), profile.json,
summary.json (the figures the targets are read from), compile_cache.bin when one was made and is small enough.
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

from bench import bench_kernels
from bench.bench_denoiser import sync, timed
from model.config import SamplerSettings, TextConfig
from model.denoiser import Denoiser, Request
from model.kernels import resolve
from model.kv_cache import KVCache
from model.memory import plan
from model.presets import PRESETS, random_autoregressive_twin, random_hf_model
from model.weights import random_network

GB = 1e9
STAGES = ("graphed", "kernels", "compiled", "autoregressive", "transformers")
COMPILE_CACHE_MAX_BYTES = 64 << 20


def gb(n: int) -> float:
    return round(n / GB, 3)


def error_of(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


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
    """Median seconds of one denoising step of len(prompts) rows, after a warm-up step."""
    slots = list(range(len(prompts)))
    for s in slots:
        denoiser.admit(s, settings, seed=s)
    denoiser.prefill(slots, [p.tolist() for p in prompts])
    denoiser.start_canvas(slots)
    denoiser.step(slots)
    times = [timed(partial(denoiser.step, slots), device) for _ in range(repeats)]
    denoiser.release(slots)
    return statistics.median(times)


def prefill_time(denoiser: Denoiser, prompt: list[int], device, repeats: int) -> float:
    def run() -> None:
        denoiser.admit(0, SamplerSettings(), seed=0)
        denoiser.prefill([0], [prompt])
        denoiser.release([0])

    run()
    return statistics.median([timed(run, device) for _ in range(repeats)])


def kernel_table(denoiser: Denoiser, prompt: torch.Tensor, settings: SamplerSettings, device) -> dict:
    """One denoising step of one row under torch.profiler: the top 15 kernels (or CPU ops) by device time, and
    the wall time no kernel covers."""
    from torch.profiler import ProfilerActivity, profile

    denoiser.admit(0, settings, seed=0)
    denoiser.prefill([0], [prompt.tolist()])
    denoiser.start_canvas([0])
    denoiser.step([0])  # warm (captures the graph where there are graphs)
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
    top = [
        {"name": e.key[:160], "calls": e.count, "total_us": round(getattr(e, key), 1),
         "mean_us": round(getattr(e, key) / max(1, e.count), 2)}
        for e in rows[:15]
    ]  # fmt: skip
    out: dict[str, Any] = {"forward_wall_ms": round(1000 * wall, 3), "top": top}
    if cuda:
        busy_us = sum(getattr(e, key) for e in rows)
        out["kernel_time_ms"] = round(busy_us / 1000, 3)
        out["not_in_kernels_ms"] = round(1000 * wall - busy_us / 1000, 3)  # launch gaps and host work
        out["kernels"] = sum(e.count for e in rows)
    return out


def generate_rows(denoiser: Denoiser, config: TextConfig, prompts: torch.Tensor, batches: list[int], args, ctx) -> dict:
    """Tokens/s and forward time per batch; the first warm-up captures (and compiles) that batch's graph."""
    device, settings, row = ctx["device"], ctx["settings"], {}
    for b in batches:
        if ctx["budget"].left() < 20:
            row[f"batch{b}"] = "skipped: time budget"
            continue
        requests = [Request(p.tolist(), config.canvas_length, settings, seed=i) for i, p in enumerate(prompts[:b])]
        run = partial(denoiser.generate, requests)
        row[f"batch{b}_warmup_s"] = round(timed(run, device), 2)
        med = statistics.median([timed(run, device) for _ in range(args.repeats)])
        row[f"batch{b}_tokens_per_s"] = round(b * config.canvas_length / med, 1)
        row[f"batch{b}_per_request_tokens_per_s"] = round(config.canvas_length / med, 1)
        row[f"batch{b}_forward_ms"] = round(1000 * step_time(denoiser, prompts[:b], settings, device, 5), 3)
        if b == 1:
            row["first_canvas_ms"] = round(1000 * med, 1)  # prefill and every step of the first canvas
    return row


def latency_rows(denoiser: Denoiser, config: TextConfig, prompts: torch.Tensor, ctx) -> dict:
    """Prefill, first draft (prefill and one step) and first canvas of a 4,096-token prompt, batch 1."""
    device, row = ctx["device"], {}
    row["prefill_ms"] = round(1000 * prefill_time(denoiser, prompts[0].tolist(), device, 5), 2)
    one = [Request(prompts[0].tolist(), config.canvas_length, SamplerSettings(max_denoising_steps=1), seed=0)]
    row["first_draft_ms"] = round(1000 * statistics.median([timed(partial(denoiser.generate, one), device)
                                                            for _ in range(5)]), 2)  # fmt: skip
    long = denoiser.cache.max_context  # one canvas: its context is the prompt alone
    if long >= 1024 and ctx["budget"].left() > 20:
        prompt = torch.randint(3, config.vocab_size - 3, (long,)).tolist()
        request = [Request(prompt, config.canvas_length, ctx["settings"], seed=0)]
        timed(partial(denoiser.generate, request), device)
        row[f"first_canvas_{long}_prompt_ms"] = round(1000 * timed(partial(denoiser.generate, request), device), 1)
    return row


def measure_ours(net, mode: str, slots: int, batches: list[int], args, ctx) -> tuple[dict, dict | None]:
    """One weight format in one mode: eager, graphed (CUDA graphs of the eager kernels) or compiled."""
    config, device, prompts = ctx["config"], ctx["device"], ctx["prompts"]
    cuda = device.type == "cuda"
    graphs = cuda and mode in ("graphed", "compiled")
    denoiser = Denoiser(
        net, slots, args.max_context, eos_token_ids=(), static_shapes=mode != "eager",
        compile=mode == "compiled", cuda_graphs=graphs, compile_backend=args.compile_backend,
    )  # fmt: skip
    row: dict[str, Any] = {"mode": mode, "kernels": net.kernels, "cuda_graphs": graphs, "slots": slots}
    row |= generate_rows(denoiser, config, prompts, batches, args, ctx)
    row |= latency_rows(denoiser, config, prompts, ctx)
    if cuda:
        row["peak_gb"] = gb(torch.cuda.max_memory_allocated(device))
    profile = None
    if args.profile and ctx["budget"].left() > 15:
        profile = kernel_table(denoiser, prompts[0], ctx["settings"], device)
    return row, profile


# ---------------------------------------------------------------- stages


def build_network(fmt: str, ctx: dict):
    """Random weights of the configured shape made on the device (the same draws in every format, so the
    formats differ by quantization alone), with the kernels asked for."""
    device = ctx["device"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    net = random_network(ctx["config"], device, torch.bfloat16, seed=0, compute_mode="native", weights=fmt)
    net.kernels = resolve(ctx["args"].kernels, device)
    sync(device)
    head: dict[str, Any] = {"weights": fmt, "build_s": round(time.perf_counter() - t0, 1)}
    if device.type == "cuda":
        head["weights_gb"] = gb(torch.cuda.memory_allocated(device))
    ctx["probes"][fmt] = forward_logits(net, ctx["prompts"][0].to(device), ctx["canvas"]).float().cpu()
    return net, head


def graphed_stage(fmt: str, ctx: dict, mode: str = "graphed", batches: list[int] | None = None) -> dict:
    """One format measured in one mode; where the Triton kernels fail, again with torch's, so a figure comes."""
    args, out = ctx["args"], ctx["out"]
    slots = args.int4_slots if fmt == "int4" else args.slots
    batches = [b for b in (batches or ctx["batches"]) if b <= slots] or [1]
    net, head = build_network(fmt, ctx)
    row = head
    for attempt in ("asked", "torch"):
        try:
            measured, profile = measure_ours(net, mode, slots, batches, args, ctx)
            row = row | measured
            if profile is not None:
                ctx["profiles"][f"{fmt}/{mode}"] = profile
                out.write("profile.json", ctx["profiles"])
            break
        except Exception as e:  # the kernels' failure on this device must not hide the torch path's figures
            row[f"error_{net.kernels}"] = error_of(e)
            if attempt == "torch" or net.kernels == "torch":
                break
            net.kernels = "torch"
            torch._dynamo.reset()
    out.row({"check": "ours", **row})
    ctx["summary"]["ours"][f"{fmt}/{mode}"] = row
    del net
    gc.collect()
    return row


def kernels_stage(ctx: dict) -> None:
    args, device = ctx["args"], ctx["device"]
    tokens = [int(t) for t in args.kernel_tokens.split(",")]
    rows = bench_kernels.run(ctx["config"], ctx["formats"], tokens, [1, max(ctx["batches"])], args.max_context,
                             device, reps=10 if device.type == "cuda" else 1, emit=ctx["out"].row)  # fmt: skip
    ctx["summary"]["kernels"] = rows


def compiled_stage(ctx: dict) -> None:
    """fp8 with compiled regions: recompiles logged, the compile time (the first warm-up of each batch, which
    compiles and captures) and the graphs built; the compile cache saved for the next run of this GPU."""
    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    batches = [int(b) for b in ctx["args"].compiled_batches.split(",")]
    row = graphed_stage("fp8", ctx, mode="compiled", batches=batches)
    row = {"check": "compile", "unique_graphs": counters["stats"]["unique_graphs"],  # recompiles: in the log
           "compile_s": {k: v for k, v in row.items() if k.endswith("_warmup_s")}}  # fmt: skip
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            blob, _info = saved
            row["cache_bytes"] = len(blob)
            if len(blob) <= COMPILE_CACHE_MAX_BYTES:
                (ctx["out"].folder / "compile_cache.bin").write_bytes(blob)
                row["cache_file"] = "compile_cache.bin"
    except Exception as e:
        row["cache_error"] = error_of(e)
    torch._logging.set_logs(recompiles=False)
    ctx["out"].row(row)
    ctx["summary"]["compile"] = row


def autoregressive_stage(ctx: dict) -> None:
    """transformers' Gemma4ForCausalLM of the same shape decoding a canvas's worth of tokens at batch 1: its
    default cache, then its static cache (which compiles), as its users run it."""
    args, device, config = ctx["args"], ctx["device"], ctx["config"]
    model = random_autoregressive_twin(PRESETS[args.preset], seed=0, dtype=torch.bfloat16, device=str(device))
    prompt = ctx["prompts"][:1].to(device)
    n = config.canvas_length
    for cache in ("dynamic", "static"):
        if ctx["budget"].left() < 45:
            ctx["summary"]["autoregressive"][cache] = "skipped: time budget"
            continue
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=config.pad_token_id)
        if cache == "static":
            kwargs["cache_implementation"] = "static"
        run = partial(model.generate, prompt, **kwargs)
        try:
            with torch.inference_mode():
                warm = timed(run, device)
                med = statistics.median([timed(run, device) for _ in range(args.repeats)])
            row = {"cache": cache, "warmup_s": round(warm, 2), "batch1_tokens_per_s": round(n / med, 1)}
        except Exception as e:
            row = {"cache": cache, "error": error_of(e)}
        ctx["out"].row({"check": "autoregressive", **row})
        ctx["summary"]["autoregressive"][cache] = row
    del model


def transformers_stage(ctx: dict) -> None:
    """DiffusionGemma's own generate: bf16, batch 1, the same steps (`confidence_threshold=None`, EOS off)."""
    args, device, config = ctx["args"], ctx["device"], ctx["config"]
    hf = random_hf_model(PRESETS[args.preset], seed=0, dtype=torch.bfloat16, device=str(device))
    kwargs = dict(max_new_tokens=config.canvas_length, max_denoising_steps=args.steps, confidence_threshold=None,
                  eos_token_id=None, pad_token_id=config.pad_token_id)  # fmt: skip
    run = partial(hf.generate, ctx["prompts"][:1].to(device), **kwargs)
    try:
        with torch.inference_mode():
            warm = timed(run, device)
            times = [timed(run, device) for _ in range(args.repeats)]
        row = {"cache": "dynamic", "warmup_s": round(warm, 2),
               "batch1_tokens_per_s": round(config.canvas_length / statistics.median(times), 1)}  # fmt: skip
    except Exception as e:
        row = {"cache": "dynamic", "error": error_of(e)}
    ctx["out"].row({"check": "transformers", **row})
    ctx["summary"]["transformers"]["dynamic"] = row
    del hf


def logits_rows(ctx: dict) -> None:
    """Each quantized format's logits of one forward against the dense network's (the same draws)."""
    probes = ctx["probes"]
    if "dense" not in probes:
        return
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
            ctx["out"].row({"check": "logits", **row})
            ctx["summary"].setdefault("logits", {})[fmt] = row


def plan_rows(ctx: dict) -> None:
    args = ctx["args"]
    for fmt in ctx["formats"]:
        slots = args.int4_slots if fmt == "int4" else args.slots
        p = plan(ctx["config"], fmt, slots, args.max_context, min(max(ctx["batches"]), slots))
        row = {"weights": fmt, "slots": slots, "planned_total_gb": gb(p.total),
               "planned_weights_gb": gb(sum(p.weights.values()))}  # fmt: skip
        ctx["out"].row({"check": "plan", **row})
        ctx["summary"].setdefault("plans", {})[fmt] = row


# ---------------------------------------------------------------- the figures the targets are read from

# (figure, bar, whether higher is better): docs/quantization.md gives where each bar comes from
BARS = {
    "fp8_batch1_tokens_per_s": (1300, True),
    "int4_batch1_tokens_per_s": (1000, True),
    "int4_peak_gb": (18.0, False),
    "fp8_batch16_tokens_per_s": (4000, True),
    "first_draft_after_prefill_ms": (50, False),
    "first_canvas_4096_prompt_ms": (250, False),
    "dense_vs_autoregressive": (4.0, True),
}


def best(summary: dict, fmt: str, key: str, higher: bool = True) -> float | None:
    values = [r[key] for name, r in summary["ours"].items() if name.startswith(f"{fmt}/") and isinstance(r, dict)
              and isinstance(r.get(key), (int, float))]  # fmt: skip
    return (max if higher else min)(values) if values else None


def targets(summary: dict) -> dict:
    fp8_rows = [r for name, r in summary["ours"].items() if name.startswith("fp8/") and isinstance(r, dict)]
    after_prefill = [r["first_draft_ms"] - r["prefill_ms"] for r in fp8_rows if "first_draft_ms" in r]
    ar = [r["batch1_tokens_per_s"] for r in summary["autoregressive"].values() if isinstance(r, dict)
          and "batch1_tokens_per_s" in r]  # fmt: skip
    dense = best(summary, "dense", "batch1_tokens_per_s")
    figures = {
        "fp8_batch1_tokens_per_s": best(summary, "fp8", "batch1_tokens_per_s"),
        "int4_batch1_tokens_per_s": best(summary, "int4", "batch1_tokens_per_s"),
        "int4_peak_gb": best(summary, "int4", "peak_gb", higher=False),
        "fp8_batch16_tokens_per_s": best(summary, "fp8", "batch16_tokens_per_s"),
        "first_draft_after_prefill_ms": round(min(after_prefill), 2) if after_prefill else None,
        "first_canvas_4096_prompt_ms": best(summary, "fp8", "first_canvas_4096_prompt_ms", higher=False),
        "dense_vs_autoregressive": round(dense / max(ar), 2) if dense and ar else None,
    }
    out = {}
    for name, value in figures.items():
        bar, higher = BARS[name]
        met = None if value is None else (value >= bar if higher else value <= bar)
        out[name] = {"value": value, "bar": bar, "met": met}
    return out


def ratios(summary: dict) -> dict:
    """Ours (each format and mode, batch 1) over transformers' diffusion generate and over the autoregressive
    twin's best batch-1 tokens/s."""
    out = {}
    for ref_name in ("transformers", "autoregressive"):
        ref = [r["batch1_tokens_per_s"] for r in summary[ref_name].values() if isinstance(r, dict)
               and "batch1_tokens_per_s" in r]  # fmt: skip
        if not ref:
            continue
        for name, r in summary["ours"].items():
            if isinstance(r, dict) and "batch1_tokens_per_s" in r:
                out[f"{name}_vs_{ref_name}"] = round(r["batch1_tokens_per_s"] / max(ref), 2)
    return out


# ---------------------------------------------------------------- the run


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to test this script (no memory figures)")
    ap.add_argument("--out", required=True, help="the folder the JSON files go to")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--formats", default="fp8,int4,dense", help="graphed stage, in this order")
    ap.add_argument("--kernels", default="auto", help="auto (triton on a GPU), triton or torch")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--compiled-batches", default="1,16", help="compiled stage: each batch size is a graph to build")
    ap.add_argument("--kernel-tokens", default="256,1024,4096")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--int4-slots", type=int, default=8, help="deploy/gpu-24gb.yaml's: the 18 GB bar")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--budget-s", type=float, default=450.0, help="what would start past this is skipped")
    return ap.parse_args(argv)


def context(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (or --device cpu to test the script)")
    config = TextConfig.from_hf(PRESETS[args.preset])
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, config.vocab_size - 3, (max(batches), args.prompt_len), generator=gen)
    canvas = torch.randint(3, config.vocab_size - 3, (config.canvas_length,), generator=gen).to(device)
    summary = {"ours": {}, "transformers": {}, "autoregressive": {}}
    return dict(args=args, device=device, config=config, batches=batches, prompts=prompts, canvas=canvas,
                formats=args.formats.split(","), budget=Budget(args.budget_s), out=Out(Path(args.out)),
                settings=SamplerSettings(max_denoising_steps=args.steps, confidence_threshold=None),
                summary=summary, probes={}, profiles={})  # fmt: skip


def environment(ctx: dict) -> dict:
    import transformers

    device, args = ctx["device"], ctx["args"]
    cuda = device.type == "cuda"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "transformers": transformers.__version__, "kernels": resolve(args.kernels, device),
        "preset": args.preset, "steps": args.steps, "slots": args.slots, "int4_slots": args.int4_slots,
        "max_context": args.max_context, "prompt_len": args.prompt_len,
    }  # fmt: skip


# the least time a stage needs to start, in seconds (its first measurement)
STAGE_MIN_S = {"graphed": 40, "kernels": 30, "compiled": 90, "autoregressive": 60, "transformers": 45}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    ctx = context(args)
    summary, budget, out = ctx["summary"], ctx["budget"], ctx["out"]
    summary["env"] = environment(ctx)
    out.write("env.json", summary["env"])
    stages = args.stages.split(",")
    plan_of_run = [("graphed", partial(graphed_stage, f, ctx)) for f in ctx["formats"] if f != "dense"]
    plan_of_run += [("kernels", partial(kernels_stage, ctx)), ("compiled", partial(compiled_stage, ctx))]
    plan_of_run += [("graphed", partial(graphed_stage, "dense", ctx))] if "dense" in ctx["formats"] else []
    plan_of_run += [("autoregressive", partial(autoregressive_stage, ctx))]
    plan_of_run += [("transformers", partial(transformers_stage, ctx))]
    for i, (stage, run) in enumerate(plan_of_run):
        if stage not in stages:
            continue
        if budget.left() < STAGE_MIN_S[stage]:
            summary.setdefault("skipped", []).append(f"{stage} #{i}: time budget")
            continue
        try:
            run()
        except Exception as e:  # one stage failing must not hide the others' figures
            out.row({"check": stage, "error": error_of(e)})
            summary.setdefault("errors", []).append(f"{stage}: {error_of(e)}")
        gc.collect()
        if ctx["device"].type == "cuda":
            torch.cuda.empty_cache()
    logits_rows(ctx)
    plan_rows(ctx)
    summary["ratios"], summary["targets"] = ratios(summary), targets(summary)
    summary["elapsed_s"] = round(args.budget_s - budget.left(), 1)
    out.write("summary.json", summary)
    print(json.dumps({"check": "summary", "targets": summary["targets"], "elapsed_s": summary["elapsed_s"]}))
    return summary


if __name__ == "__main__":
    main()
