"""The accuracy / tokens-per-second trade-off against the step cap, with the deploy config's tiers marked.

    python -m bench.plot_tradeoff [--evaluate FILE --tiers FILE] [--out docs/tradeoff.png]

FILE is the output of `python -m model.training.evaluate` or `python -m bench.evaluate_tiers` (their last line
is the JSON read here); without them, both run now on the embedded model (about 30 s here). Left: accuracy and
tokens/s at each fixed step cap, the tiers' caps marked. Right: accuracy against tokens/s, fixed caps as a
curve, each tier (adaptive stop included) as a point.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "tradeoff.png"


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def run_quietly(main) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return json.loads(json.dumps(main([])))  # keys as the printed JSON has them (strings)


def plot(evaluate: dict, tiers: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = sorted(int(c) for c in evaluate["accuracy_by_steps"])
    series = {
        "all": evaluate["accuracy_by_steps"],
        "single-answer tasks": evaluate["accuracy_by_steps_single_answer"],
        "many-answer tasks": evaluate["accuracy_by_steps_many_answers"],
    }
    speed = [evaluate["tokens_per_s_by_steps"][str(c)] for c in caps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))

    for label, values in series.items():
        left.plot(caps, [values[str(c)] for c in caps], marker="o", label=label)
    left.set_xscale("log", base=2)
    left.set_xticks(caps, [str(c) for c in caps])
    left.set_xlabel("denoising steps per canvas (fixed)")
    left.set_ylabel("accuracy on held-out prompts")
    left.set_ylim(0, 1.02)
    rate = left.twinx()
    rate.plot(caps, speed, color="grey", linestyle="--", marker=".", label="tokens/s")
    rate.set_ylabel("tokens/s (dashed)")
    for name, t in tiers["tiers"].items():
        left.axvline(t["max_denoising_steps"], color="black", alpha=0.25, linewidth=1)
        left.annotate(name, (t["max_denoising_steps"], 0.02), rotation=90, fontsize=8, ha="right")
    left.legend(loc="center right", fontsize=8)
    left.set_title("accuracy and speed against the step cap")

    right.plot(speed, [series["all"][str(c)] for c in caps], marker="o", color="tab:blue", label="fixed steps")
    for c, x, y in zip(caps, speed, (series["all"][str(c)] for c in caps)):
        right.annotate(f"{c}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    for name, t in tiers["tiers"].items():
        stop = "adaptive" if t["adaptive_stop"] else "fixed"
        label = f"{name}: cap {t['max_denoising_steps']}, {stop}, {t['mean_steps']:.1f} steps"
        right.scatter(t["tokens_per_s"], t["accuracy"], marker="*", s=160, zorder=3, label=label)
    right.set_xlabel("tokens/s (this machine's CPU, one batch of all prompts)")
    right.set_ylabel("accuracy")
    right.set_ylim(0, 1.02)
    right.legend(loc="lower left", fontsize=8)
    right.set_title("the tiers on the trade-off")

    fig.suptitle(f"embedded model, {evaluate['prompts']} held-out prompts", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evaluate", type=Path, help="output of python -m model.training.evaluate")
    ap.add_argument("--tiers", type=Path, help="output of python -m bench.evaluate_tiers")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    if args.evaluate:
        evaluate = last_json(args.evaluate.read_text())
    else:
        from model.training.evaluate import main as evaluate_main

        evaluate = run_quietly(evaluate_main)
    if args.tiers:
        tiers = last_json(args.tiers.read_text())
    else:
        from bench.evaluate_tiers import main as tiers_main

        tiers = run_quietly(tiers_main)
    out = plot(evaluate, tiers, args.out)
    result = {
        "out": str(out),
        "caps": sorted(int(c) for c in evaluate["accuracy_by_steps"]),
        "tiers": list(tiers["tiers"]),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
