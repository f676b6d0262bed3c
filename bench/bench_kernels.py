"""The Triton kernels against the torch code they replace, on one layer of a model's shapes; JSON lines.

    python -m bench.bench_kernels [--preset full] [--tokens 256,1024,4096] [--formats dense,fp8,int4]
        [--attention-rows 1,16] [--context 4096] [--device cuda]

- experts: model/kernels/moe.py's fused_experts against moe.torch_experts with grouped GEMMs (bf16: torch's
  grouped_mm; fp8 on FP8 tensor cores: _scaled_grouped_mm; int4: dequantized slices then grouped_mm), one layer,
  at each token count (256 is one canvas); fp8 also with per-row fp8 activations. Each output's relative error
  against moe.reference (fp32), the time of one call, and the weight bytes it reads per second.
- attention: model/kernels/attention.py's denoise against the static path's masked SDPA over the gathered
  cache, per layer kind (sliding: its ring; full: `--context` tokens), at each row count.

On a GPU a call is timed as a CUDA graph replay (as a graphed step runs it: no launch costs), mean of `--reps`
after two warm-ups; where a path cannot be captured it is timed eagerly and says so. On a CPU (Triton's
interpreter) the figures test this script, not the kernels' speed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial

import torch

from model.config import TextConfig
from model.kernels import attention, moe
from model.kv_cache import denoise_attention
from model.presets import PRESETS
from model.quant import Fp8Weight, nbytes, quantize


def device_ms(fn: Callable[[], object], device: torch.device, reps: int) -> tuple[float, bool]:
    """(mean ms of one call, whether it ran as a CUDA graph)."""
    fn()
    fn()
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1000 * (time.perf_counter() - t) / reps, False
    torch.cuda.synchronize(device)
    graph, graphed = torch.cuda.CUDAGraph(), True
    try:
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except RuntimeError:  # a path that reads the device from the host cannot be captured
        graphed, run = False, fn
        torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / reps, graphed


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return round(float((x.float() - ref).norm() / ref.norm()), 6)


def measure(row: dict, paths: dict[str, Callable[[], torch.Tensor]], ref: torch.Tensor, device, reps: int) -> dict:
    """Each path's error against `ref` and its time, into `row`; and the kernel's speed-up over torch's path."""
    for name, fn in paths.items():
        try:
            row[f"{name}_rel_err"] = rel_err(fn(), ref)
            ms, graphed = device_ms(fn, device, reps)
            row[f"{name}_ms"], row[f"{name}_graphed"] = round(ms, 4), graphed
        except Exception as e:  # one path failing must not hide the others
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
    if "triton_ms" in row and "torch_ms" in row:
        row["triton_speedup"] = round(row["torch_ms"] / row["triton_ms"], 3)
    return row


def expert_weights(c: TextConfig, fmt: str, device: torch.device, gen: torch.Generator) -> tuple:
    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device) * shape[-1] ** -0.5

    e, h, m = c.num_experts, c.hidden_size, c.moe_intermediate_size
    return quantize(draw(e, 2 * m, h), fmt, torch.bfloat16), quantize(draw(e, h, m), fmt, torch.bfloat16)


def routed(c: TextConfig, tokens: int, device: torch.device, gen: torch.Generator) -> tuple:
    z = torch.randn(tokens, c.hidden_size, generator=gen, device=device).to(torch.bfloat16)
    probs = torch.softmax(torch.randn(tokens, c.num_experts, generator=gen, device=device), -1)
    weights, experts = probs.topk(c.top_k_experts, -1)
    return z, experts, weights / weights.sum(-1, keepdim=True)


def experts_rows(c: TextConfig, fmt: str, tokens_list: list[int], device: torch.device, reps: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    gate_up, down = expert_weights(c, fmt, device, gen)
    weight_gb = (nbytes(gate_up) + nbytes(down)) / 1e9
    rows = []
    for tokens in tokens_list:
        args = (*routed(c, tokens, device, gen), gate_up, down)
        paths = {"triton": partial(moe.fused_experts, *args), "torch": partial(moe.torch_experts, *args, grouped=True)}
        if isinstance(gate_up, Fp8Weight):
            paths["triton_fp8_activations"] = partial(moe.run, *args, fp8_activations=True)
        row = {
            "check": "kernel",
            "kernel": "experts",
            "weights": fmt,
            "tokens": tokens,
            "weight_gb": round(weight_gb, 3),
        }
        measure(row, paths, moe.reference(*args), device, reps)
        for name in paths:
            if f"{name}_ms" in row:
                row[f"{name}_weight_gb_per_s"] = round(weight_gb / (row[f"{name}_ms"] / 1000), 1)
        rows.append(row)
    return rows


def attention_rows(c: TextConfig, rows_list: list[int], context: int, device: torch.device, reps: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(1)
    out = []
    for kind_layer in sorted({c.layer_types.index(kind) for kind in set(c.layer_types)}):
        sliding, d, kvh = c.is_sliding(kind_layer), c.head_dims[kind_layer], c.kv_heads[kind_layer]
        capacity = min(c.sliding_window - 1, context) if sliding else context
        for rows in rows_list:
            row = {"check": "kernel", "kernel": "denoise_attention", "layer": "sliding" if sliding else "full",
                   "head_dim": d, "kv_heads": kvh, "rows": rows, "cached": capacity}  # fmt: skip
            if not attention.supports(d):
                out.append(row | {"skipped": f"head dim {d}"})
                continue

            def rand(*shape: int) -> torch.Tensor:
                return torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)

            n, heads = c.canvas_length, c.num_attention_heads
            ck, cv = rand(rows, capacity, kvh, d), rand(rows, capacity, kvh, d)
            q, k, v = rand(rows, n, heads, d), rand(rows, n, kvh, d), rand(rows, n, kvh, d)
            slots = torch.arange(rows, device=device)
            visible = torch.full((rows,), capacity, device=device)
            idx = torch.arange(capacity + n, device=device)
            mask = ((idx[None, :] < visible[:, None]) | (idx[None, :] >= capacity))[:, None, None]
            paths = {
                "triton": partial(attention.denoise, ck, cv, q, k, v, slots, visible),
                "torch": partial(denoise_attention, ck, cv, q, k, v, capacity, mask, slots),
            }
            ref = denoise_attention(ck.float(), cv.float(), q.float(), k.float(), v.float(), capacity, mask, slots)
            out.append(measure(row, paths, ref, device, reps))
    return out


def run(c: TextConfig, formats: list[str], tokens: list[int], attention_rows_list: list[int], context: int,
        device: torch.device, reps: int, emit: Callable[[dict], None] = lambda r: print(json.dumps(r), flush=True),
        ) -> list[dict]:  # fmt: skip
    rows = []
    for fmt in formats:
        for row in experts_rows(c, fmt, tokens, device, reps):
            emit(row)
            rows.append(row)
    for row in attention_rows(c, attention_rows_list, context, device, reps):
        emit(row)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--formats", default="dense,fp8,int4")
    ap.add_argument("--tokens", default="256,1024,4096")
    ap.add_argument("--attention-rows", default="1,16")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    c = TextConfig.from_hf(PRESETS[args.preset])
    ints = [[int(x) for x in s.split(",")] for s in (args.tokens, args.attention_rows)]
    return run(c, args.formats.split(","), ints[0], ints[1], args.context, torch.device(args.device), args.reps)


if __name__ == "__main__":
    main()
