"""The prefix cache on a tiny checkpoint whose sliding window (8) is far shorter than the prompts: restored
blocks leave a slot exactly as encoding them would (full layers and the sliding rings), a request served from the
cache gives the tokens it gives without it, and eviction is least-recently-used among blocks nothing holds."""

from __future__ import annotations

import pytest
import torch

from model.config import SamplerSettings
from model.denoiser import Denoiser, Request
from model.weights import load_network

STEPS = SamplerSettings(max_denoising_steps=3)
SHARED = [2] + list(range(20, 43))  # 24 tokens: six blocks of 4, three windows of the sliding layers


@pytest.fixture(scope="module")
def net(window):
    return load_network(str(window.path))[0]


def cached(net, blocks: int = 64, block_tokens: int = 4, slots: int = 3) -> Denoiser:
    probe = Denoiser(net, slots=slots, max_context=96, eos_token_ids=())
    per_block = sum(2 * block_tokens * k.shape[2] * k.shape[3] * k.element_size() for k in probe.cache.keys)
    return Denoiser(
        net, slots=slots, max_context=96, eos_token_ids=(), prefix_cache_bytes=blocks * per_block,
        prefix_block_tokens=block_tokens,
    )  # fmt: skip


def slot_state(d: Denoiser, slot: int) -> list[torch.Tensor]:
    n = int(d.cache.lengths[slot])
    out = []
    for layer, (k, v) in enumerate(zip(d.cache.keys, d.cache.values)):
        keep = min(n, d.cache.ring) if d.cache.config.is_sliding(layer) else n
        if d.cache.config.is_sliding(layer):  # the ring's live entries, in position order
            where = torch.arange(n - keep, n) % d.cache.ring
            out += [k[slot, where], v[slot, where]]
        else:
            out += [k[slot, :keep], v[slot, :keep]]
    return out


def test_restored_blocks_leave_the_slot_as_encoding_them_would(net):
    d, plain = cached(net), Denoiser(net, slots=3, max_context=96, eos_token_ids=())
    first = SHARED + [50, 51, 52]
    d.admit(0, STEPS, seed=0)
    assert d.encode([0], [first], []) == [0]  # cold: nothing cached, the six whole blocks stored
    assert len(d.prefix.blocks) == 6
    second = SHARED + [60, 61]
    d.admit(1, STEPS, seed=0)
    assert d.encode([1], [second], []) == [24]  # the shared 24 tokens came from the cache
    plain.admit(1, STEPS, seed=0)
    plain.encode([1], [second], [])
    assert int(d.cache.lengths[1]) == int(plain.cache.lengths[1]) == len(second)
    for a, b in zip(slot_state(d, 1), slot_state(plain, 1)):
        assert torch.allclose(a, b, atol=1e-5)
    assert d.prefix.stats.hit_tokens == 24 and d.prefix.stats.queried_tokens == len(first) + len(second)


def test_a_request_from_the_cache_gives_the_same_tokens(net):
    C = net.config.canvas_length
    d, plain = cached(net), Denoiser(net, slots=3, max_context=96, eos_token_ids=())
    d.generate([Request(SHARED + [70], 2 * C, STEPS, seed=3)])  # warms the cache
    for tail, seed in (([71, 72], 5), ([73], 6), ([74, 75, 76, 77, 78], 7)):
        req = Request(SHARED + tail, 3 * C, SamplerSettings(max_denoising_steps=4), seed=seed)
        hit = d.generate([req])[0]
        assert hit.tokens == plain.generate([req])[0].tokens
    assert d.prefix.stats.hit_tokens >= 3 * 24
    # a whole prompt in the cache still leaves its last token to encode
    exact = Request(SHARED, C, STEPS, seed=8)
    assert d.generate([exact])[0].tokens == plain.generate([exact])[0].tokens


def test_batched_prefills_share_and_store_blocks_once(net):
    d, plain = cached(net), Denoiser(net, slots=3, max_context=96, eos_token_ids=())
    C = net.config.canvas_length
    reqs = [Request(SHARED + [80 + i], 2 * C, STEPS, seed=i) for i in range(3)]
    together = d.generate(reqs)  # three rows with the same new prefix in one forward
    assert [g.tokens for g in together] == [g.tokens for g in plain.generate(reqs)]
    assert len(d.prefix.blocks) == 6 and len(d.prefix.free) == d.prefix.capacity - 6


def test_eviction_takes_the_least_recently_used_block_nothing_holds(net):
    d = cached(net, blocks=4)
    a, b = [2] + list(range(30, 38)), [2] + list(range(60, 68))  # two blocks of 4 whole each (and one token)
    for slot, prompt in enumerate((a, b)):
        d.admit(slot, STEPS, seed=0)
        d.encode([slot], [prompt], [])
    keys = {blk.key: blk for blk in d.prefix.blocks.values()}
    assert len(keys) == 4 and len(d.prefix.free) == 0
    first_a = d.prefix.chain(a)[0][0]
    assert keys[first_a].refs == 1  # held by its child, the second block of a
    # a third prompt needs a block: the least recently used block held by nothing is a's second
    d.admit(2, STEPS, seed=0)
    d.encode([2], [[2] + list(range(90, 95))], [])
    chain_a = [k for k, _, _ in d.prefix.chain(a)]
    assert chain_a[1] not in d.prefix.blocks and chain_a[0] in d.prefix.blocks
    assert d.prefix.blocks[chain_a[0]].refs == 0  # its child is gone: it is evictable now
    assert d.prefix.stats.evicted_blocks == 1
    # a's first block, evictable now, still serves a hit while it is cached
    d.admit(0, STEPS, seed=0)
    assert d.encode([0], [a[:4] + [9, 9]], []) == [4]
