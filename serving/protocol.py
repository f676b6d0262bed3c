"""HTTP request bodies (pydantic): OpenAI-compatible completions and chat completions, and the native generate call.

Unknown fields and OpenAI fields we do not implement are refused with a 400 naming the field (never silently
ignored). The diffusion controls (tier and sampler overrides) are accepted as extra top-level fields on the
OpenAI routes too, and an `x-tier` header names the tier when the body does not.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.frontend import Controls
from serving.sampling import OVERRIDE_NAMES, SamplerOverrides

# OpenAI fields that exist but that this server does not implement; each is accepted only with its field's
# default (the value that means "not used"), see OpenAIOptions.
UNSUPPORTED_OPENAI = (
    "temperature",  # the denoiser's temperature follows its t_max -> t_min schedule; use t_min / t_max
    "top_p",
    "n",
    "best_of",
    "stop",
    "logprobs",
    "top_logprobs",
    "echo",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "suffix",
    "tools",
    "tool_choice",
    "response_format",
    "stream_options",
)


class Diffusion(SamplerOverrides):
    """The diffusion controls, shared by every route: tier, seed and the sampler overrides (serving/sampling.py)."""

    tier: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**62)

    def controls(self) -> Controls:
        return Controls(self.tier, self.seed, {k: getattr(self, k) for k in OVERRIDE_NAMES})


class OpenAIOptions(Diffusion):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    user: str | None = None
    # accepted only with their default, the value that means "not used" (UNSUPPORTED_OPENAI)
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    best_of: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    echo: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    suffix: str | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    stream_options: dict | None = None

    def unsupported(self) -> str | None:
        """The first OpenAI field set to something this server does not do."""
        defaults = type(self).model_fields
        return next((name for name in UNSUPPORTED_OPENAI if getattr(self, name) != defaults[name].default), None)

    def length(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(OpenAIOptions):
    prompt: str | list[int] = Field(..., description="text used as is (no chat template) or token ids")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(OpenAIOptions):
    messages: list[Message] = Field(..., min_length=1)


class GenerateBody(Diffusion):
    """POST /v1/generate: exactly one of text (chat template applied), prompt (as is) or token_ids."""

    text: str | None = None
    prompt: str | None = None
    token_ids: list[int] | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_drafts: bool = False
