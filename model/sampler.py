"""The entropy-bound sampler, vectorised over rows that sit at different steps with different settings.

Semantics are transformers' (`generation_diffusion_gemma.py`): a linear temperature schedule over the step
cap, a categorical sample at every position, acceptance of the lowest-entropy positions while
(sum - max) of their entropies stays within the bound, renoising of every other position, and a stop once the
argmax canvas is stable and the mean entropy is under the confidence threshold (or the cap is hit). The
committed canvas is the argmax of the last step.

The vocabulary-sized work is done once per token: one blocked max (which gives the argmax), one exp, one blocked
sum (the normaliser and the sample's first search), one dot product for the entropy; the same unnormalised
probabilities feed the soft embedding and the sample. Randomness comes from model.rng, keyed by (seed, canvas,
step, position), so a row's draws never depend on its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import rng

# The lowest temperature a row runs at: a request's temperature 0 (its argmax path) runs here, where every
# probability but the largest underflows, and its sample is then replaced by the argmax itself.
T_FLOOR = 1e-6


def temperature(
    step: torch.Tensor, cap: torch.Tensor, t_min: torch.Tensor, t_max: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """T for a row that has taken `step` steps of its canvas (0 on the first); transformers counts steps
    remaining, n = cap - step, and uses T = t_min + (t_max - t_min) * n / cap (float32). `scale` is the
    request's temperature, a factor on the whole schedule (1: transformers' schedule), never below T_FLOOR."""
    remaining = (cap - step).to(torch.float32)
    t = t_min + (t_max - t_min) * (remaining / cap.to(torch.float32))
    return t if scale is None else (t * scale).clamp_(min=T_FLOOR)


# Vocabulary-sized reductions work in blocks of this many entries: a reduction over a contiguous block vectorises,
# while torch's max-with-index and cumsum over a whole row do not (measured at 512 x 32768 on a busy machine:
# max with index 49 ms against 10 for the max alone, cumsum 28 ms against 12 for block sums).
BLOCK = 128


def _grid(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [n, V] seen as [n, blocks, b]: blocks of `block` entries when that divides the row, else one block."""
    n, v = x.shape
    b = block if v % block == 0 else v
    return x.view(n, v // b, b)


def row_max(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, argmax) of each row of x [n, V], the first index on ties as torch.max gives: the max of each block,
    the first block holding the row max, then the first index of it within that block."""
    grid = _grid(x, block)
    top, k = grid.amax(-1).max(-1)
    j = grid[torch.arange(x.shape[0], device=x.device), k].argmax(-1)
    return top, k * grid.shape[-1] + j


def entropy_and_weights(
    shifted: torch.Tensor, weights: torch.Tensor, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token entropy of softmax(shifted), where shifted = logits/T - max (so every entry is <= 0).

    Writes the unnormalised probabilities exp(shifted) into `weights` (same shape, reused buffer) and returns
    (entropies [n], normalisers z [n], block sums [n, blocks]); the probabilities are weights / z, a division
    left to the consumers of their [n, hidden] or [n] products, and the block sums are what `draw` searches first
    (z is their sum: one pass over the vocabulary serves both). `shifted` is overwritten (it serves as scratch).
    H = log z - sum(w * shifted) / z: the max-shifted form keeps the error near 1e-5 nats on peaked rows.
    """
    torch.exp(shifted, out=weights)
    sums = _grid(weights, block).sum(-1)
    z = sums.sum(-1)
    dot = shifted.mul_(weights).sum(-1)
    return torch.log(z) - dot / z, z, sums


def draw(
    weights: torch.Tensor, uniform: torch.Tensor, block: int = BLOCK, block_sums: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact categorical samples from unnormalised weights [n, V] by inverse CDF, one uniform per token: the
    target u * total falls in a block (cumulative block sums: `block_sums` from entropy_and_weights, whose
    blocks then set the block size, or computed here in blocks of `block`), then at an index within it
    (cumulative sum of that block only), so the full-row cumsum is never formed."""
    n, v = weights.shape
    if block_sums is None:
        block_sums = _grid(weights, block).sum(-1)
    blocks = block_sums.shape[-1]
    grid = weights.view(n, blocks, v // blocks)
    cum = block_sums.cumsum(-1)  # [n, blocks]
    target = uniform * cum[:, -1]
    k = torch.searchsorted(cum, target[:, None], right=True)[:, 0].clamp_(max=blocks - 1)
    before = torch.where(k > 0, cum.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    inner = grid[torch.arange(n, device=weights.device), k].cumsum(-1)  # [n, b]
    j = torch.searchsorted(inner, (target - before)[:, None], right=True)[:, 0].clamp_(max=grid.shape[-1] - 1)
    return k * grid.shape[-1] + j


def accept(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Entropy-bound acceptance [B, C]: the longest lowest-entropy prefix with sum - max <= bound (always >= 1)."""
    sorted_h, order = torch.sort(entropy, dim=-1)
    keep = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound[:, None]
    return torch.zeros_like(keep).scatter(-1, order, keep)


@dataclass
class StepDecision:
    canvas: torch.Tensor  # [B, C] next canvas: accepted samples, fresh noise elsewhere
    argmax: torch.Tensor  # [B, C] the canvas that would be committed now
    accepted: torch.Tensor  # [B, C] bool
    stable: torch.Tensor  # [B] bool
    confident: torch.Tensor  # [B] bool
    done: torch.Tensor  # [B] bool: stopped adaptively or hit the step cap


def decide(
    entropy: torch.Tensor,
    sample: torch.Tensor,
    argmax: torch.Tensor,
    history: torch.Tensor,
    *,
    step: torch.Tensor,
    cap: torch.Tensor,
    bound: torch.Tensor,
    stability: torch.Tensor,
    confidence: torch.Tensor,
    seed: torch.Tensor,
    canvas_index: torch.Tensor,
    vocab_size: int,
    free: torch.Tensor | None = None,
    templated: torch.Tensor | None = None,
) -> StepDecision:
    """Accept, renoise and test stopping for one step of B rows.

    history [B, S, C] holds the argmax canvases of the previous S steps, newest first, -1 where none; it is
    shifted in place. stability [B] is each row's stability threshold (<= S); confidence [B] its threshold
    (-inf turns adaptive stopping off). free [B, C]: with a canvas template, the positions the sampler fills
    (the fixed ones carry entropy 0 here); the confidence of a `templated` [B] row is its free positions' mean.
    """
    accepted = accept(entropy, bound)
    noise = rng.random_ids(seed, canvas_index, step, rng.NOISE, entropy.shape[1], vocab_size)
    canvas = torch.where(accepted, sample, noise)
    s = history.shape[1]
    if s:
        same = (history == argmax[:, None, :]).all(-1)  # [B, S]
        counted = torch.arange(s, device=same.device)[None, :] < stability[:, None]
        stable = (same | ~counted).all(-1)
        history.copy_(torch.cat([argmax[:, None, :], history[:, :-1]], dim=1))
    else:
        stable = torch.ones(entropy.shape[0], dtype=torch.bool, device=entropy.device)
    mean = entropy.mean(-1)
    if free is not None:  # a templated row: the mean over the positions left to the sampler
        free_mean = (entropy * free).sum(-1) / free.sum(-1).clamp(min=1)
        mean = torch.where(templated, free_mean, mean)
    confident = mean < confidence
    done = (stable & confident) | (step + 1 >= cap)
    return StepDecision(canvas, argmax, accepted, stable, confident, done)
