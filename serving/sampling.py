"""The sampler's knobs as the serving layer sees them, all derived from `model.config.SamplerSettings`.

SamplerSettings names each knob once, with its default, meaning and bounds. From its fields come:

- `TierSampler`: a tier's default settings in the deploy config (every field, with the model's default);
- `SamplerOverrides`: what a request may send (every field optional, plus `adaptive_stop`), the base of the
  HTTP bodies, and the field list the gRPC `SamplerOverrides` message is mapped by (a test checks they agree);
- `TierLimits`: per field, the range a tier lets a request move it within.

A new knob is one new field of SamplerSettings; nothing here names a knob.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, create_model, model_validator

from model.config import SamplerSettings

STRICT = ConfigDict(extra="forbid")
_FIELDS = dataclasses.fields(SamplerSettings)
_TYPES = typing.get_type_hints(SamplerSettings)
SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in _FIELDS)
# adaptive_stop is a switch over confidence_threshold (None = off), not a setting of its own
OVERRIDE_NAMES: tuple[str, ...] = (*SETTING_NAMES, "adaptive_stop")
DEFAULT_CONFIDENCE: float = SamplerSettings().confidence_threshold  # what turning adaptive stop on uses


def _field(f: dataclasses.Field, default: Any) -> Any:
    return Field(default, description=f.metadata["doc"], **f.metadata["bounds"])


def _a_number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a number")
    return v


# A JSON number, integers included, nothing else (pydantic's lax float reads `false` as 0.0 and "0" as 0.0).
Real = Annotated[float, BeforeValidator(_a_number)]


def _strict(kind: Any) -> Any:
    """A request's integer overrides are strict (`true` is no step count); floats take integers, not booleans."""
    return StrictInt if kind is int else Real if kind is float else kind


def _open_range(f: dataclasses.Field) -> Range | None:
    bounds = f.metadata["open_range"]
    return None if bounds is None else Range(min=bounds[0], max=bounds[1])


class Range(BaseModel):
    model_config = STRICT

    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self


class _TierSampler(BaseModel):
    model_config = STRICT

    def settings(self) -> SamplerSettings:
        return SamplerSettings(**self.model_dump())


TierSampler = create_model(
    "TierSampler",
    __base__=_TierSampler,
    __doc__="A tier's default sampler settings (deploy config `tiers.<name>.sampler`).",
    **{f.name: (_TYPES[f.name], _field(f, f.default)) for f in _FIELDS},
)

SamplerOverrides = create_model(
    "SamplerOverrides",
    __config__=STRICT,
    __doc__="A request's overrides of its tier's sampler settings; None (or absent) keeps the tier's value.",
    **{f.name: (_strict(_TYPES[f.name]) | None, _field(f, None)) for f in _FIELDS},
    adaptive_stop=(StrictBool | None, Field(None, description="false: run every canvas to its step cap")),
)

TierLimits = create_model(
    "TierLimits",
    __config__=STRICT,
    __doc__="What a request may override within a tier; a null limit fixes the tier's value. Left out, a limit is"
    " null, except temperature's, which is open within [0, 2] (OpenAI clients send one with every request).",
    **{f.name: (Range | None, _open_range(f)) for f in _FIELDS},
    adaptive_stop=(bool, Field(True, description="may a request turn adaptive stopping off (or on)?")),
)
