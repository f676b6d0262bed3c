"""The entropy-bound sampler, vectorised over rows that sit at different steps with different settings.

Semantics are transformers' (`generation_diffusion_gemma.py`): a linear temperature schedule over the step
cap, a categorical sample at every position, acceptance of the lowest-entropy positions while
(sum - max) of their entropies stays within the bound, renoising of every other position, and a stop once the
argmax canvas is stable and the mean entropy is under the confidence threshold (or the cap is hit). The
committed canvas is the argmax of the last step.

The vocabulary-sized work is done once per token: one max (which gives the argmax), one exp, one sum, one dot
product for the entropy, and the same probabilities feed the soft embedding and the sample. Randomness comes
from model.rng, keyed by (seed, canvas, step, position), so a row's draws never depend on its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import rng


def temperature(step: torch.Tensor, cap: torch.Tensor, t_min: torch.Tensor, t_max: torch.Tensor) -> torch.Tensor:
    """T for a row that has taken `step` steps of its canvas (0 on the first); transformers counts steps
    remaining, n = cap - step, and uses T = t_min + (t_max - t_min) * n / cap (float32)."""
    remaining = (cap - step).to(torch.float32)
    return t_min + (t_max - t_min) * (remaining / cap.to(torch.float32))


def entropy_and_probs(shifted: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of softmax(shifted), where shifted = logits/T - max (so every entry is <= 0).

    Writes the normalised probabilities into `probs` (same shape, reused buffer) and returns entropies [n].
    H = log Z - sum(p * shifted): the max-shifted form keeps the error near 1e-5 nats on peaked rows.
    """
    torch.exp(shifted, out=probs)
    z = probs.sum(-1)
    dot = torch.einsum("nv,nv->n", probs, shifted)
    probs.div_(z[:, None])
    return torch.log(z) - dot / z


def draw(probs: torch.Tensor, uniform: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Exact categorical samples by inverse CDF: one uniform per token instead of one per vocabulary entry."""
    torch.cumsum(probs, dim=-1, out=scratch)
    target = (uniform * scratch[:, -1])[:, None].contiguous()
    ids = torch.searchsorted(scratch, target, right=True)[:, 0]
    return ids.clamp_(max=probs.shape[-1] - 1)


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
) -> StepDecision:
    """Accept, renoise and test stopping for one step of B rows.

    history [B, S, C] holds the argmax canvases of the previous S steps, newest first, -1 where none; it is
    shifted in place. stability [B] is each row's stability threshold (<= S); confidence [B] its threshold
    (-inf turns adaptive stopping off).
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
    confident = entropy.mean(-1) < confidence
    done = (stable & confident) | (step + 1 >= cap)
    return StepDecision(canvas, argmax, accepted, stable, confident, done)
