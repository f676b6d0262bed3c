"""Accuracy of a checkpoint against the denoising-step cap, on the held-out tasks, through our denoiser.

    python -m model.training.evaluate [--model PATH] [--caps 1,2,4,8,16,32] [--seed 0]
                                      [--split validation --entropy-bound B] [--weights fp8|int4]

Every held-out prompt (model/training/tasks.py, both kinds) runs at each step cap with adaptive stopping off, then
once with the checkpoint's own adaptive stop. Prints a table, then one JSON object as the last line.
`--split validation` runs the validation set instead (tasks.validation: for choosing sampler defaults, such as
the embedded checkpoint's entropy bound, without looking at the held-out set), and `--entropy-bound` replaces the
checkpoint's bound in every row.
tokens/s counts the tokens returned (answers and their end-of-turn marker) over the wall time of the whole
batch at that cap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from model.chat import prompt_ids
from model.checkpoint import EMBEDDED
from model.config import SamplerSettings
from model.denoiser import Denoiser, Request
from model.quant import WEIGHT_FORMATS
from model.training import tasks
from model.weights import load_network


def run_cap(
    denoiser, tok, examples, prompts, settings: SamplerSettings, seed: int, max_tokens: int | None = None
) -> dict:
    """Accuracy of one generate over `examples`, each answer at most `max_tokens` (default: one canvas)."""
    budget = max_tokens or denoiser.canvas_length
    requests = [Request(p, budget, settings, seed=seed + i) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    outs = denoiser.generate(requests)
    elapsed = time.perf_counter() - t0
    ok = [tasks.check(e, tok.decode(o.tokens, skip_special_tokens=True)) for e, o in zip(examples, outs)]
    by_kind = {}
    for kind, names in (("single_answer", tasks.SINGLE), ("many_answers", tasks.MANY)):
        sel = [k for k, e in zip(ok, examples) if e.task in names]
        by_kind[kind] = sum(sel) / len(sel)
    by_task = {
        t: sum(k for k, e in zip(ok, examples) if e.task == t) / sum(e.task == t for e in examples)
        for t in tasks.SINGLE + tasks.MANY
    }
    steps = [s for o in outs for s in o.steps]
    return {
        "accuracy": sum(ok) / len(ok),
        **by_kind,
        "by_task": by_task,
        "tokens_per_s": sum(len(o.tokens) for o in outs) / elapsed,
        "mean_steps": sum(steps) / len(steps),
    }


def held_out_setup(model: str, examples: list[tasks.Example] | None = None, weights: str = "auto"):
    """(denoiser with a slot per prompt, tokenizer, examples (default: the held-out set), their prompt ids, the
    checkpoint's generation defaults) for a checkpoint folder or hub id, its weights in format `weights`."""
    from transformers import AutoTokenizer

    net, ckpt = load_network(model, weights=weights)
    tok = AutoTokenizer.from_pretrained(ckpt.path)
    examples = tasks.held_out() if examples is None else examples
    prompts = [prompt_ids(tok, e.prompt) for e in examples]
    return denoiser_for(net, prompts, ckpt.generation.eos_token_ids), tok, examples, prompts, ckpt.generation


def denoiser_for(net, prompts: list[list[int]], eos_token_ids, canvases: int = 1) -> Denoiser:
    """A denoiser with a slot per prompt and room for the longest prompt plus `canvases` canvases."""
    context = max(map(len, prompts)) + canvases * net.config.canvas_length
    return Denoiser(net, slots=len(prompts), max_context=context, eos_token_ids=eos_token_ids)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(EMBEDDED), help="checkpoint folder or hub id (default: the shipped model)")
    ap.add_argument("--caps", default="1,2,4,8,16,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=("held-out", "validation"), default="held-out")
    ap.add_argument("--entropy-bound", type=float, help="sampler entropy bound (default: the checkpoint's)")
    ap.add_argument("--weights", choices=["auto", *WEIGHT_FORMATS], default="auto", help="fp8/int4: quantize on load")
    args = ap.parse_args(argv)

    examples = tasks.validation() if args.split == "validation" else None
    denoiser, tok, examples, prompts, gen = held_out_setup(args.model, examples, args.weights)
    sampler = gen.sampler
    if args.entropy_bound is not None:
        sampler = dataclasses.replace(sampler, entropy_bound=args.entropy_bound)
    caps = [int(c) for c in args.caps.split(",")]
    fixed = {}
    for cap in caps:
        settings = dataclasses.replace(sampler, max_denoising_steps=cap, confidence_threshold=None)
        fixed[cap] = run_cap(denoiser, tok, examples, prompts, settings, args.seed)
    adaptive = run_cap(denoiser, tok, examples, prompts, sampler, args.seed)

    tasks_cols = list(tasks.SINGLE + tasks.MANY)
    print(f"{'steps':>9} {'all':>5} {'single':>6} {'many':>5} " + " ".join(f"{t:>7}" for t in tasks_cols) + "  tok/s")
    rows = [(str(c), r) for c, r in fixed.items()] + [(f"adaptive({adaptive['mean_steps']:.1f})", adaptive)]
    for name, r in rows:
        cells = " ".join(f"{r['by_task'][t]:7.3f}" for t in tasks_cols)
        print(
            f"{name:>9} {r['accuracy']:5.3f} {r['single_answer']:6.3f} {r['many_answers']:5.3f} {cells}"
            f"  {r['tokens_per_s']:.0f}"
        )
    result = {
        "model": str(args.model),
        "weights": args.weights,
        "split": args.split,
        "entropy_bound": sampler.entropy_bound,
        "prompts": len(examples),
        "accuracy_by_steps": {c: round(r["accuracy"], 4) for c, r in fixed.items()},
        "accuracy_by_steps_single_answer": {c: round(r["single_answer"], 4) for c, r in fixed.items()},
        "accuracy_by_steps_many_answers": {c: round(r["many_answers"], 4) for c, r in fixed.items()},
        "tokens_per_s_by_steps": {c: round(r["tokens_per_s"], 1) for c, r in fixed.items()},
        "accuracy_adaptive": round(adaptive["accuracy"], 4),
        "mean_steps_adaptive": round(adaptive["mean_steps"], 3),
        "adaptive_cap": sampler.max_denoising_steps,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
