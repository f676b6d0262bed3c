"""Accuracy and speed of each tier of a deploy config on the embedded model's held-out tasks.

    python -m bench.evaluate_tiers [--config deploy/config.yaml] [--seed 0]

Runs every held-out prompt (model/training/tasks.py) through our denoiser with each tier's sampler settings, as the
tier's replicas would, and prints a table and, as the last line, one JSON object. tokens/s is the answer
tokens over the wall time of the whole batch, on this machine's threads, outside Ray.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from model.training.evaluate import held_out_setup, run_cap
from serving.config import AppConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "config.yaml"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    (app,) = yaml.safe_load(args.config.read_text())["applications"]
    config = AppConfig(**app["args"])
    denoiser, tok, examples, prompts, _ = held_out_setup(config.model)
    results = {}
    head = ("tier", "steps cap", "adaptive", "mean steps", "all", "single", "many")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (9, 9, 8, 10, 5, 6, 5))) + "  tok/s")
    for name, tier in config.tiers.items():
        settings = tier.sampler.settings()
        r = run_cap(denoiser, tok, examples, prompts, settings, args.seed)
        adaptive = settings.confidence_threshold is not None
        print(
            f"{name:>9} {settings.max_denoising_steps:>9} {str(adaptive):>8} {r['mean_steps']:>10.2f} "
            f"{r['accuracy']:5.3f} {r['single_answer']:6.3f} {r['many_answers']:5.3f}  {r['tokens_per_s']:.0f}"
        )
        results[name] = {
            "max_denoising_steps": settings.max_denoising_steps,
            "adaptive_stop": adaptive,
            "mean_steps": round(r["mean_steps"], 3),
            "accuracy": round(r["accuracy"], 4),
            "accuracy_single_answer": round(r["single_answer"], 4),
            "accuracy_many_answers": round(r["many_answers"], 4),
            "tokens_per_s": round(r["tokens_per_s"], 1),
        }
    out = {"config": str(args.config), "model": config.model, "prompts": len(examples), "tiers": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
