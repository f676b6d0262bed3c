"""Sampler decisions against transformers' own functions on identical logits, and the fused vocabulary pass."""

from __future__ import annotations

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from model import rng
from model.config import SamplerSettings
from model.denoiser import Denoiser, Request
from model.sampler import accept, decide, draw, entropy_and_weights, row_max, temperature
from model.weights import load_network


def varied_logits(b: int, c: int, v: int, seed: int = 0) -> torch.Tensor:
    """Softcapped logits from flat to very peaked (one hot token lifted by 0..50), so entropies span decades."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(b, c, v, generator=gen) * 0.5
    lift = torch.linspace(0, 50, b * c)[torch.randperm(b * c, generator=gen)].reshape(b, c)
    hot = torch.randint(0, v, (b, c, 1), generator=gen)
    raw.scatter_add_(-1, hot, lift[..., None])
    return 30 * torch.tanh(raw / 30)


def hf_processed(logits: torch.Tensor, t_min: float, t_max: float, cap: int, remaining: int) -> torch.Tensor:
    proc = LinearTemperatureScheduleLogitsProcessor(t_min=t_min, t_max=t_max, max_denoising_steps=cap)
    return proc(None, logits, cur_step=torch.tensor(remaining, dtype=torch.int32))


def ours_stats(processed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, c, v = processed.shape
    flat = processed.reshape(b * c, v)
    top, argmax = row_max(flat, block=4)  # 500 = 125 blocks of 4
    probs = torch.empty_like(flat)
    entropy, z, _ = entropy_and_weights(flat - top[:, None], probs, block=4)
    probs.div_(z[:, None])
    return entropy.view(b, c), argmax.view(b, c), probs.view(b, c, v)


def test_temperature_schedule_matches():
    for cap in (1, 7, 48):
        for t_min, t_max in ((0.4, 0.8), (0.1, 1.3)):
            steps = torch.arange(cap)
            ours = temperature(steps, torch.full((cap,), cap), torch.tensor(t_min), torch.tensor(t_max))
            for k in range(cap):
                ref = 1 / hf_processed(torch.ones(1, 1, 1), t_min, t_max, cap, cap - k)[0, 0, 0]
                assert torch.allclose(ours[k], ref, rtol=1e-6), (cap, k)


def test_entropy_acceptance_and_argmax_match():
    logits = varied_logits(3, 64, 500)
    bounds = [0.1, 0.5, 2.0]
    processed = hf_processed(logits, 0.4, 0.8, 10, 6)
    entropy, argmax, probs = ours_stats(processed)
    ref_entropy = torch.distributions.Categorical(logits=processed).entropy()
    assert ref_entropy.min() < 1e-3 and ref_entropy.max() > 4  # the test spans peaked and flat rows
    assert torch.allclose(entropy, ref_entropy, atol=2e-5, rtol=1e-5)
    assert torch.allclose(probs, torch.softmax(processed, -1), atol=1e-6)
    assert torch.equal(argmax, processed.argmax(-1))
    mask = accept(entropy, torch.tensor(bounds))
    for row, bound in enumerate(bounds):
        sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 64, 500, 10)
        current = torch.zeros(1, 64, dtype=torch.long)
        sampler.accept_canvas(current, current + 1, processed[row : row + 1], 6)
        assert torch.equal(mask[row], sampler.accepted_token_mask[0])
    assert mask.sum(-1).tolist() == sorted(mask.sum(-1).tolist())  # a larger bound accepts more
    assert (mask.sum(-1) >= 1).all()


def test_stop_decision_matches_over_steps():
    """Rows with different stability thresholds over four steps; the last row is never confident."""
    b, c, v = 4, 16, 50
    stability = [0, 1, 2, 1]
    confidence = [0.5, 0.5, 0.5, 0.5]
    refs = [StableAndConfidentStoppingCriteria(s, conf) for s, conf in zip(stability, confidence)]
    history = torch.full((b, 3, c), -1, dtype=torch.long)
    gen = torch.Generator().manual_seed(3)
    peaked = torch.full((b, c, v), -20.0)
    peaked[:3, :, 7] = 20.0  # rows 0-2: entropy ~1e-14; row 3: uniform, entropy log(50)
    for step in range(4):
        argmax = torch.randint(0, v, (b, c), generator=gen) if step < 1 else torch.full((b, c), 7)
        entropy, _, _ = ours_stats(peaked)
        d = decide(
            entropy,
            argmax,
            argmax,
            history,
            step=torch.full((b,), step),
            cap=torch.full((b,), 10),
            bound=torch.full((b,), 0.1),
            stability=torch.tensor(stability),
            confidence=torch.tensor(confidence),
            seed=torch.arange(b),
            canvas_index=torch.zeros(b, dtype=torch.long),
            vocab_size=v,
        )
        expected = [bool(r(argmax[i : i + 1], peaked[i : i + 1])[0]) for i, r in enumerate(refs)]
        assert d.done.tolist() == expected, (step, d.done.tolist(), expected)
    assert expected == [True, True, True, False]  # by the last step every confident row has stopped


def test_step_cap_ends_a_canvas_and_renoise_keeps_only_accepted():
    b, c, v = 2, 32, 40
    entropy = torch.rand(b, c, generator=torch.Generator().manual_seed(4)) * 0.2
    sample = torch.randint(0, v, (b, c))
    d = decide(
        entropy,
        sample,
        sample,
        torch.full((b, 1, c), -1, dtype=torch.long),
        step=torch.tensor([4, 2]),
        cap=torch.tensor([5, 5]),
        bound=torch.tensor([0.1, 0.1]),
        stability=torch.tensor([1, 1]),
        confidence=torch.tensor([-float("inf"), -float("inf")]),
        seed=torch.tensor([1, 2]),
        canvas_index=torch.tensor([0, 0]),
        vocab_size=v,
    )
    assert d.done.tolist() == [True, False]
    assert torch.equal(d.canvas[d.accepted], sample[d.accepted])
    noise = rng.random_ids(torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([4, 2]), rng.NOISE, c, v)
    assert torch.equal(d.canvas[~d.accepted], noise[~d.accepted])


def test_inverse_cdf_draw_follows_the_distribution():
    v, n = 6, 60000
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    u = rng.random_uniform(torch.tensor([5]), torch.tensor([0]), torch.tensor([0]), rng.DRAW, n)[0]
    weights = (3 * p).repeat(n, 1)  # unnormalised weights are what the denoiser passes
    for block in (2, 3, 6):  # blocks of the row, and the whole row as one block
        ids = draw(weights, u, block=block)
        freq = torch.bincount(ids, minlength=v).float() / n
        assert (freq - p).abs().max() < 0.01, block
        assert freq[5] == 0  # a zero-probability token is never drawn


def test_blocked_draw_is_the_inverse_cdf():
    """Two-level search lands where a search of the whole row's cumulative sum (float64) lands."""
    gen = torch.Generator().manual_seed(3)
    weights = torch.rand(400, 1024, generator=gen) ** 8  # uneven rows, like trained logits
    u = torch.rand(400, generator=gen)
    ids = draw(weights, u, block=64)
    cdf = weights.double().cumsum(-1)
    ref = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True)[:, 0]
    assert torch.equal(ids, ref)


def test_row_max_takes_the_first_of_tied_maxima():
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 6, (300, 96), generator=gen).float()  # many ties within and across blocks
    for block in (8, 32, 96, 7):  # 7 does not divide 96: one block
        top, idx = row_max(x, block=block)
        ref_top, ref_idx = x.max(-1)
        assert torch.equal(top, ref_top) and torch.equal(idx, ref_idx), block


def test_fused_vocabulary_pass_matches_plain_logits(window):
    """The denoiser's sigmoid-form, tiled LM-head pass gives transformers' processed-logit statistics."""
    net, ckpt = load_network(str(window.path))
    c = ckpt.config
    d = Denoiser(net, slots=3, max_context=64, vocab_workspace_bytes=5 * 2 * c.vocab_size * 4)  # 5-token tiles
    slots = [0, 1, 2]
    for s, steps in zip(slots, (4, 9, 30)):
        d.admit(s, SamplerSettings(max_denoising_steps=steps), seed=s)
    d.prefill(slots, [[2, 5, 6], [2, 9], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    d.start_canvas(slots)
    idx = torch.tensor(slots)
    hidden = net.denoise(d.cache, idx, d.canvas[idx], None)
    step = torch.tensor([0, 3, 7])
    temp = temperature(step, d.cap[idx], d.t_min[idx], d.t_max[idx])
    top_k = torch.tensor([3, -1, 0])  # top 3 alternatives, none at all, the chosen token's alone
    entropy, sample, argmax, soft, lp = d._vocab_pass(hidden, temp, idx, step, top_k=top_k)
    processed = net.logits(hidden) / temp[:, None, None]
    ref_entropy = torch.distributions.Categorical(logits=processed).entropy()
    assert torch.allclose(entropy, ref_entropy, atol=1e-4)
    assert torch.equal(argmax, processed.argmax(-1))
    assert torch.allclose(soft, net.soft_embedding(torch.softmax(processed, -1)), atol=1e-4)
    assert sample.min() >= 0 and sample.max() < c.vocab_size
    # log-probabilities: the model's own (untempered) distribution, for the rows that asked
    ref = torch.log_softmax(net.logits(hidden), -1)
    for row in (0, 2):
        assert torch.allclose(lp.chosen[row], ref[row].gather(-1, argmax[row, :, None])[:, 0], atol=1e-4)
    ref_top, ref_ids = ref[0].topk(3, dim=-1)
    assert torch.equal(lp.top_ids[0], ref_ids)
    assert torch.allclose(lp.top[0], ref_top, atol=1e-4)
    assert lp.chosen[1].isnan().all() and (lp.top_ids[1] == -1).all()


def test_temperature_scales_the_schedule_and_zero_is_the_argmax_path(window):
    """A request's temperature multiplies its t_max -> t_min schedule: 0.5 over (0.4, 0.8) runs exactly as 1 over
    (0.2, 0.4). At 0 every sample is the argmax, so every position is accepted on the first step."""
    net, _ = load_network(str(window.path))
    d = Denoiser(net, slots=2, max_context=64, eos_token_ids=())
    prompt = [2, 7, 8]
    half = SamplerSettings(max_denoising_steps=4, t_min=0.4, t_max=0.8, temperature=0.5)
    same = SamplerSettings(max_denoising_steps=4, t_min=0.2, t_max=0.4)
    a, b = (d.generate([Request(prompt, 32, s, seed=5)])[0] for s in (half, same))
    assert a.tokens == b.tokens and a.steps == b.steps
    greedy = SamplerSettings(max_denoising_steps=4, temperature=0.0)
    d.admit(0, greedy, seed=1)
    d.prefill([0], [prompt])
    d.start_canvas([0])
    first = d.step([0])
    assert torch.equal(d.canvas[0], first.argmax[0])  # every position took its argmax


def test_generation_is_reproducible_and_seed_dependent(window):
    net, _ = load_network(str(window.path))
    d = Denoiser(net, slots=2, max_context=64, eos_token_ids=())
    req = Request([2, 7, 8], 16, SamplerSettings(max_denoising_steps=3), seed=9)
    a, b = d.generate([req])[0], d.generate([req])[0]
    other = d.generate([Request([2, 7, 8], 16, SamplerSettings(max_denoising_steps=3), seed=10)])[0]
    assert a.tokens == b.tokens
    assert a.tokens != other.tokens
