"""Triton kernels against their torch references, in Triton's interpreter on this CPU (conftest sets
TRITON_INTERPRET=1 where there is no GPU): small shapes with empty experts, uneven groups, tails in every
dimension, every weight format. The kernels must give the reference's values to rounding of the sum order, in
fp32 and in bf16 (they round to bf16 where the reference does)."""

from __future__ import annotations

import pytest
import torch

from model.config import SamplerSettings, TextConfig
from model.denoiser import Denoiser, Request
from model.kernels import attention, resolve, vocab
from model.kernels.moe import Tiles, align, fused_experts, reference, run, tiles_for
from model.kv_cache import KVCache, denoise_attention
from model.presets import preset
from model.quant import quantize
from model.sampler import draw, entropy_and_weights, row_max
from model.weights import random_network

pytest.importorskip("triton")


def routing(tokens: int, experts: int, k: int, seed: int, skip: tuple[int, ...] = ()) -> tuple:
    """(top-k routing weights [T, k], experts [T, k]) with the experts in `skip` never chosen and the rest
    chosen unevenly (a skewed router)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen) + torch.linspace(0, 3, experts)
    logits[:, list(skip)] = -torch.inf
    weights, chosen = torch.softmax(logits, -1).topk(k, -1)
    return weights / weights.sum(-1, keepdim=True), chosen


def test_align_puts_every_pair_in_one_block_of_its_expert():
    _, chosen = routing(37, 7, 3, seed=1, skip=(2, 5))
    blocks = align(chosen, 7, block_m=16)
    p = chosen.numel()
    rows = -(-(p + 7 * 15) // 16) * 16
    assert blocks.pairs.shape == (rows,) and blocks.expert.shape == (rows // 16,)  # fixed by T, k, E alone
    real = blocks.pairs[blocks.pairs < p].long()
    assert sorted(real.tolist()) == list(range(p))  # each pair once
    flat = chosen.reshape(-1)
    for b, e in enumerate(blocks.expert.tolist()):
        in_block = blocks.pairs[b * 16 : (b + 1) * 16]
        mine = in_block[in_block < p].long()
        if e < 0:
            assert mine.numel() == 0  # past the last block: nothing
        else:
            assert mine.numel() > 0 and (flat[mine] == e).all()  # one expert's pairs, never an empty block
    used = set(blocks.expert[blocks.expert >= 0].tolist())
    assert used == set(flat.tolist()) and not used & {2, 5}
    counts = torch.bincount(flat, minlength=7)
    assert (blocks.expert >= 0).sum() == sum(-(-int(c) // 16) for c in counts)


SHAPES = [  # tokens, hidden, moe intermediate, experts, top-k, tiles: tails in M rows, N and K
    (20, 64, 32, 6, 2, Tiles(16, 16, 32)),
    (9, 48, 48, 5, 3, Tiles(16, 32, 32)),  # N and K tails: 48 of 32-wide blocks (int4: K blocks of 16)
    (33, 32, 16, 4, 2, Tiles(32, 16, 16)),
]


def case(shape: tuple, fmt: str, dtype: torch.dtype, seed: int, skip: tuple[int, ...] = ()) -> tuple:
    """(z, experts, routing weights, gate_up, down) for one of SHAPES in one format and dtype."""
    t, h, m, e, k, _ = shape
    w, chosen = routing(t, e, k, seed=seed, skip=skip)
    z = torch.randn(t, h, generator=torch.Generator().manual_seed(seed + 100)).to(dtype)
    return (z, chosen, w, *weights_for(fmt, h, m, e, dtype, seed=seed + 200))


def weights_for(fmt: str, hidden: int, inter: int, experts: int, dtype: torch.dtype, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) * inter**-0.5
    return quantize(w1, fmt, dtype, group=16), quantize(w2, fmt, dtype, group=16)


@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_experts_give_the_reference_in_fp32(fmt, shape):
    args = case(shape, fmt, torch.float32, seed=shape[0], skip=(1,))
    assert torch.allclose(run(*args, tiles=shape[-1]), reference(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
def test_fused_experts_round_where_the_reference_rounds_in_bf16(fmt):
    args = case(SHAPES[0], fmt, torch.bfloat16, seed=3)
    ours, ref = run(*args, tiles=SHAPES[0][-1]), reference(*args)
    z, chosen, w, *_ = args
    exact = reference(z.float(), chosen, w, *case(SHAPES[0], fmt, torch.float32, seed=3)[3:])
    err, rounding = (ours - ref).abs().max(), (ref - exact).abs().max()
    assert err < 0.05 * rounding  # the same roundings: far closer to the reference than bf16 is to fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_activations_quantize_per_row_as_the_reference_does(dtype):
    args = case(SHAPES[1], "fp8", dtype, seed=5)
    ours = run(*args, tiles=SHAPES[1][-1], fp8_activations=True)
    assert torch.allclose(ours, reference(*args, fp8_activations=True), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fp8 activations need fp8 weights"):
        run(*case(SHAPES[1], "int4", dtype, seed=5), fp8_activations=True)


@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
def test_the_operator_traces_whole_under_torch_compile_and_gives_the_kernels_values(fmt):
    args = case(SHAPES[2], fmt, torch.bfloat16, seed=6)
    compiled = torch.compile(lambda *a: fused_experts(*a) * 2, fullgraph=True, backend="aot_eager")
    expected = run(*args)  # the tiles the operator picks for these shapes
    assert torch.equal(fused_experts(*args), expected)
    assert torch.equal(compiled(*args), expected * 2)


def test_tiles_grow_with_rows_per_expert_and_kernels_resolve_per_device():
    one_canvas, sixteen = tiles_for(256 * 8, 128), tiles_for(16 * 256 * 8, 128)
    assert one_canvas.block_m == 16 and sixteen.block_m == 128
    assert resolve("auto", torch.device("cpu")) == "torch"  # the interpreter is for tests, not for serving
    assert resolve("triton", torch.device("cpu")) == "triton"  # asked for: the interpreter runs it
    with pytest.raises(ValueError, match="kernels must be one of"):
        resolve("cuda", torch.device("cpu"))


@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
def test_the_network_with_kernels_gives_the_torch_paths_logits(fmt):
    """Prefill and denoise of a tiny network (heads of 16 and 32: the attention kernel's smallest tiles), rows in
    scattered slots at different context lengths, one past the sliding window: the experts and the denoising
    attention through the Triton kernels give the torch code's logits (fp32: the same values to rounding)."""
    cfg = TextConfig.from_hf(preset("tiny", head_dim=16, global_head_dim=32))
    net = random_network(cfg, dtype=torch.float32, seed=4, weights=fmt)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (3, 12), generator=gen)
    canvas = torch.randint(0, cfg.vocab_size, (3, cfg.canvas_length), generator=gen)
    slots, lengths = torch.tensor([0, 2, 1]), torch.tensor([12, 3, 9])
    assert lengths.max() > cfg.sliding_window
    logits = []
    for kernels in ("torch", "triton"):
        net.kernels = resolve(kernels, net.device)
        cache = KVCache(cfg, 3, 64, "cpu", net.dtype)
        net.prefill(cache, slots, prompts, lengths)
        logits.append(net.logits(net.denoise(cache, slots, canvas, None)))
    assert torch.allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiles two regions over two row counts: about 30 s in the interpreter
def test_the_compiled_denoiser_runs_the_kernels_in_its_regions():
    """The experts' and the attention's operators inside the compiled regions (aot_eager, fullgraph, rows
    dynamic): the eager kernels' tokens."""
    cfg = TextConfig.from_hf(preset("tiny", head_dim=16, global_head_dim=32))  # the attention kernel's tiles
    net = random_network(cfg, dtype=torch.bfloat16, seed=3, weights="int4", compute_mode="native")
    net.kernels = resolve("triton", net.device)
    C = cfg.canvas_length
    reqs = [Request([2, 5, 6, 7], 2 * C, SamplerSettings(max_denoising_steps=3), seed=1),
            Request([2, 9], C, SamplerSettings(max_denoising_steps=2), seed=2)]  # fmt: skip
    torch._dynamo.reset()
    compiled = Denoiser(net, slots=2, max_context=64, eos_token_ids=(), compile=True, compile_backend="aot_eager")
    eager = Denoiser(net, slots=2, max_context=64, eos_token_ids=(), static_shapes=True)
    assert [g.tokens for g in compiled.generate(reqs)] == [g.tokens for g in eager.generate(reqs)]


def attention_case(rows: int, n: int, heads: int, kv_heads: int, d: int, capacity: int, dtype, seed: int) -> tuple:
    """(cache keys, cache values, q, k, v, slots, ctx): rows in scattered slots, each seeing a different number
    of cached entries (none, some, all), entries past ctx holding garbage a kernel must not read."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    ck, cv = rand(rows + 2, capacity, kv_heads, d), rand(rows + 2, capacity, kv_heads, d)
    slots = torch.randperm(rows + 2, generator=gen)[:rows]
    ctx = torch.tensor([0, capacity, 5, 1, capacity - 3, 17][:rows]).clamp(max=capacity)
    q, k, v = rand(rows, n, heads, d), rand(rows, n, kv_heads, d), rand(rows, n, kv_heads, d)
    return ck, cv, q, k, v, slots, ctx


def attention_reference(ck, cv, q, k, v, slots, ctx) -> torch.Tensor:
    capacity, n = ck.shape[1], q.shape[1]
    idx = torch.arange(capacity + n)
    mask = (idx[None, :] < ctx[:, None]) | (idx[None, :] >= capacity)
    return denoise_attention(
        ck.float(), cv.float(), q.float(), k.float(), v.float(), capacity, mask[:, None, None], slots
    )


@pytest.mark.parametrize(
    "shape",  # rows, canvas, heads, kv heads, head dim, cache capacity, blocks: tails of queries and keys
    [(3, 24, 4, 2, 16, 40, (16, 16, 4)), (6, 8, 4, 1, 32, 20, (16, 16, 4)), (2, 40, 8, 8, 16, 7, (32, 16, 4))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denoise_attention_reads_the_cache_in_place_as_the_masked_reference_does(shape, dtype):
    *dims, blocks = shape
    args = attention_case(*dims, dtype=dtype, seed=dims[0])
    ours = attention.denoise(*args, blocks=list(blocks))
    ref = attention_reference(*args)
    assert ours.dtype == dtype and ours.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the output's rounding (inputs are bf16 in both)
    assert torch.allclose(ours.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("vocab_size", [128, 1024, 4480])  # one block, several, a row not a power of two
def test_the_vocab_kernel_gives_the_torch_passs_argmax_weights_entropy_and_samples(vocab_size):
    gen = torch.Generator().manual_seed(vocab_size)
    n = 9
    raw = (torch.randn(n, vocab_size, generator=gen) * 3).to(torch.bfloat16)
    raw[0, 5] = raw[0, 17] = raw[0].max() + 1  # a tie for the max: the first index wins
    scale = torch.rand(n, generator=gen) * 40 + 0.5
    scale[1] = 2 * 30 / 1e-6  # the temperature floor: one weight left, the rest underflow
    uniform = torch.rand(n, generator=gen)
    uniform[2] = 1 - 2**-24  # the largest uniform: the last block's end
    weights = torch.empty(n, vocab_size, dtype=torch.bfloat16)
    top, argmax, entropy, norm, sample = vocab.fused(raw, scale, uniform, weights)
    sig = raw.float().sigmoid()
    ref_top, ref_argmax = row_max(sig)
    probs = torch.empty_like(sig)
    ref_entropy, ref_norm, sums = entropy_and_weights((sig - ref_top[:, None]) * scale[:, None], probs)
    assert argmax[0] == 5 and torch.equal(argmax, ref_argmax) and torch.equal(top, ref_top)
    assert torch.equal(sample, draw(probs, uniform, block_sums=sums)) and sample[1] == argmax[1]
    assert torch.allclose(entropy, ref_entropy, atol=2e-6) and torch.allclose(norm, ref_norm, rtol=1e-6)
    assert torch.allclose(weights.float(), probs, rtol=2**-8, atol=0)  # in bf16 (one rounding), for the GEMM


def test_the_denoisers_vocab_pass_through_the_kernel_gives_the_torch_pass(monkeypatch):
    """The whole pass of a bf16 denoiser (LM head, the tile's kernel, soft embeddings, log-probabilities, rows
    that skip their soft embedding), over several tiles, with the vocabulary kernel or the torch code."""
    cfg = TextConfig.from_hf(preset("tiny"))
    net = random_network(cfg, dtype=torch.bfloat16, seed=6, compute_mode="native")
    d = Denoiser(net, slots=3, max_context=32, eos_token_ids=(), vocab_workspace_bytes=cfg.vocab_size * 4 * 2 * 5)
    hidden = torch.randn(3, cfg.canvas_length, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    idx, step = torch.tensor([2, 0, 1]), torch.tensor([0, 3, 1])
    temp = torch.tensor([1.0, 0.3, 1e-6])
    args = (hidden, temp, idx, step, torch.tensor([True, False, True]), torch.tensor([2, -1, 0]))
    assert d.vocab_tile(3 * cfg.canvas_length) < 3 * cfg.canvas_length  # several tiles
    outs = []
    for kernels in ("torch", "triton"):
        net.kernels = resolve(kernels, net.device)
        outs.append(d._vocab_pass(*args))
    (h0, s0, a0, soft0, lp0), (h1, s1, a1, soft1, lp1) = outs
    assert torch.equal(a0, a1) and torch.equal(s0, s1) and torch.allclose(h0, h1, atol=2e-6)
    assert torch.allclose(soft0, soft1, rtol=1e-2, atol=1e-3) and not soft1[1].any()  # row 1 skips it
    assert torch.equal(lp0.top_ids, lp1.top_ids) and torch.allclose(lp0.top.nan_to_num(), lp1.top.nan_to_num())
