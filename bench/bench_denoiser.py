"""Our denoiser against transformers' own `generate`, side by side, on one random-weight config.

Both get the same weights (ours is built from the transformers model's state dict), the same prompts, the
same dtype and the same fixed number of denoising steps: adaptive stopping and EOS are off on both sides, so
both run exactly the same forwards. transformers is called as its users call it for fixed steps
(`confidence_threshold=None`, default cache and attention). Timings are medians of interleaved repeats after one
warm-up call each. The last line printed is one JSON object.

    python -m bench.bench_denoiser --preset mid --batch 1 --dtype bfloat16 [--weights dense,fp8,int4]

`--weights` lists weight formats (model/quant.py) to run side by side; "ours" is the first of them, and each
gets its tokens/s (and its peak device memory on a GPU) under `by_weights`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from model.config import DTYPE_NAMES, SamplerSettings, TextConfig
from model.denoiser import Denoiser, Request
from model.presets import PRESETS, preset, random_hf_model
from model.quant import WEIGHT_FORMATS
from model.weights import from_state_dict, random_network


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="fixed denoising steps per canvas")
    ap.add_argument("--canvases", type=int, default=1, help="canvases generated per request")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--reference",
        choices=["auto", "on", "off"],
        default="auto",
        help="run transformers too (auto: not for the full preset, whose two copies would not fit one GPU)",
    )
    ap.add_argument(
        "--compute",
        choices=["auto", "native"],
        default="auto",
        help="auto: multiply bf16/fp16 weights in fp32 on CPUs without native low-precision dot products",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="dense", help="comma-separated weight formats: dense, fp8, int4")
    ap.add_argument("--compile", action="store_true", help="compiled denoising forward (CUDA graphs on a GPU)")
    args = ap.parse_args(argv)
    formats = args.weights.split(",")
    if unknown := set(formats) - set(WEIGHT_FORMATS):
        ap.error(f"--weights: unknown formats {sorted(unknown)}; choose from {WEIGHT_FORMATS}")

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = preset(args.preset)
    text = TextConfig.from_hf(cfg)
    run_reference = args.reference == "on" or (args.reference == "auto" and args.preset != "full")
    C = text.canvas_length
    max_new = C * args.canvases

    hf = random_hf_model(cfg, seed=args.seed, dtype=dtype).to(device) if run_reference else None

    def network(fmt: str):
        if hf is not None:
            return from_state_dict(text, hf.state_dict(), device, dtype, args.compute, weights=fmt)
        return random_network(text, device, dtype, args.seed, args.compute, weights=fmt)

    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, text.vocab_size - 3, (args.batch, args.prompt_len), generator=gen)
    settings = SamplerSettings(max_denoising_steps=args.steps, confidence_threshold=None)
    requests = [Request(p.tolist(), max_new, settings, seed=i) for i, p in enumerate(prompts)]

    def ours_with(fmt: str):
        net = network(fmt)
        denoiser = Denoiser(
            net, slots=args.batch, max_context=args.prompt_len + max_new, eos_token_ids=(), compile=args.compile
        )

        def ours() -> None:
            outs = denoiser.generate(requests)
            assert all(len(o.tokens) == max_new for o in outs)

        return net, ours

    def reference() -> None:
        out = hf.generate(
            prompts.to(device),
            max_new_tokens=max_new,
            max_denoising_steps=args.steps,
            confidence_threshold=None,
            eos_token_id=None,
            pad_token_id=text.pad_token_id,
        )
        assert out.sequences.shape == (args.batch, args.prompt_len + max_new)

    contenders, nets = {}, {}
    for fmt in formats:
        nets[fmt], contenders[fmt] = ours_with(fmt)
    contenders |= {"transformers": reference} if hf is not None else {}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        for fn in contenders.values():
            timed(fn, device)  # warm-up
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                times[name].append(timed(fn, device))

    tokens = args.batch * max_new
    med = {k: statistics.median(v) for k, v in times.items()}
    ours_tps = tokens / med[formats[0]]
    ref_tps = tokens / med["transformers"] if hf is not None else None
    result = {
        "preset": args.preset,
        "batch": args.batch,
        "steps": args.steps,
        "canvases": args.canvases,
        "prompt_len": args.prompt_len,
        "dtype": args.dtype,
        "ours_compute_dtype": str(nets[formats[0]].dtype).removeprefix("torch."),
        "weights": formats,
        "compile": args.compile,
        "device": str(device),
        "ours_tokens_per_s": round(ours_tps, 2),
        "transformers_tokens_per_s": round(ref_tps, 2) if ref_tps else None,
        "speedup": round(ours_tps / ref_tps, 3) if ref_tps else None,
        "ours_s": [round(t, 4) for t in times[formats[0]]],
        "by_weights": {f: {"tokens_per_s": round(tokens / med[f], 2)} for f in formats},
        "transformers_s": [round(t, 4) for t in times.get("transformers", [])],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
