"""The cost of structured outputs: constrained rows beside unconstrained ones in one batch, and the compile time.

    python -m bench.bench_structured [--preset mid] [--rows 8] [--constrained 4] [--steps 8] [--canvases 2]

A random network of the preset (the mid one: vocabulary 32,768, canvas 256) behind the engine, with a
vocabulary of byte strings of its size (VOCABULARY: every byte, then pieces of letters, digits, JSON
punctuation and spaces), so the constraint's automaton has the token classes a real tokenizer gives. Two runs
on the same requests, one after the other: all rows unconstrained, then `--constrained` of them asked for the
PERSON schema. Fixed steps (no adaptive stop), so every row does the same denoising work, and every row of a run
steps in every iteration until its first canvas, so the first canvas's time is what the constrained rows add to
each step (the ratio of the two runs). Reported: tokens (a constrained answer ends with its JSON) and tokens/s and
time to first canvas per kind of row, the mean iteration over the whole run, and the schema's compile time
(schema to regex, regex to the token automaton). One JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import time

import torch
from prometheus_client import CollectorRegistry

from model.automaton import TokenVocabulary, compile_regex
from model.config import SamplerSettings, TextConfig
from model.denoiser import Denoiser
from model.presets import PRESETS, preset, random_hf_model
from model.weights import from_state_dict
from serving.ingress.structured import json_schema_constraint
from serving.replica.engine import Engine
from serving.request import CanvasEvent, FinalEvent, GenerateRequest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "age", "tags"],
}
ALPHABET = 'abcdefghijklmnopqrstuvwxyz0123456789{}[]":,.-_ @'


def vocabulary(size: int, seed: int = 0) -> TokenVocabulary:
    """pad, eos, bos, unk as special tokens, the 256 bytes, then distinct random pieces of ALPHABET (some with a
    leading space) until `size` tokens."""
    rnd = random.Random(seed)
    pieces: list[bytes | None] = [None] * 4 + [bytes([b]) for b in range(256)]
    seen = set(pieces[4:])
    while len(pieces) < size:
        piece = ("" if rnd.random() < 0.7 else " ") + "".join(rnd.choices(ALPHABET, k=rnd.randint(2, 7)))
        b = piece.encode()
        if b not in seen:
            seen.add(b)
            pieces.append(b)
    return TokenVocabulary.of(pieces)


async def run(engine: Engine, requests: list[GenerateRequest]) -> list[dict]:
    async def one(r: GenerateRequest) -> dict:
        start = time.perf_counter()
        first = None
        tokens = 0
        async with engine.submit(r) as stream:
            async for e in stream:
                if isinstance(e, CanvasEvent):
                    first = first or time.perf_counter() - start
                    tokens += len(e.tokens)
                elif isinstance(e, FinalEvent):
                    break
        return {"constrained": r.constraint is not None, "ttfc_s": first, "total_s": time.perf_counter() - start,
                "tokens": tokens}  # fmt: skip

    engine.start()
    try:
        return await asyncio.gather(*(one(r) for r in requests))
    finally:
        await engine.stop()


def summary(rows: list[dict], forwards: int, wall_s: float) -> dict:
    out = {"forwards": forwards, "mean_iteration_ms": round(1000 * wall_s / max(forwards, 1), 1)}
    for kind, chosen in (("constrained", True), ("unconstrained", False)):
        mine = [r for r in rows if r["constrained"] == chosen]
        if mine:
            out[kind] = {
                "rows": len(mine),
                "tokens": sum(r["tokens"] for r in mine),
                "tokens_per_s": round(sum(r["tokens"] for r in mine) / max(r["total_s"] for r in mine), 1),
                "ttfc_p50_s": round(statistics.median(r["ttfc_s"] for r in mine), 3),
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--constrained", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--canvases", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    cfg = preset(args.preset)
    text = TextConfig.from_hf(cfg)
    dtype = getattr(torch, args.dtype)
    net = from_state_dict(text, random_hf_model(cfg, seed=0, dtype=dtype).state_dict(), device="cpu", dtype=dtype)
    C = text.canvas_length
    vocab = vocabulary(text.vocab_size)
    t0 = time.perf_counter()
    constraint = json_schema_constraint(PERSON, "response_format")
    t1 = time.perf_counter()
    automaton = compile_regex(constraint.regex, vocab, (1,), text.vocab_size)
    t2 = time.perf_counter()
    settings = SamplerSettings(max_denoising_steps=args.steps, confidence_threshold=None)
    rnd = random.Random(0)
    prompts = [[rnd.randrange(4, text.vocab_size) for _ in range(32)] for _ in range(args.rows)]
    results = {}
    for name, constrained in (("unconstrained", 0), ("mixed", args.constrained)):
        d = Denoiser(net, slots=args.rows, max_context=32 + args.canvases * C + C, eos_token_ids=(1,))
        engine = Engine(d, registry=CollectorRegistry(), vocabulary=vocab, max_queue=args.rows)
        requests = [
            GenerateRequest(p, args.canvases * C, settings, seed=i, request_id=f"{name}-{i}",
                            constraint=constraint if i < constrained else None)
            for i, p in enumerate(prompts)
        ]  # fmt: skip
        started = time.perf_counter()
        with torch.inference_mode():
            rows = asyncio.run(run(engine, requests))
        results[name] = summary(rows, engine.forwards, time.perf_counter() - started)
        print(json.dumps({name: results[name]}), flush=True)
    out = {
        "preset": args.preset,
        "dtype": args.dtype,
        "rows": args.rows,
        "constrained_rows": args.constrained,
        "steps": args.steps,
        "vocab_size": text.vocab_size,
        "canvas": C,
        "schema_to_regex_s": round(t1 - t0, 3),
        "regex_to_automaton_s": round(t2 - t1, 3),
        "automaton": {"states": automaton.states, "token_classes": automaton.next_state.shape[1]},
        **results,
        # every row steps in every iteration until its first canvas: the first canvas's time is the step cost
        "first_canvas_ratio_mixed_vs_unconstrained": round(
            results["mixed"]["unconstrained"]["ttfc_p50_s"] / results["unconstrained"]["unconstrained"]["ttfc_p50_s"], 3
        ),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
