"""The OpenAI routes' handler: /v1/completions and /v1/chat/completions over the front end.

Each call validates the body, makes it one ClientRequest, opens its `n` choices (each its own engine request,
seeds seed, seed+1, ... when a seed is given, opened together so that they share the batch), then collects the
whole answer or streams it as OpenAI does. Chat answers are split into reasoning, content and tool calls
(serving/ingress/chat_output.py); a `tool_choice` that requires a call fixes the call's opening with a canvas
template.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.ingress.call_grammar import after_thought, auto_constraint, calls_constraint
from serving.ingress.chat_output import CALL_OPEN, ChatOutput, special_strings
from serving.ingress.detokenize import CanvasChunk, Chunk, DoneChunk
from serving.ingress.frontend import ClientRequest, Frontend, new_request_id
from serving.ingress.openai_format import Choice, TokenText, chat_delta, chat_message, merge, openai_usage, summed_usage
from serving.ingress.protocol import ChatBody, CompletionBody, OpenAIOptions, StreamOptions
from serving.ingress.replies import asked_of, error_reply, failure_type, key_of, streaming
from serving.request import Constraint, EngineFailure, InvalidRequest, Overloaded, Unavailable


@dataclass
class Reply:
    """One call's reply as it is built: its choices, the fields every chunk repeats, and how it streams."""

    choices: list[Choice]
    head: dict[str, Any]
    chat: bool
    prompt_tokens: int
    options: StreamOptions

    @property
    def tier(self) -> str:
        return self.choices[0].opened.tier


class OpenAIHandler:
    def __init__(self, frontend: Frontend):
        self.frontend = frontend
        self.specials = special_strings(frontend.tokenizer)
        self.words = TokenText(frontend.tokenizer)

    async def completions(self, body: CompletionBody, request: Request) -> Any:
        def prompt() -> list[int]:  # token ids as they are, text without a chat template
            return body.prompt if isinstance(body.prompt, list) else self.frontend.raw_prompt(body.prompt)

        return await self.handle(body, prompt, request, chat=False)

    async def chat(self, body: ChatBody, request: Request) -> Any:
        messages = [m.template_message() for m in body.messages]
        called = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls", ())}
        for m in messages:  # a tool message names the function it answers, as chat templates read it
            if m["role"] == "tool" and "name" not in m and m["tool_call_id"] in called:
                m["name"] = called[m["tool_call_id"]]
        tools = [t.model_dump(exclude_none=True) for t in body.tools or ()] if body.tool_choice != "none" else None
        return await self.handle(body, lambda: self.frontend.chat_prompt(messages, tools, body.chat_template_kwargs),
                                 request, chat=True)  # fmt: skip

    async def handle(self, body: OpenAIOptions, prompt: Callable[[], list[int]], request: Request, chat: bool):
        base = asked_of(request) | {"request_id": request.headers.get("x-request-id") or new_request_id()}
        try:
            template = self._checked(body, chat)
            ids = prompt()
            asked = body.client_request(
                ids, max_new_tokens=body.length(), logprobs=body.top_logprobs_asked(), stop=body.stop or [],
                special_tokens=chat, template=template, **base,
            )  # fmt: skip
            if chat:
                asked = replace(asked, constraint=self._chat_constraint(body, asked, template))
        except InvalidRequest as exc:
            return error_reply(exc)
        tools_on = chat and bool(body.tools) and body.tool_choice != "none"
        choices = await self._open_choices(body.n, asked, key_of(request), chat, tools_on)
        if isinstance(choices, JSONResponse):
            return choices
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + base["request_id"],
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.frontend.model_id,
            "system_fingerprint": self.frontend.fingerprint,
        }
        reply = Reply(choices, head, chat, len(ids), body.stream_options or StreamOptions())
        return self._stream(reply) if body.stream else await self._whole(reply)

    def _checked(self, body: OpenAIOptions, chat: bool) -> list[int] | None:
        """The body's OpenAI fields this server refuses, as InvalidRequest; the canvas template a required tool
        call fixes (None: none)."""
        field = body.unsupported()
        if field is not None:
            raise InvalidRequest(field, "not supported by this server")
        if body.model is not None and body.model != self.frontend.model_id:
            raise InvalidRequest("model", f"unknown model {body.model!r}; this server has {self.frontend.model_id!r}")
        if chat and body.tool_choice not in (None, "none", "auto"):
            return self.frontend.template_ids([self._forced_call(body)])
        return None

    def _chat_constraint(self, body: ChatBody, asked: ClientRequest, template: list[int] | None) -> Constraint | None:
        """A chat answer's constraint: a forced call's (it has a template); else the response_format's, joined
        with the calls of strict tools under tool_choice auto; in thinking mode after a free thought channel."""
        if template is not None:
            return self._call_constraint(body, asked)
        c = asked.constraint
        tools = [t.function for t in body.tools or ()] if body.tool_choice in (None, "auto") else []
        if any(t.strict for t in tools):
            c = auto_constraint([(t.name, t.parameters or {"type": "object"}, bool(t.strict)) for t in tools], c)
        if c is not None and self.frontend.thinking(body.chat_template_kwargs):
            c = after_thought(c)
        return c

    def _call_constraint(self, body: ChatBody, asked: ClientRequest) -> Constraint | None:
        """The forced call's constraint: a call of the named function (or, `required`, of any of the tools), its
        arguments in Gemma 4's notation matching the function's parameters (serving/ingress/call_grammar.py)."""
        if asked.constraint is not None:
            raise InvalidRequest("response_format", "a forced tool call is the answer: drop response_format")
        tools = [t.function for t in body.tools or ()]
        if body.tool_choice != "required":
            tools = [t for t in tools if t.name == body.tool_choice.function["name"]]
        try:
            return calls_constraint([(t.name, t.parameters or {"type": "object"}) for t in tools])
        except InvalidRequest:
            if any(t.strict for t in tools):
                raise
            return None  # a schema the notation cannot hold, not asked strict: the call is written freely

    def _forced_call(self, body: ChatBody) -> str:
        """tool_choice "required" or a named function: the answer's canvas starts with the call's fixed opening,
        `<|tool_call>call:` and, for a named one, its name and brace; the model writes the rest."""
        if CALL_OPEN not in self.specials:
            raise InvalidRequest("tool_choice", "this model has no tool-call token")
        names = [t.function.name for t in body.tools or ()]
        if not names:
            raise InvalidRequest("tool_choice", "a call is required but no tools are given")
        if body.tool_choice == "required":
            return CALL_OPEN + "call:" + (names[0] + "{" if len(names) == 1 else "")
        name = body.tool_choice.function["name"]
        if name not in names:
            raise InvalidRequest("tool_choice", f"no tool named {name[:64]!r} in tools")
        return CALL_OPEN + "call:" + name + "{"

    async def _open_choices(self, n: int, asked: ClientRequest, key_id: str | None, chat: bool, tools_on: bool):
        """The n choices opened; a refusal of any is the reply (the choices already accepted are cancelled)."""
        choices: list[Choice] = []
        for i in range(n):
            seed = None if asked.seed is None else (asked.seed + i) % 2**62
            request_id = asked.request_id if i == 0 else f"{asked.request_id}.{i}"
            try:
                opened = await self.frontend.open(replace(asked, seed=seed, request_id=request_id), "http", key_id)
            except (InvalidRequest, Overloaded, Unavailable) as exc:  # refusals; anything else is a server error
                for c in choices:
                    await c.opened.chunks.aclose()
                return error_reply(exc)
            choices.append(Choice(i, opened, ChatOutput(self.specials, tools_on) if chat else None))
        return choices

    async def _whole(self, reply: Reply) -> JSONResponse:
        """The non-streaming reply: every choice's whole answer (the first failure is the reply instead)."""
        answers = await asyncio.gather(*(collected(c) for c in reply.choices))
        failed = next((a for a in answers if isinstance(a, JSONResponse)), None)
        if failed is not None:
            return failed
        entries = []
        for choice, answer in zip(reply.choices, answers):
            entry: dict[str, Any] = {"index": choice.index}
            lp = (answer.token_ids, answer.logprobs, answer.top_logprobs) if answer.logprobs is not None else None
            if reply.chat:
                entry["message"] = chat_message(choice, answer.text)
                entry["logprobs"] = {"content": self.words.chat(*lp)} if lp else None
            else:
                entry["text"] = answer.text
                entry["logprobs"] = self.words.completion(*lp) if lp else None
            entry["finish_reason"] = choice.finish_reason(answer.finish_reason)
            entries.append(entry)
        usage = summed_usage([a.usage for a in answers], reply.tier)
        return JSONResponse(reply.head | {"choices": entries, "usage": usage})

    def _stream(self, reply: Reply) -> StreamingResponse:
        reply.head["object"] = "chat.completion.chunk" if reply.chat else "text_completion"
        return streaming(self._lines(reply), lambda exc: {"error": {"message": str(exc), "type": failure_type(exc)}})

    async def _lines(self, reply: Reply) -> AsyncIterator[dict]:
        if reply.chat:  # the role first, once per choice, as OpenAI streams it
            for choice in reply.choices:
                yield self._chunk(reply, choice, {"role": "assistant", "content": ""}, None, None)
        stream = merged(reply.choices)
        try:
            async for choice, c in stream:
                if isinstance(c, CanvasChunk):
                    choice.tokens += len(c.token_ids)
                    delta = chat_delta(choice, choice.output.feed(c.text)) if reply.chat else {"content": c.text}
                    if delta or c.logprobs:
                        yield self._chunk(reply, choice, delta, c, None)
                elif isinstance(c, DoneChunk):
                    choice.usage = c.usage
                    if reply.chat:
                        delta = chat_delta(choice, merge(choice.output.feed(c.text), choice.output.finish()))
                    else:
                        delta = {"content": c.text} if c.text else {}
                    yield self._chunk(reply, choice, delta, None, choice.finish_reason(c.finish_reason))
        finally:
            await stream.aclose()  # a client gone: every choice's request is cancelled
        if reply.options.include_usage:
            yield reply.head | {"choices": [], "usage": summed_usage([c.usage for c in reply.choices], reply.tier)}

    def _chunk(self, reply: Reply, choice: Choice, delta: dict, c: CanvasChunk | None, finish: str | None) -> dict:
        if reply.chat:
            entry = {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if c is not None and c.logprobs is not None:
                entry["logprobs"] = {"content": self.words.chat(c.token_ids, c.logprobs, c.top_logprobs)}
        else:
            entry = {"index": choice.index, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
            if c is not None and c.logprobs is not None:
                entry["logprobs"] = self.words.completion(c.token_ids, c.logprobs, c.top_logprobs, choice.text_sent)
            choice.text_sent += len(entry["text"])
        out = reply.head | {"choices": [entry]}
        if reply.options.include_usage:
            out["usage"] = None
            if reply.options.continuous_usage_stats:
                done = sum(x.tokens for x in reply.choices)
                out["usage"] = openai_usage(None, reply.tier, reply.prompt_tokens, done)
        return out


async def collected(choice: Choice) -> Any:
    """A choice's whole answer, or its failure as the reply."""
    try:
        return await choice.opened.collect()
    except EngineFailure as exc:
        return error_reply(exc)


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Chunk]]:
    """The chunks of several choices as they come, each with its choice; closing this closes them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for c in choice.opened.chunks:
                await queue.put((choice, c))
        except Exception as exc:
            await queue.put((choice, exc))
        await queue.put((choice, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        left = len(choices)
        while left:
            choice, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in choices:
            await c.opened.chunks.aclose()
