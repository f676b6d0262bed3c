"""Model shapes for benchmarks and tests, as transformers `DiffusionGemmaConfig` keyword dicts.

- tiny: a few hundred thousand parameters, for unit tests;
- mid: hidden 512, 4 layers, 8 experts top-2, vocab 32768, canvas 256, a shape this 2-core CPU runs in seconds;
- full: the released 26B-A4B text shape (needs a GPU).
The vision tower cannot be left out of a transformers model, so each preset carries a tiny one.
"""

from __future__ import annotations

import copy

import torch

from model.config import SamplerSettings

TINY_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=16,
    patch_size=4,
    pooling_kernel_size=1,
    position_embedding_size=16,
)


def _model(text: dict, canvas: int) -> dict:
    """A DiffusionGemmaConfig dict: the text shape, the released model's special ids, a tiny vision tower."""
    v = text["vocab_size"]
    return dict(
        text_config=dict(pad_token_id=0, eos_token_id=1, bos_token_id=2) | text,
        vision_config=dict(TINY_VISION),
        canvas_length=canvas,
        image_token_id=v - 1,
        boi_token_id=v - 3,
        eoi_token_id=v - 2,
    )


PRESETS: dict[str, dict] = {
    "tiny": _model(
        dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            global_head_dim=16,
            num_global_key_value_heads=1,
            num_experts=4,
            top_k_experts=2,
            sliding_window=8,
            max_position_embeddings=1024,
        ),
        canvas=8,
    ),
    "mid": _model(
        dict(
            vocab_size=32768,
            hidden_size=512,
            intermediate_size=2048,
            moe_intermediate_size=256,
            num_hidden_layers=4,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            global_head_dim=128,
            num_global_key_value_heads=1,
            num_experts=8,
            top_k_experts=2,
            sliding_window=512,
            max_position_embeddings=8192,
        ),
        canvas=256,
    ),
    "full": dict(
        _model(
            dict(
                vocab_size=262144,
                hidden_size=2816,
                intermediate_size=2112,
                moe_intermediate_size=704,
                num_hidden_layers=30,
                layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5,
                num_attention_heads=16,
                num_key_value_heads=8,
                head_dim=256,
                global_head_dim=512,
                num_global_key_value_heads=2,
                num_experts=128,
                top_k_experts=8,
                sliding_window=1024,
                max_position_embeddings=262144,
            ),
            canvas=256,
        ),
        image_token_id=258880,
        boi_token_id=255999,
        eoi_token_id=258882,
    ),
}


def preset(name: str, **text_overrides) -> dict:
    cfg = copy.deepcopy(PRESETS[name])
    cfg["text_config"].update(text_overrides)
    return cfg


def hf_generation_config(
    eos_token_id: list[int], max_denoising_steps: int, max_new_tokens: int, entropy_bound: float | None = None
):
    """A transformers DiffusionGemmaGenerationConfig with the sampler defaults written out, as a checkpoint's
    generation_config.json should carry them (a fresh model's config has no eos/pad, so EOS would not stop).
    The sampler defaults are transformers' unless `entropy_bound` is given."""
    from transformers import DiffusionGemmaGenerationConfig
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    s = SamplerSettings()
    return DiffusionGemmaGenerationConfig(
        eos_token_id=eos_token_id,
        pad_token_id=0,
        bos_token_id=2,
        max_new_tokens=max_new_tokens,
        max_denoising_steps=max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(
            entropy_bound=s.entropy_bound if entropy_bound is None else entropy_bound
        ),
        t_min=s.t_min,
        t_max=s.t_max,
        stability_threshold=s.stability_threshold,
        confidence_threshold=s.confidence_threshold,
    )


def random_hf_model(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | None = None):
    """A transformers DiffusionGemmaForBlockDiffusion with random weights whose logits are not near-constant.

    Norm weights, router scales and layer scalars are perturbed away from their all-ones init, so a
    re-implementation that ignores any of them fails parity. device: made there, in `dtype` from the start (the
    released shape on a GPU: seconds, and no float32 copy twice its size).
    """
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    cfg = DiffusionGemmaConfig(**config)
    cfg.text_config.initializer_range = 0.2 if cfg.text_config.hidden_size <= 64 else 0.02
    model = _built(DiffusionGemmaForBlockDiffusion, cfg, dtype, device)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        scalars = {}
        for name, t in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")) or "layernorm" in name:
                t.mul_((1 + 0.2 * torch.randn(t.shape, generator=gen)).to(t.device, t.dtype))
        for name, buf in model.named_buffers():
            if name.endswith("layer_scalar"):
                idx = name.split(".layers.")[1].split(".")[0]
                scalars.setdefault(idx, 1 + 0.1 * torch.randn(1, generator=gen))
                buf.copy_(scalars[idx])  # encoder and decoder copies must agree
    return model.to(dtype).eval()


def write_word_tokenizer(path, vocab_size: int) -> None:
    """A word-level tokenizer whose ids fill a random model's vocabulary (pad 0, eos 1, bos 2, unk 3, then
    `w4`...): text in and out for checkpoints that have no real tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(path)


def save_random_checkpoint(
    path, name: str, seed: int = 0, dtype: torch.dtype = torch.float32, eos_token_id: tuple[int, ...] = (1,)
) -> None:
    """A servable checkpoint folder (config, generation config, safetensors, tokenizer) of a preset with
    random weights: what benchmarks of the serving path load by path, like a released model."""
    config = PRESETS[name]
    hf = random_hf_model(config, seed=seed, dtype=dtype)
    hf.generation_config = hf_generation_config(list(eos_token_id), max_denoising_steps=8, max_new_tokens=256)
    hf.save_pretrained(path)
    write_word_tokenizer(path, config["text_config"]["vocab_size"])


def random_autoregressive_twin(
    config: dict, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | None = None
):
    """A transformers Gemma4ForCausalLM of the same text shape as a DiffusionGemma config (its layers, experts,
    heads, window and vocabulary; V = K on full layers; no per-layer inputs), random weights: the autoregressive
    model the denoiser's speed is weighed against. device: made there, in `dtype` from the start."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(seed)
    text = {k: v for k, v in config["text_config"].items() if k not in ("per_layer_config",)}
    cfg = Gemma4TextConfig(
        **text,
        enable_moe_block=True,
        attention_k_eq_v=True,
        hidden_size_per_layer_input=0,
        final_logit_softcapping=30.0,
    )
    return _built(Gemma4ForCausalLM, cfg, dtype, device).to(dtype).eval()


def _built(cls, cfg, dtype: torch.dtype, device: str | None):
    """cls(cfg): on the CPU in the default dtype (device None), or made on `device` in `dtype` from the start."""
    if device is None:
        return cls(cfg)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(cfg)
    finally:
        torch.set_default_dtype(default)
