"""The native route's handler: POST /v1/generate, the diffusion's own controls and replies (tier, step caps, seed,
drafts per step, canvas templates, usage with the steps each canvas took)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import Request

from serving.ingress.detokenize import CanvasChunk, DraftChunk
from serving.ingress.frontend import Frontend, Opened
from serving.ingress.protocol import GenerateBody
from serving.ingress.replies import asked_of, error_reply, key_of, retryable, streaming
from serving.request import EngineFailure, InvalidRequest, Overloaded, Unavailable


class NativeHandler:
    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    def _prompt(self, body: GenerateBody) -> list[int]:
        given = [k for k in ("text", "prompt", "token_ids") if getattr(body, k) is not None]
        if len(given) != 1:
            raise InvalidRequest("text", "exactly one of text, prompt or token_ids is required")
        if body.text is not None:
            return self.frontend.user_prompt(body.text)
        if body.prompt is not None:
            return self.frontend.raw_prompt(body.prompt)
        return body.token_ids

    async def generate(self, body: GenerateBody, request: Request) -> Any:
        try:
            prompt = self._prompt(body)
            asked = body.client_request(
                prompt, max_new_tokens=body.max_new_tokens, stream_drafts=body.stream_drafts,
                logprobs=body.top_logprobs, stop=body.stop or [],
                template=self.frontend.template_ids(body.template) if body.template else None, **asked_of(request),
            )  # fmt: skip
            opened = await self.frontend.open(asked, "http", key_of(request))
        except (InvalidRequest, Overloaded, Unavailable) as exc:
            return error_reply(exc)
        if body.stream:
            on_error = lambda exc: {"type": "error", "message": str(exc), "retryable": retryable(exc)}  # noqa: E731
            return streaming(self._lines(opened, body.top_logprobs is not None), on_error)
        try:
            answer = await opened.collect()
        except EngineFailure as exc:
            return error_reply(exc)
        reply = {
            "id": opened.request_id,
            "text": answer.text,
            "token_ids": answer.token_ids,
            "finish_reason": answer.finish_reason,
            "tier": opened.tier,
            "usage": asdict(answer.usage),
        }
        if body.top_logprobs is not None:
            reply |= {"logprobs": answer.logprobs, "top_logprobs": answer.top_logprobs}
        return reply

    @staticmethod
    async def _lines(opened: Opened, logprobs: bool) -> AsyncIterator[dict]:
        async for c in opened.chunks:
            if isinstance(c, CanvasChunk):
                fields = asdict(c)
                if not logprobs:
                    del fields["logprobs"], fields["top_logprobs"]
                yield {"type": "canvas", **fields}
            elif isinstance(c, DraftChunk):
                yield {"type": "draft", **asdict(c)}
            else:
                yield {
                    "type": "final",
                    "id": opened.request_id,
                    "finish_reason": c.finish_reason,
                    "tier": opened.tier,
                    "usage": asdict(c.usage),
                    "text": c.text,  # with stop strings: the end of the text, held back in case it began one
                }
