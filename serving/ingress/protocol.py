"""HTTP request bodies (pydantic): OpenAI-compatible completions and chat completions, and the native generate call.

Unknown fields are refused with a 400 naming the field (never silently ignored), and so are the OpenAI fields
this server does not implement unless they hold the value that means "not used" (NEUTRAL: a client library
that always sends `presence_penalty: 0` is served). The diffusion controls (tier and sampler overrides) are
accepted as extra top-level fields on the OpenAI routes too, and an `x-tier` header names the tier when the
body does not. What each OpenAI field means for a diffusion sampler is in docs/api.md.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from model.config import MAX_TOP_LOGPROBS
from serving.ingress import structured
from serving.ingress.frontend import ClientRequest
from serving.ingress.stop import check_stops
from serving.request import Constraint, InvalidRequest
from serving.sampling import OVERRIDE_NAMES, Real, SamplerOverrides

# OpenAI fields that exist but that this server does not implement, each with the values that mean "not used"
# (accepted, and nothing changes); any other value is a 400 naming the field.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "top_p": (None, 1),  # the diffusion sampler draws from the whole tempered distribution
    "best_of": (None, 1),
    "echo": (False,),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "suffix": (None,),
}
# apply_chat_template's own arguments: chat_template_kwargs may not set them (the rest go to the template)
TEMPLATE_CALL_ARGS = {
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs",
}  # fmt: skip
# `stop`: a string or a list of them, kept as a list (ValueError, so a 400 naming `stop`, where unusable)
Stops = Annotated[str | list[str] | None, AfterValidator(check_stops)]
MAX_CHOICES = 8  # `n`: independent answers per request, each a row of the batch
MAX_FREE = 4096  # free positions one template part may ask for
STRICT = ConfigDict(extra="forbid")


# structured_outputs' kinds and the attributes holding them (json_ is json, a BaseModel name)
KINDS = (("json", "json_"), ("json_object", "json_object"), ("regex", "regex"), ("choice", "choice"))


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of a JSON schema, any JSON object, a regex or a list of choices."""

    model_config = STRICT

    json_: dict | bool | str | None = Field(None, alias="json")
    json_object: StrictBool | None = None
    regex: str | None = None
    choice: list[str] | None = None

    def _given(self) -> list[tuple[str, Any]]:
        """(kind, value) of each kind set: json_object only when true, the others when present."""
        values = [(k, getattr(self, a)) for k, a in KINDS]
        return [(k, v) for k, v in values if (v is True if k == "json_object" else v is not None)]

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        if len(self._given()) != 1:
            raise ValueError("give exactly one of json, json_object, regex or choice")
        return self

    def constraint(self) -> Constraint:
        return structured.structured_outputs_constraint(*self._given()[0])


class Diffusion(SamplerOverrides):
    """The diffusion controls, shared by every route: tier, seed, the sampler overrides (serving/sampling.py)
    and structured outputs. `temperature` is one of the overrides: a factor on the tier's t_max -> t_min
    schedule, 0 for the argmax path."""

    tier: str | None = None
    seed: StrictInt | None = Field(None, ge=0, lt=2**62)
    structured_outputs: StructuredOutputs | None = None

    def constraint(self) -> Constraint | None:
        """What the answer must match (InvalidRequest naming the field where it cannot be)."""
        return None if self.structured_outputs is None else self.structured_outputs.constraint()

    def client_request(self, prompt: list[int], **asked: Any) -> ClientRequest:
        """The request this body makes: its diffusion controls, and `asked` (length, id, stops...) as the route
        reads them."""
        overrides = {k: getattr(self, k) for k in OVERRIDE_NAMES}
        constraint = self.constraint()
        return ClientRequest(
            prompt, tier=self.tier, seed=self.seed, overrides=overrides, constraint=constraint, **asked
        )


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: StrictBool = False  # a last chunk, before [DONE], with no choices and the usage of the request
    continuous_usage_stats: StrictBool = False  # vLLM's: the usage so far on every chunk too


class JsonSchema(BaseModel):
    """response_format's json_schema, as OpenAI defines it (strict or not, the answer always matches)."""

    model_config = STRICT

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict | bool = Field(True, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with, and only with, type json_schema")
        return self


class OpenAIOptions(Diffusion):
    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    stop: Stops = None
    response_format: ResponseFormat | None = None
    # accepted only at their neutral values (NEUTRAL)
    top_p: Real | None = None
    best_of: StrictInt | None = None
    echo: StrictBool = False
    presence_penalty: Real | None = None
    frequency_penalty: Real | None = None
    logit_bias: dict | None = None
    suffix: str | None = None

    def constraint(self) -> Constraint | None:
        asked = super().constraint()
        rf = self.response_format
        if rf is None or rf.type == "text":
            return asked
        if asked is not None:
            raise InvalidRequest("response_format", "give response_format or structured_outputs, not both")
        if rf.type == "json_object":
            return structured.json_object_constraint("response_format")
        return structured.json_schema_constraint(rf.json_schema.schema_, "response_format.json_schema.schema")

    def unsupported(self) -> str | None:
        """The first OpenAI field set to something this server does not do."""
        return next((name for name, ok in NEUTRAL.items() if getattr(self, name) not in ok), None)

    def length(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_asked(self) -> int | None:
        """None: no log-probabilities; k: each token's and its top k alternatives'."""
        return None


class CompletionBody(OpenAIOptions):
    prompt: str | list[StrictInt] = Field(..., description="text used as is (no chat template) or token ids")
    # the completions API's logprobs: the number of alternatives per token (0: the chosen token's alone)
    logprobs: StrictInt | None = Field(None, ge=0, le=5)

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = STRICT

    name: str = Field(..., min_length=1, max_length=256)
    arguments: str  # a JSON object, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: str) -> str:
        try:
            parsed = json.loads(v)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc.msg}") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object")
        return v


class ToolCall(BaseModel):
    model_config = STRICT

    id: str = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None  # a streamed call's position, echoed back by some clients; not used


class Message(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = Field(None, max_length=256)  # tool: the call this answers
    reasoning_content: str | None = None  # assistant: its reasoning (dropped by the template after the turn)
    # fields of an assistant reply that clients send back with it as they got it; not used
    refusal: str | None = None
    annotations: list | None = None

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry tool calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: a tool message answers a tool call; name it")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required (only an assistant message with tool_calls may leave it out)")
        return self

    def template_message(self) -> dict[str, Any]:
        """The message as a chat template reads it: developer as system, text parts joined, arguments parsed."""
        text = self.content if not isinstance(self.content, list) else "\n".join(p.text for p in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                             "arguments": json.loads(c.function.arguments)}}
                for c in self.tool_calls
            ]  # fmt: skip
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            out["reasoning"] = self.reasoning_content
        return out


class FunctionSpec(BaseModel):
    model_config = STRICT

    name: str = Field(..., min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)  # a JSON schema
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionSpec


class NamedTool(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: dict[Literal["name"], str]


class ChatBody(OpenAIOptions):
    messages: list[Message] = Field(..., min_length=1)
    # the chat API's logprobs: a switch, with top_logprobs alternatives per token
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: StrictBool | None = None
    # passed to the chat template, as vLLM does (`enable_thinking` above all)
    chat_template_kwargs: dict[str, str | int | float | bool | None] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_names(cls, v: dict | None) -> dict | None:
        taken = sorted(set(v or ()) & TEMPLATE_CALL_ARGS)
        if taken:
            raise ValueError(f"{taken} are arguments of the template call, not template variables")
        return v

    @model_validator(mode="after")
    def _logprobs(self) -> ChatBody:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs true")
        return self

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class GenerateBody(Diffusion):
    """POST /v1/generate: exactly one of text (chat template applied), prompt (as is) or token_ids. Integers and
    booleans are strict here and on the OpenAI bodies: `true` is not a 1, nor `false` a seed, nor 0.0 a `false`."""

    text: str | None = None
    prompt: str | None = None
    token_ids: list[StrictInt] | None = None
    max_new_tokens: StrictInt | None = Field(None, ge=1)
    stream: StrictBool = False
    stream_drafts: StrictBool = False
    stop: Stops = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # None: none; k: chosen token + top k
    # a canvas template: the answer's first positions, as text parts (fixed) and counts of free positions
    template: list[Annotated[str, Field(min_length=1)] | Annotated[StrictInt, Field(ge=1, le=MAX_FREE)]] | None = Field(
        None, min_length=1, max_length=256
    )
