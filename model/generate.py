"""Generate text with our denoiser from a checkpoint folder or hub id.

    python -m model.generate [--model PATH_OR_HUB_ID] --prompt "..." [--max-new-tokens N --steps N --seed S]
                             [--weights dense|fp8|int4]

Without --model it uses the small checkpoint shipped in model/embedded.

The prompt goes through the tokenizer's chat template when the checkpoint has one (use --raw to skip it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from model.chat import prompt_ids
from model.checkpoint import CheckpointError
from model.config import DTYPE_NAMES, context_needed
from model.denoiser import Denoiser, Request
from model.quant import WEIGHT_FORMATS
from model.weights import load_network


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="embedded", help="checkpoint folder or Hugging Face hub id (default: the shipped model)"
    )
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=positive, help="default: the checkpoint's generation config")
    ap.add_argument("--steps", type=positive, help="max denoising steps per canvas (default: generation config)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw", action="store_true", help="do not apply the chat template")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto", help="auto: the checkpoint's own dtype")
    ap.add_argument("--weights", choices=["auto", *WEIGHT_FORMATS], default="auto", help="fp8/int4: quantize on load")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    try:
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        net, ckpt = load_network(args.model, device=args.device, dtype=dtype, weights=args.weights)
        tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = prompt_ids(tokenizer, args.prompt, chat=not args.raw)
    gen = ckpt.generation
    settings = gen.sampler
    if args.steps:
        settings = dataclasses.replace(settings, max_denoising_steps=args.steps)
    max_new = args.max_new_tokens or gen.max_new_tokens
    context = context_needed(len(ids), max_new, ckpt.config.canvas_length)
    denoiser = Denoiser(net, slots=1, max_context=context, eos_token_ids=gen.eos_token_ids)
    out = denoiser.generate([Request(ids, max_new, settings, seed=args.seed)])[0]
    print(tokenizer.decode(out.tokens, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
