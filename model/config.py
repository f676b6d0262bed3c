"""Model and sampler settings read from a Hugging Face DiffusionGemma checkpoint.

Only the text path is modelled. Both spellings of the full-attention head sizes are accepted:
`global_head_dim` / `num_global_key_value_heads` (every transformers version) and `per_layer_config`
(what transformers >= 5.2x writes back out). This module imports no torch: the ingress reads configs too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

SLIDING = "sliding_attention"
FULL = "full_attention"
# weight dtypes as configs, CLIs and the deploy config spell them (torch attribute names)
DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
# The most alternatives a request may ask log-probabilities of per position (OpenAI's top_logprobs limit).
MAX_TOP_LOGPROBS = 20


def canvas_count(max_new_tokens: int, canvas_length: int) -> int:
    """Canvases a request of `max_new_tokens` runs: whole canvases, the last one possibly cut at EOS."""
    return -(-max_new_tokens // canvas_length)


def context_needed(prompt_tokens: int, max_new_tokens: int, canvas_length: int) -> int:
    """KV-cache tokens a request needs: the prompt plus every canvas but the last (which is never encoded)."""
    return prompt_tokens + canvas_length * (canvas_count(max_new_tokens, canvas_length) - 1)


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    # Fraction of the head's frequency pairs that rotate ("proportional" RoPE); the rest get frequency 0.
    partial_rotary_factor: float = 1.0
    proportional: bool = False


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k_experts: int
    num_attention_heads: int
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]
    kv_heads: tuple[int, ...]
    sliding_window: int
    rope: dict[str, RopeSpec]
    canvas_length: int
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    max_position_embeddings: int = 262144
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> TextConfig:
        """Build from a parsed `config.json` of a `DiffusionGemmaForBlockDiffusion` checkpoint."""
        text = config.get("text_config", config)
        missing = [k for k in ("num_experts", "top_k_experts", "moe_intermediate_size") if text.get(k) is None]
        if missing:
            raise ValueError(f"config.json text_config lacks {missing}: DiffusionGemma always runs its MoE")
        n_layers = text.get("num_hidden_layers", 30)
        layer_types = list(text.get("layer_types") or [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)])
        if len(layer_types) != n_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}")
        layer_types[-1] = FULL  # transformers forces this too
        head_dim = text.get("head_dim", 256)
        kv = text.get("num_key_value_heads", 4)
        # A present per_layer_config, even {} (what transformers writes when the full layers' sizes equal the
        # sliding ones), holds every override there is; only its absence means "derive them from global_*".
        has_per_layer = "per_layer_config" in text
        per_layer = {int(k): v for k, v in (text.get("per_layer_config") or {}).items()}
        global_head_dim = text.get("global_head_dim", 512)
        global_kv = text.get("num_global_key_value_heads")
        head_dims, kv_heads = [], []
        for i, kind in enumerate(layer_types):
            if has_per_layer:
                over = per_layer.get(i, {})
            elif kind == FULL:
                over = {"head_dim": global_head_dim}
                if global_kv is not None:
                    over["num_key_value_heads"] = global_kv
            else:
                over = {}
            head_dims.append(over.get("head_dim", head_dim))
            kv_heads.append(over.get("num_key_value_heads", kv))
        heads = text.get("num_attention_heads", 8)
        for i, k in enumerate(kv_heads):
            if heads % k:
                raise ValueError(f"layer {i}: num_attention_heads {heads} is not a multiple of its {k} KV heads")
        rope_params = text.get("rope_parameters") or {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }
        rope = {}
        for kind in (SLIDING, FULL):
            p = rope_params[kind]
            if p.get("rope_type", "default") not in ("default", "proportional"):
                raise ValueError(f"unsupported rope_type {p.get('rope_type')!r} for {kind}")
            if p.get("factor", 1.0) != 1.0:
                raise ValueError(f"unsupported RoPE scaling factor {p['factor']} for {kind}")
            rope[kind] = RopeSpec(
                theta=float(p["rope_theta"]),
                partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)),
                proportional=p.get("rope_type") == "proportional",
            )
        if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported hidden_activation {text['hidden_activation']!r}")
        if text.get("attention_bias", False):
            raise ValueError("attention_bias=True is not supported (the released model has none)")
        if text.get("use_bidirectional_attention") == "all":
            raise ValueError("use_bidirectional_attention='all' is not supported")
        eos = text.get("eos_token_id", 1)
        return cls(
            vocab_size=text.get("vocab_size", 262144),
            hidden_size=text.get("hidden_size", 2304),
            intermediate_size=text.get("intermediate_size", 9216),
            moe_intermediate_size=text["moe_intermediate_size"],
            num_experts=text["num_experts"],
            top_k_experts=text["top_k_experts"],
            num_attention_heads=heads,
            layer_types=tuple(layer_types),
            head_dims=tuple(head_dims),
            kv_heads=tuple(kv_heads),
            sliding_window=text.get("sliding_window", 512),
            rope=rope,
            canvas_length=config.get("canvas_length", 256),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            final_logit_softcapping=text.get("final_logit_softcapping") or 30.0,
            max_position_embeddings=text.get("max_position_embeddings", 131072),
            pad_token_id=text.get("pad_token_id", 0) or 0,
            bos_token_id=text.get("bos_token_id", 2),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


def _setting(
    default: float | int | None, doc: str, open_range: tuple[float, float] | None = None, **bounds: float
) -> Any:
    """A sampler field: its default, what it means and its bounds (pydantic's ge/gt/le names), which the
    serving layer reads to build its request bodies, tier defaults and tier limits (serving/sampling.py).
    open_range: the range a tier lets requests move it within unless its deploy config says otherwise (None:
    fixed at the tier's value)."""
    return field(default=default, metadata={"doc": doc, "bounds": bounds, "open_range": open_range})


@dataclass(frozen=True)
class SamplerSettings:
    """One request's denoising settings; defaults are transformers' `_get_default_generation_params`.

    This is the one definition of the sampler's knobs: the HTTP bodies, the deploy config's tier defaults and
    limits, and the gRPC mapping are all derived from these fields."""

    max_denoising_steps: int = _setting(48, "denoising steps per canvas at most", ge=1, le=256)
    entropy_bound: float = _setting(0.1, "entropy the positions accepted together in one step may carry", gt=0)
    t_min: float = _setting(0.4, "temperature on a canvas's last step", ge=0)
    t_max: float = _setting(0.8, "temperature on a canvas's first step", gt=0)
    stability_threshold: int = _setting(1, "steps the argmax canvas must stay unchanged to stop early", ge=0, le=4)
    # None turns adaptive stopping off: every canvas runs `max_denoising_steps` steps.
    confidence_threshold: float | None = _setting(0.005, "mean entropy under which a stable canvas stops", gt=0)
    # OpenAI's `temperature`: every OpenAI client sends one, so tiers accept it unless configured otherwise.
    temperature: float = _setting(
        1.0, "multiplies the t_max -> t_min schedule; 0 takes the argmax at every position", (0.0, 2.0), ge=0, le=2
    )

    def __post_init__(self) -> None:
        if not isinstance(self.max_denoising_steps, int) or self.max_denoising_steps < 1:
            raise ValueError(f"max_denoising_steps must be an integer >= 1, got {self.max_denoising_steps!r}")
        if not (self.entropy_bound > 0 and math.isfinite(self.entropy_bound)):
            raise ValueError(f"entropy_bound must be a finite float > 0, got {self.entropy_bound!r}")
        if not (0 <= self.t_min < self.t_max):
            raise ValueError(f"need 0 <= t_min < t_max, got t_min={self.t_min!r}, t_max={self.t_max!r}")
        if not isinstance(self.stability_threshold, int) or self.stability_threshold < 0:
            raise ValueError(f"stability_threshold must be an integer >= 0, got {self.stability_threshold!r}")
        if self.confidence_threshold is not None and not self.confidence_threshold > 0:
            raise ValueError(f"confidence_threshold must be > 0 or None, got {self.confidence_threshold!r}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be within [0, 2], got {self.temperature!r}")


@dataclass(frozen=True)
class GenerationDefaults:
    """What `generation_config.json` says: sampler defaults, the length cap and the stop ids."""

    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    max_new_tokens: int = 256
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, gen: dict[str, Any], text: TextConfig) -> GenerationDefaults:
        base = SamplerSettings()
        sc = gen.get("sampler_config") or {}
        conf = gen.get("confidence_threshold", base.confidence_threshold)
        sampler = SamplerSettings(
            max_denoising_steps=gen.get("max_denoising_steps") or base.max_denoising_steps,
            entropy_bound=float(sc.get("entropy_bound", base.entropy_bound)),
            t_min=gen["t_min"] if gen.get("t_min") is not None else base.t_min,
            t_max=gen["t_max"] if gen.get("t_max") is not None else base.t_max,
            stability_threshold=(
                gen["stability_threshold"] if gen.get("stability_threshold") is not None else base.stability_threshold
            ),
            confidence_threshold=conf if conf is not None else base.confidence_threshold,
        )
        eos = gen.get("eos_token_id")
        if eos is None:
            eos = text.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        pad = gen.get("pad_token_id")
        return cls(
            sampler=sampler,
            max_new_tokens=gen.get("max_new_tokens") or 256,
            eos_token_ids=eos_ids,
            pad_token_id=text.pad_token_id if pad is None else pad,
        )
