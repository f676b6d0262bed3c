"""End-to-end behaviour of the denoiser: lengths, EOS, cache lifecycle, batch independence, bad input."""

from __future__ import annotations

import pytest
import torch

from model.config import SamplerSettings
from model.denoiser import Denoiser, Request
from model.weights import load_network

STEPS = SamplerSettings(max_denoising_steps=3)


@pytest.fixture(scope="module")
def net(window):
    return load_network(str(window.path))[0]


def test_output_is_whole_canvases_and_cache_holds_all_but_the_last(net):
    C = net.config.canvas_length
    d = Denoiser(net, slots=2, max_context=128, eos_token_ids=())
    prompt = [2, 9, 10, 11, 12]
    out = d.generate([Request(prompt, 20, STEPS, seed=1)])[0]
    assert len(out.tokens) == 3 * C  # 20 new tokens round up to three canvases of 8
    assert out.finish_reason == "length"
    assert out.steps == [3, 3, 3]
    assert out.cache_length == len(prompt) + C * 2


def test_eos_truncates_after_the_first_eos(net):
    C = net.config.canvas_length
    d = Denoiser(net, slots=1, max_context=128, eos_token_ids=())
    free = d.generate([Request([2, 4], 4 * C, STEPS, seed=3)])[0].tokens
    # Pick a token that first appears inside the second canvas and declare it the EOS id.
    eos = next(t for t in free[C:] if t not in free[:C])
    cut = free.index(eos)
    d_eos = Denoiser(net, slots=1, max_context=128, eos_token_ids=(eos, 999))
    out = d_eos.generate([Request([2, 4], 4 * C, STEPS, seed=3)])[0]
    assert out.finish_reason == "eos"
    assert out.tokens == free[: cut + 1]
    assert len(out.steps) == 2


def test_denoise_step_leaves_the_cache_unchanged(net):
    d = Denoiser(net, slots=2, max_context=64)
    for s in (0, 1):
        d.admit(s, STEPS, seed=s)
    d.prefill([0, 1], [[2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [2, 3]])
    d.start_canvas([0, 1])
    before = [t.clone() for t in d.cache.keys + d.cache.values] + [d.cache.lengths.clone()]
    d.step([0, 1])
    d.step([1])
    after = d.cache.keys + d.cache.values + [d.cache.lengths]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    d.commit([1])
    assert d.cache.lengths.tolist() == [10, 2 + net.config.canvas_length]


def test_a_row_is_the_same_alone_and_inside_a_batch(net):
    C = net.config.canvas_length
    target = Request([2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 3 * C, SamplerSettings(max_denoising_steps=4), seed=42)
    neighbours = [
        Request([2, 3], 2 * C, SamplerSettings(max_denoising_steps=2), seed=1),
        Request([2, 7, 7, 7], 4 * C, SamplerSettings(max_denoising_steps=6, t_max=1.2, entropy_bound=0.5), seed=2),
        Request(
            [2], C, SamplerSettings(max_denoising_steps=5, stability_threshold=0, confidence_threshold=9.0), seed=3
        ),
    ]
    alone = Denoiser(net, slots=1, max_context=64, eos_token_ids=()).generate([target])[0]
    batch = Denoiser(net, slots=4, max_context=64, eos_token_ids=()).generate([neighbours[0], target, *neighbours[1:]])
    assert batch[1].tokens == alone.tokens
    assert batch[1].steps == alone.steps
    assert batch[3].steps == [1]  # stability 0 and a huge confidence threshold: adaptive stop after one step
    assert [len(g.tokens) for g in batch] == [2 * C, 3 * C, 4 * C, C]


def test_bad_requests_are_refused(net):
    d = Denoiser(net, slots=1, max_context=16)
    with pytest.raises(ValueError, match="at least one token"):
        d.generate([Request([], 8, STEPS)])
    with pytest.raises(ValueError, match="cache holds 16"):
        d.generate([Request([2] * 10, 16, STEPS)])
    with pytest.raises(ValueError, match="max_new_tokens"):
        d.generate([Request([2], 0, STEPS)])
    with pytest.raises(ValueError, match="stability_threshold"):
        d.generate([Request([2], 8, SamplerSettings(stability_threshold=9))])
    with pytest.raises(ValueError, match="slots"):
        d.generate([Request([2], 8, STEPS)] * 2)
    with pytest.raises(ValueError, match="t_min"):
        SamplerSettings(t_min=0.9, t_max=0.8)


def test_static_shapes_give_the_same_outputs(net):
    """The compile-friendly path (attention over the whole cache capacity with a mask, soft embedding always
    passed) changes no token: rows of different context lengths, several canvases, different settings."""
    C = net.config.canvas_length
    reqs = [
        Request([2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 3 * C, SamplerSettings(max_denoising_steps=4), seed=42),
        Request([2, 3], 2 * C, SamplerSettings(max_denoising_steps=2), seed=1),
        Request([2, 7, 7, 7], 4 * C, SamplerSettings(max_denoising_steps=5, entropy_bound=0.5), seed=2),
    ]
    eager = Denoiser(net, slots=3, max_context=64, eos_token_ids=()).generate(reqs)
    static = Denoiser(net, slots=3, max_context=64, eos_token_ids=(), static_shapes=True).generate(reqs)
    assert [g.tokens for g in static] == [g.tokens for g in eager]
    assert [g.steps for g in static] == [g.steps for g in eager]
