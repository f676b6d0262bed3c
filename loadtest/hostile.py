"""Hostile input, as hypothesis strategies: HTTP bodies (JSON with wrong types, unknown fields, huge integers,
NaN and infinities, damaged bytes and invalid UTF-8), headers, and gRPC messages and metadata. Shared by the
fuzz tests (tests/test_fuzz.py, in-process) and the reliability run (loadtest/drills/reliability.py, through Serve's
proxies)."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from protos.diffusiongemma.v1 import diffusion_pb2 as pb

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
small_ints = st.integers(min_value=-3, max_value=70)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "", "USER"]) | anything,
     "content": st.text(max_size=60) | anything},
)  # fmt: skip
controls = {
    "tier": st.sampled_from(["fast", "balanced", "quality", "turbo", ""]) | anything,
    "seed": small_ints | anything,
    "max_denoising_steps": small_ints | anything,
    "entropy_bound": st.floats(allow_nan=True, allow_infinity=True) | anything,
    "confidence_threshold": st.floats(allow_nan=True, allow_infinity=True) | anything,
    "temperature": st.floats(allow_nan=True, allow_infinity=True) | anything,
    "stream": st.booleans() | anything,
}


def body(required: dict) -> st.SearchStrategy[dict]:
    optional = dict(controls)
    extra = st.dictionaries(st.text(min_size=1, max_size=10).map(lambda k: "x_" + k), anything, max_size=2)
    return st.builds(lambda b, e: b | e, st.fixed_dictionaries(required, optional=optional), extra)


chat_bodies = body({"messages": st.lists(message, max_size=3) | anything}) | body(
    {"messages": st.lists(message, min_size=1, max_size=2), "max_tokens": small_ints | anything}
)
generate_bodies = body({"text": st.text(max_size=60) | anything, "max_new_tokens": small_ints | anything}) | body(
    {"token_ids": st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=20) | anything}
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300)
headers = st.fixed_dictionaries(
    {}, optional={"x-tier": header_text, "x-request-id": header_text, "authorization": header_text}
)


def raw_bytes(obj) -> st.SearchStrategy[bytes]:
    """The body as JSON (NaN and Infinity included), or damaged: cut short, invalid UTF-8 spliced in."""
    text = json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")
    return st.sampled_from(
        [text, text[: len(text) // 2], text.replace(b'"', b'"\xff\xfe', 1), b"\xc3\x28" + text, text * 2]
    )


def prompt_body(b: dict) -> dict:
    """/v1/completions takes `prompt` where /v1/generate takes `text`."""
    b = dict(b)
    if "text" in b:
        b["prompt"] = b.pop("text")
    return b


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
overrides = st.builds(
    pb.SamplerOverrides,
    max_denoising_steps=int32 | st.integers(0, 70),
    entropy_bound=floats,
    t_min=floats,
    t_max=floats,
    stability_threshold=int32,
    confidence_threshold=floats,
    adaptive_stop=st.booleans(),
)
inputs = st.one_of(
    st.builds(dict, text=st.text(max_size=80)),
    st.builds(dict, raw_prompt=st.text(max_size=80)),
    st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)}, st.lists(int32, max_size=30)),
    st.just({}),
)
requests = st.builds(
    lambda i, tier, max_new, seed, sampler, drafts: pb.GenerateRequest(
        **i, tier=tier, max_new_tokens=max_new, sampler=sampler, stream_drafts=drafts,
        **({} if seed is None else {"seed": seed}),
    ),
    inputs,
    st.sampled_from(["fast", "balanced", "quality", "", "nope"]) | st.text(max_size=20),
    int32 | st.integers(0, 70),
    st.none() | st.integers(min_value=0, max_value=2**64 - 1),
    st.none() | overrides,
    st.booleans(),
)  # fmt: skip
metadata = st.lists(st.tuples(st.sampled_from(["x-tier", "x-request-id", "x-other"]), header_text), max_size=2).map(
    tuple
)
