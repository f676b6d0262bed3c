"""Our network against transformers, per forward kind, on tiny random checkpoints loaded with our loader."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from model.kv_cache import KVCache
from model.weights import load_network

FP32_TOL = 1e-4


def hf_prefill(hf, prompt: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
    with torch.no_grad():
        hf.model.encoder(input_ids=prompt[None], cache=cache)
    return cache


def hf_commit(hf, cache: DynamicCache, canvas: torch.Tensor) -> None:
    start = cache.get_seq_length()
    pos = torch.arange(start, start + canvas.shape[0])[None]
    with torch.no_grad():
        hf.model.encoder(input_ids=canvas[None], cache=cache, position_ids=pos)


def hf_denoise(hf, cache: DynamicCache, canvas: torch.Tensor, sc_logits: torch.Tensor | None) -> torch.Tensor:
    start = cache.get_seq_length()
    pos = torch.arange(start, start + canvas.shape[0])[None]
    with torch.no_grad():
        out = hf(
            decoder_input_ids=canvas[None],
            cache=cache,
            decoder_position_ids=pos,
            self_conditioning_logits=None if sc_logits is None else sc_logits[None],
        )
    return out.logits[0]


def our_kv(cache: KVCache, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot's cached K/V in position order, shaped like transformers' [kv_heads, tokens, head_dim]."""
    n = int(cache.lengths[slot])
    k, v = cache.keys[layer][slot], cache.values[layer][slot]
    if cache.config.is_sliding(layer):
        idx = torch.arange(max(0, n - cache.ring), n) % cache.ring
    else:
        idx = torch.arange(n)
    return k[idx].transpose(0, 1).float(), v[idx].transpose(0, 1).float()


def assert_kv_match(cache: KVCache, slot: int, ref: DynamicCache, tol: float) -> None:
    for layer in range(cache.config.num_layers):
        k, v = our_kv(cache, layer, slot)
        rk, rv = ref.layers[layer].keys[0].float(), ref.layers[layer].values[0].float()
        assert k.shape == rk.shape, f"layer {layer}: {k.shape} vs {rk.shape}"
        assert (k - rk).abs().max() <= tol, f"layer {layer} keys differ by {(k - rk).abs().max()}"
        assert (v - rv).abs().max() <= tol, f"layer {layer} values differ by {(v - rv).abs().max()}"


@pytest.mark.parametrize("name", ["window", "wide_global"])
def test_all_forward_kinds_match_transformers_fp32(checkpoints, name):
    """Rows of different context lengths in one batch, over several commits so sliding windows are exceeded."""
    built = checkpoints[name]
    hf = built.hf
    net, ckpt = load_network(str(built.path))
    c = ckpt.config
    C, V = c.canvas_length, c.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (n,), generator=gen) for n in (5, c.sliding_window + 5, 2)]
    slots = torch.tensor([3, 0, 1])
    cache = KVCache(c, slots=4, max_context=128, device="cpu", dtype=torch.float32)
    count = torch.tensor([len(p) for p in prompts])
    padded = torch.zeros(3, int(count.max()), dtype=torch.int64)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    net.prefill(cache, slots, padded, count)
    refs = [hf_prefill(hf, p) for p in prompts]
    for row, slot in enumerate(slots.tolist()):
        assert_kv_match(cache, slot, refs[row], FP32_TOL)

    for _ in range(3):  # denoise twice (with and without self-conditioning), then commit
        canvas = torch.randint(0, V, (3, C), generator=gen)
        sc_logits = torch.randn(3, C, V, generator=gen) * 4
        before = [t.clone() for t in cache.keys + cache.values]
        ours0 = net.logits(net.denoise(cache, slots, canvas, None))
        soft = net.soft_embedding(torch.softmax(sc_logits, dim=-1))
        ours1 = net.logits(net.denoise(cache, slots, canvas, soft))
        assert all(torch.equal(a, b) for a, b in zip(before, cache.keys + cache.values)), "denoise wrote the cache"
        for row in range(3):
            ref0 = hf_denoise(hf, refs[row], canvas[row], None)
            ref1 = hf_denoise(hf, refs[row], canvas[row], sc_logits[row])
            assert ref0.abs().max() > 0.1  # the logits carry signal
            assert (ours0[row] - ref0).abs().max() <= FP32_TOL
            assert (ours1[row] - ref1).abs().max() <= FP32_TOL
        net.commit(cache, slots, canvas)
        for row, slot in enumerate(slots.tolist()):
            hf_commit(hf, refs[row], canvas[row])
            assert int(cache.lengths[slot]) == refs[row].get_seq_length()
            assert_kv_match(cache, slot, refs[row], FP32_TOL)
    assert int(cache.lengths.max()) > c.sliding_window + 2 * C  # the windows really were exceeded


@pytest.mark.parametrize("compute", ["auto", "native"])
def test_bf16_is_as_close_to_fp32_as_transformers_bf16(checkpoints, compute):
    """bf16 tolerance: our bf16 logits may differ from the fp32 evaluation of the same (bf16-valued) weights by at
    most 1.5x what transformers' own bf16 run differs by (plus 0.02 absolute), and agree on the argmax at least
    as often minus 2 points. Both runs round differently, so no tighter bound between the two bf16 runs holds."""
    built = checkpoints["bf16"]
    hf16 = built.hf
    hf32 = type(hf16).from_pretrained(built.path, dtype=torch.float32).eval()
    net, ckpt = load_network(str(built.path), dtype=torch.bfloat16, compute_mode=compute)
    c = ckpt.config
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, c.vocab_size, (c.sliding_window + 3,), generator=gen)
    canvas = torch.randint(0, c.vocab_size, (c.canvas_length,), generator=gen)
    sc_logits = torch.randn(c.canvas_length, c.vocab_size, generator=gen) * 4
    ref = hf_denoise(hf32, hf_prefill(hf32, prompt), canvas, sc_logits)
    theirs = hf_denoise(hf16, hf_prefill(hf16, prompt), canvas, sc_logits.bfloat16())
    cache = KVCache(c, 1, 64, "cpu", net.dtype)
    slots = torch.tensor([0])
    net.prefill(cache, slots, prompt[None], torch.tensor([len(prompt)]))
    soft = net.soft_embedding(torch.softmax(sc_logits, dim=-1))[None]
    ours = net.logits(net.denoise(cache, slots, canvas[None], soft))[0]
    their_err = (theirs - ref).abs().max().item()
    our_err = (ours - ref).abs().max().item()
    print(f"bf16 ({compute}): ours max err {our_err:.4f}, transformers {their_err:.4f}")
    assert our_err <= 1.5 * their_err + 0.02, (our_err, their_err)
    their_agree = (theirs.argmax(-1) == ref.argmax(-1)).float().mean().item()
    our_agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert our_agree >= their_agree - 0.02, (our_agree, their_agree)


def test_grouped_expert_product_equals_the_expert_loop(window):
    """The GPU path runs all experts in one grouped GEMM; on CPU fp32 both paths can be compared directly."""
    net, ckpt = load_network(str(window.path))
    c = ckpt.config
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(40, c.hidden_size, generator=gen)
    router = torch.randn(40, c.num_experts, generator=gen)
    lw = net.w.layers[0]
    net.use_grouped_mm = False
    loop = net._experts(lw, z, router)
    net.use_grouped_mm = True
    grouped = net._experts(lw, z, router)
    assert torch.allclose(loop, grouped, atol=1e-5)


def test_an_empty_per_layer_config_means_no_overrides(tmp_path):
    """transformers writes `per_layer_config: {}` when the full layers' head sizes equal the sliding ones; that
    is "no overrides", not "the released model's global head size (512)", which would refuse the checkpoint."""
    from model.presets import preset, random_hf_model, write_word_tokenizer

    tiny = preset("tiny")["text_config"]
    config = preset("tiny", global_head_dim=tiny["head_dim"], num_global_key_value_heads=tiny["num_key_value_heads"])
    hf = random_hf_model(config, seed=5)
    hf.save_pretrained(tmp_path)
    write_word_tokenizer(tmp_path, tiny["vocab_size"])
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["per_layer_config"] == {}
    net, ckpt = load_network(str(tmp_path))
    assert set(ckpt.config.head_dims) == {tiny["head_dim"]}
    assert set(ckpt.config.kv_heads) == {tiny["num_key_value_heads"]}
    prompt = torch.tensor([2, 5, 6, 7, 8])
    canvas = torch.arange(net.config.canvas_length) % net.config.vocab_size
    ref = hf_denoise(hf, hf_prefill(hf, prompt), canvas, None)
    cache = KVCache(net.config, 1, 32, "cpu", net.dtype)
    slots = torch.tensor([0])
    net.prefill(cache, slots, prompt[None], torch.tensor([len(prompt)]))
    ours = net.logits(net.denoise(cache, slots, canvas[None], None))[0]
    assert (ours - ref).abs().max() <= FP32_TOL
