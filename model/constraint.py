"""A constrained row's step: its canvas chosen as one path through the constraint's automaton (model/automaton.py).

A canvas is decided all at once: every position is sampled every step, and the committed canvas is the argmax
of the last one. With a constraint neither may be chosen position by position (two positions that are each
possible may not be possible together), so both are chosen jointly, as paths:

- the argmax canvas is the most likely path (Viterbi over states x token classes, with the step's untempered
  log-probabilities): what is committed, and what drafts and the stability test read;
- the sample is one path drawn from the tempered distribution restricted to the language (forward sums, then
  sampling backwards from the end): the tokens the accepted positions keep for the next step.

A path starts in the state the committed canvases left and must end where the rest of the answer's room can
still finish it (`steps_to_done` within the tokens left after this canvas; on the last canvas, past an EOS).
The work per position is one [states, classes] tensor operation; the vocabulary is touched only by per-class
reductions over the whole canvas at once, and by the draw of each position's token within its chosen class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.automaton import TokenAutomaton

NEG = float("-inf")


@dataclass
class ConstrainedCanvas:
    argmax: torch.Tensor  # [C] the most likely path's tokens
    sample: torch.Tensor  # [C] a path drawn from the tempered distribution
    argmax_end: torch.Tensor  # 0-d: the state after the argmax path (where the next canvas starts)


def class_max(logp: torch.Tensor, a: TokenAutomaton) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position and token class, the largest log-probability and the first token holding it: [C, K] each."""
    C, V = logp.shape
    K = a.next_state.shape[1]
    cls = a.class_of[None, :].expand(C, V)
    best = torch.full((C, K), NEG, device=logp.device).scatter_reduce(1, cls, logp, "amax")
    ids = torch.arange(V, device=logp.device).expand(C, V)
    at_best = logp == best.gather(1, cls)
    first = torch.full((C, K), V, device=logp.device).scatter_reduce(1, cls, torch.where(at_best, ids, V), "amin")
    return best, first.clamp(max=V - 1)


def class_logsum(weights: torch.Tensor, a: TokenAutomaton) -> torch.Tensor:
    """Per position and token class, log of the summed (unnormalised) weights: [C, K]."""
    C, V = weights.shape
    K = a.next_state.shape[1]
    sums = torch.zeros(C, K, dtype=weights.dtype, device=weights.device)
    return sums.scatter_add_(1, a.class_of[None, :].expand(C, V), weights).log()


def canvas_ends(a: TokenAutomaton, room: int, C: int, template: list[int] | None = None) -> torch.Tensor:
    """[canvases + 1, S] bool: row k holds the states the first k canvases may leave, those from which the rest
    of an answer of `room` tokens (C to a canvas) can still reach `done`; with a canvas template its fixed
    positions (-1: free) are kept on the way. Row 0 at a.start says whether the answer can be written at all."""
    canvases = -(-room // C)
    if not template or all(t < 0 for t in template):
        left = torch.tensor([room - k * C for k in range(canvases + 1)], device=a.steps_to_done.device)
        return a.steps_to_done[None, :] <= left[:, None]
    live = a.next_state >= 0
    target = a.next_state.clamp(min=0)
    can = torch.zeros(a.states, dtype=torch.bool, device=live.device)
    can[a.done] = True
    rows = [can]
    for p in range(canvases * C - 1, -1, -1):  # backwards over the answer's positions
        t = template[p] if p < len(template) else -1
        if t < 0:
            can = (live & can[target]).any(-1)
        else:
            k = a.class_of[t]
            can = live[:, k] & can[target[:, k]]
        if p % C == 0:
            rows.append(can)
    return torch.stack(rows[::-1])


# Positions reduced to pairs at once hold [positions, E] values: at most this many, the rest in further chunks.
CHUNK_VALUES = 1 << 24


def _by_pair(a: TokenAutomaton, scores: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per position and (source, target) pair, the classes' scores [C, K] reduced over the pair's edges: "amax"
    or "logsumexp" ([C, P])."""
    C, P, E = scores.shape[0], a.pair_src.shape[0], a.src.shape[0]
    out = torch.full((C, P), NEG, dtype=scores.dtype, device=scores.device)
    step = max(1, CHUNK_VALUES // max(E, 1))
    if reduce != "amax":
        shift = scores.amax(-1, keepdim=True).clamp(min=-1e30)
        scores = (scores - shift).exp()
    for s in range(0, C, step):
        vals = scores[s : s + step][:, a.cls]  # [c, E]
        index = a.pair.expand_as(vals)
        if reduce == "amax":
            out[s : s + step] = out[s : s + step].scatter_reduce(1, index, vals, "amax")
        else:  # in the linear domain, shifted by each position's largest class
            out[s : s + step] = torch.zeros_like(out[s : s + step]).scatter_add_(1, index, vals).log()
    return out if reduce == "amax" else out + shift


def _within(
    a: TokenAutomaton, chosen: torch.Tensor, scores: torch.Tensor, uniform: torch.Tensor | None
) -> torch.Tensor:
    """Each position's class among the edges of its chosen pair [C]: the best by scores [C, K], or (with
    uniform [C]) one drawn in proportion to exp(scores)."""
    first, length = a.pair_offset[chosen], a.pair_offset[chosen + 1] - a.pair_offset[chosen]
    span = torch.arange(int(length.max()), device=scores.device)
    edge = (first[:, None] + span[None, :]).clamp(max=a.src.shape[0] - 1)  # [C, D]
    cls = a.cls[edge]
    vals = torch.where(span[None, :] < length[:, None], scores.gather(1, cls), NEG)
    if uniform is None:
        pick = vals.argmax(-1)
    else:
        cum = torch.softmax(vals, -1).cumsum(-1)
        pick = torch.searchsorted(cum, (uniform * cum[:, -1])[:, None], right=True)[:, 0].clamp(max=len(span) - 1)
    return cls.gather(1, pick[:, None])[:, 0]


def viterbi(
    a: TokenAutomaton, start: torch.Tensor, scores: torch.Tensor, ends: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best path's classes [C] and end state, for per-position class scores [C, K] (log domain), among the
    paths from `start` that end in `ends` [S] bool."""
    best = _by_pair(a, scores, "amax")
    C, P, S, dev = best.shape[0], best.shape[1], a.states, scores.device
    pairs = torch.arange(P, device=dev)
    score = torch.full((S,), NEG, device=dev)
    score[start] = 0.0
    back = torch.empty(C, S, dtype=torch.int64, device=dev)  # per position and state: the best pair into it
    for i in range(C):
        cand = score[a.pair_src] + best[i]
        score = torch.full((S,), NEG, device=dev).scatter_reduce(0, a.pair_dst, cand, "amax")
        hit = (cand == score[a.pair_dst]) & (cand > NEG)
        back[i] = torch.full((S,), P, device=dev).scatter_reduce(0, a.pair_dst, torch.where(hit, pairs, P), "amin")
    end = torch.where(ends, score, NEG).argmax()
    chosen = torch.empty(C, dtype=torch.int64, device=dev)
    state = end
    for i in range(C - 1, -1, -1):
        chosen[i] = back[i, state].clamp(max=P - 1)
        state = a.pair_src[chosen[i]]
    return _within(a, chosen, scores, None), end


def sample_path(
    a: TokenAutomaton, start: torch.Tensor, logw: torch.Tensor, ends: torch.Tensor, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes [C] of one path drawn with probability proportional to the product of its positions' class
    weights exp(logw) [C, K], among the paths from `start` that end in `ends` [S] bool, and whether any such
    path has weight (0-d bool: a cold temperature can underflow them all). Forward sums over the pairs, then
    backwards: uniform[C] picks the end state, uniform[i] position i's pair into the state after it, and then
    (reused: a draw among one pair's edges, independent of the draw among pairs) its class within that pair."""
    lse = _by_pair(a, logw, "logsumexp")
    C, S, dev, dtype = lse.shape[0], a.states, logw.device, logw.dtype
    alpha = torch.full((C + 1, S), NEG, dtype=dtype, device=dev)
    alpha[0, start] = 0.0
    for i in range(C):
        cand = alpha[i][a.pair_src] + lse[i]
        top = torch.full((S,), NEG, dtype=dtype, device=dev).scatter_reduce(0, a.pair_dst, cand, "amax")
        shift = torch.where(top > NEG, top, 0.0)
        mass = torch.zeros(S, dtype=dtype, device=dev).index_add_(0, a.pair_dst, (cand - shift[a.pair_dst]).exp())
        alpha[i + 1] = mass.log() + shift
    last = torch.where(ends, alpha[C], NEG)
    state = _pick(last, uniform[C])
    chosen = torch.empty(C, dtype=torch.int64, device=dev)
    for i in range(C - 1, -1, -1):
        chosen[i] = _pick(torch.where(a.pair_dst == state, alpha[i][a.pair_src] + lse[i], NEG), uniform[i])
        state = a.pair_src[chosen[i]]
    return _within(a, chosen, logw, uniform[:C]), last.amax() > NEG


def _pick(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """An index drawn from softmax(logits) by inverse CDF with the uniform u (0-d result)."""
    p = torch.softmax(logits, 0).cumsum(0)
    return torch.searchsorted(p, (u * p[-1]).reshape(1), right=True)[0].clamp(max=len(p) - 1)


def draw_in_class(
    weights: torch.Tensor, classes: torch.Tensor, a: TokenAutomaton, uniform: torch.Tensor
) -> torch.Tensor:
    """Each position's token drawn within its class [C], proportional to its weights [C, V]."""
    inside = torch.where(a.class_of[None, :] == classes[:, None], weights, 0.0)
    cum = inside.cumsum(-1)
    pick = torch.searchsorted(cum, (uniform * cum[:, -1])[:, None], right=True)[:, 0]
    return pick.clamp(max=weights.shape[1] - 1)


def constrained_canvas(
    a: TokenAutomaton,
    start: torch.Tensor,
    logits: torch.Tensor,
    temperature: torch.Tensor,
    ends: torch.Tensor,
    uniform: torch.Tensor,
    fixed: torch.Tensor | None = None,
) -> ConstrainedCanvas:
    """One constrained row's canvases for this step. logits [C, V] (softcapped, untempered); temperature (0-d)
    the row's this step; ends [S] bool: where this canvas may end (canvas_ends); uniform [2, C + 1]; fixed [C]
    (-1: free) pins a canvas template's positions to their tokens."""
    logp = torch.log_softmax(logits.float(), -1)
    if fixed is not None:
        pinned = fixed >= 0
        only = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, fixed.clamp(min=0)[:, None], True)
        logp = torch.where(pinned[:, None] & ~only, NEG, logp)
    best, first = class_max(logp, a)
    classes, end = viterbi(a, start, best, ends)
    argmax = first.gather(1, classes[:, None])[:, 0]
    tempered = logp / temperature.clamp(min=1e-6)
    weights = (tempered - tempered.amax(-1, keepdim=True)).exp()
    path, weighed = sample_path(a, start, class_logsum(weights, a), ends, uniform[0])
    sample = draw_in_class(weights, path, a, uniform[1, :-1])
    sample = torch.where(weighed, sample, argmax)  # no path has weight this cold: its limit, the best path
    return ConstrainedCanvas(argmax, sample, end)
