"""The Router deployment: the ingress for HTTP (OpenAI-compatible + native) and gRPC.

It validates, applies the chat template, tokenizes, picks the tier, forwards token ids to a replica of that
tier's pool through a DeploymentHandle (stream=True), streams events back and detokenizes. Replicas never see
text; the router never sees tensors.
"""

import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from protos.diffusiongemma.v1 import diffusion_pb2 as pb
from serving.api import SAMPLER_FIELDS, ChatBody, CompletionBody, Diffusion, GenerateBody, OpenAIOptions
from serving.config import AppConfig, Tier
from serving.replica import Refusal, resolve_model
from serving.request import CanvasEvent, DraftEvent, ErrorEvent, FinalEvent, InvalidRequest, Overloaded, Usage

api = FastAPI(title="diffusiongemma-serve")

# Everything the Router's methods use must be defined above the class: Serve serializes the deployment class
# when it is decorated, and names defined later in this module would be missing in the replica.


@api.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return error_response(400, f"{where}: {first.get('msg', 'invalid request')}", where)


def error_response(status: int, message: str, param: str | None = None, retry_after: float | None = None):
    kind = "invalid_request_error" if status == 400 else "rate_limit_error" if status == 429 else "server_error"
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def usage_pb(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        generated_tokens=u.generated_tokens,
        canvases=u.canvases,
        steps_per_canvas=u.steps_per_canvas,
        queue_time_s=u.queue_time_s,
        time_to_first_canvas_s=u.time_to_first_canvas_s or 0.0,
        total_time_s=u.total_time_s,
    )


def finish_reason(final: FinalEvent | None) -> str:
    if final is None:
        return "error"
    return {"eos": "stop", "length": "length"}.get(final.finish_reason, final.finish_reason)


async def collect(events: AsyncIterator) -> tuple[list[int], FinalEvent | None]:
    """A whole answer: every canvas's tokens, and the final event."""
    tokens, final = [], None
    async for e in events:
        if isinstance(e, CanvasEvent):
            tokens += e.tokens
        elif isinstance(e, FinalEvent):
            final = e
    return tokens, final


def sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@dataclass
class Prepared:
    tier_name: str
    tier: Tier
    payload: dict  # GenerateRequest fields for the replica
    prompt_tokens: int


class Detokenizer:
    """Text per canvas, decoded incrementally so that a character split across canvases comes out whole."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next canvas
            return ""
        new, self.text = text[len(self.text) :], text
        return new


class GrpcMethods:
    """diffusiongemma.v1.DiffusionService, mixed into Router (Serve calls the method named like the RPC).

    Serve turns any exception into INTERNAL, so errors are set on the context and an empty message returned.
    """

    def _grpc_prepare(self, req: pb.GenerateRequest, context) -> Prepared:
        kind = req.WhichOneof("input")
        if kind == "text":
            ids = self.chat_ids([{"role": "user", "content": req.text}])
        elif kind == "raw_prompt":
            ids = self.text_ids(req.raw_prompt)
        elif kind == "token_ids":
            ids = list(req.token_ids.ids)
        else:
            raise InvalidRequest("input", "one of text, raw_prompt or token_ids is required")
        s = req.sampler
        given = {f: getattr(s, f) for f in SAMPLER_FIELDS if s.HasField(f)}
        try:
            diffusion = Diffusion(tier=req.tier or None, seed=req.seed if req.HasField("seed") else None, **given)
        except ValueError as exc:
            raise InvalidRequest("sampler", str(exc).splitlines()[0]) from exc
        if req.max_new_tokens < 0:
            raise InvalidRequest("max_new_tokens", "must be >= 0 (0: the model's default)")
        metadata = dict(context.invocation_metadata()) if context is not None else {}
        return self.prepare(ids, diffusion, metadata.get("x-tier"), req.max_new_tokens or None, req.stream_drafts)

    @staticmethod
    def _grpc_error(context, exc: Exception) -> None:
        import grpc

        if isinstance(exc, InvalidRequest):
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        elif isinstance(exc, Overloaded):
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_trailing_metadata([("retry-after-s", str(round(exc.retry_after_s, 1)))])
        else:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(str(exc))

    async def Generate(self, req: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        try:
            prep = self._grpc_prepare(req, grpc_context)
            tokens, final = await collect(await self.open(prep))
        except Exception as exc:
            self._grpc_error(grpc_context, exc)
            return pb.GenerateResponse()
        return pb.GenerateResponse(
            tier=prep.tier_name,
            text=self.tok.decode(tokens, skip_special_tokens=True),
            token_ids=tokens,
            finish_reason=final.finish_reason,
            usage=usage_pb(final.usage),
        )

    async def GenerateStream(self, req: pb.GenerateRequest, grpc_context=None):
        try:
            prep = self._grpc_prepare(req, grpc_context)
            detok = Detokenizer(self.tok)
            async for e in await self.open(prep):
                if isinstance(e, CanvasEvent):
                    c = pb.Canvas(index=e.index, text=detok.add(e.tokens), token_ids=e.tokens, steps=e.steps)
                    yield pb.GenerateChunk(canvas=c)
                elif isinstance(e, DraftEvent):
                    text = self.tok.decode(e.tokens, skip_special_tokens=True)
                    d = pb.Draft(canvas_index=e.canvas_index, step=e.step, text=text, token_ids=e.tokens)
                    yield pb.GenerateChunk(draft=d)
                elif isinstance(e, FinalEvent):
                    f = pb.Final(tier=prep.tier_name, finish_reason=e.finish_reason, usage=usage_pb(e.usage))
                    yield pb.GenerateChunk(final=f)
        except Exception as exc:
            self._grpc_error(grpc_context, exc)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class Router(GrpcMethods):
    def __init__(self, config: dict, pools: dict[str, DeploymentHandle]):
        from transformers import AutoTokenizer

        from model.weights import read_checkpoint

        self.config = AppConfig(**config)
        self.pools = pools
        path = resolve_model(self.config.model)
        self.tok = AutoTokenizer.from_pretrained(path)
        ckpt = read_checkpoint(path)
        self.model_id = "diffusiongemma-embedded" if self.config.model == "embedded" else self.config.model
        self.max_new_default = self.config.max_new_tokens or ckpt.generation.max_new_tokens
        self.max_context = min(p.max_context for p in self.config.pools.values())

    # ---------------------------------------------------------------- shared path

    def prepare(
        self,
        ids: list[int],
        diffusion: Diffusion,
        header_tier: str | None,
        max_new: int | None,
        stream_drafts: bool = False,
    ) -> Prepared:
        name = diffusion.tier or header_tier or self.config.default_tier
        tier = self.config.tiers.get(name)
        if tier is None:
            raise InvalidRequest("tier", f"unknown tier {name!r}; tiers: {sorted(self.config.tiers)}")
        if len(ids) > self.config.max_prompt_tokens:
            raise InvalidRequest("prompt", f"{len(ids)} tokens; the limit is {self.config.max_prompt_tokens}")
        # an empty prompt or ids outside the model's vocabulary: the engine refuses them (field "prompt")
        settings = tier.resolve(name, diffusion.overrides())
        payload = dict(
            prompt=list(ids),
            max_new_tokens=max_new or self.max_new_default,
            settings=asdict(settings),
            seed=diffusion.seed,
            stream_drafts=stream_drafts,
        )
        return Prepared(name, tier, payload, len(ids))

    async def open(self, prep: Prepared) -> AsyncIterator[CanvasEvent | DraftEvent | FinalEvent]:
        """Send the request to a replica of its tier's pool and wait until it is accepted (slot or queue
        place): refusals raise here, before any reply is started. Returns the request's events."""
        handle = self.pools[prep.tier.pool].options(stream=True)
        gen = handle.generate.remote(prep.payload)
        try:
            first = await anext(gen)
        except BaseException:
            gen.cancel()
            raise
        if isinstance(first, Refusal):
            gen.cancel()
            if first.kind == "overloaded":
                raise Overloaded(first.message, first.retry_after_s or 1.0)
            raise InvalidRequest(first.field or "request", first.message.split(": ", 1)[-1])
        return self._events(gen)

    @staticmethod
    async def _events(gen) -> AsyncIterator[CanvasEvent | DraftEvent | FinalEvent]:
        try:
            async for event in gen:
                if isinstance(event, ErrorEvent):
                    raise RuntimeError(event.message)
                yield event
        finally:
            gen.cancel()  # a no-op when finished; a disconnect or deadline frees the slot in the engine

    async def _http_open(
        self, ids: list[int], body: Diffusion, request: Request, max_new: int | None, stream_drafts: bool = False
    ) -> tuple[Prepared, AsyncIterator] | JSONResponse:
        """prepare + open for an HTTP route; a refusal becomes its 400 / 429 before any byte is sent."""
        try:
            prep = self.prepare(ids, body, request.headers.get("x-tier"), max_new, stream_drafts)
            return prep, await self.open(prep)
        except InvalidRequest as exc:
            return error_response(400, str(exc), exc.field)
        except Overloaded as exc:
            return error_response(429, str(exc), retry_after=exc.retry_after_s)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def text_ids(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    # ---------------------------------------------------------------- HTTP: OpenAI

    @api.get("/v1/models")
    async def models(self) -> dict:
        tiers = {
            name: {"description": t.description, "pool": t.pool, **t.sampler.model_dump()}
            for name, t in self.config.tiers.items()
        }
        card = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "diffusiongemma-serve"}
        return {"object": "list", "data": [card | {"tiers": tiers, "default_tier": self.config.default_tier}]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionBody, request: Request):
        ids = body.prompt if isinstance(body.prompt, list) else self.text_ids(body.prompt)
        return await self._openai(body, ids, request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatBody, request: Request):
        ids = self.chat_ids([m.model_dump() for m in body.messages])
        return await self._openai(body, ids, request, chat=True)

    async def _openai(self, body: OpenAIOptions, ids: list[int], request: Request, chat: bool):
        field = body.unsupported()
        if field is not None:
            return error_response(400, f"{field}: not supported by this server", field)
        if body.model is not None and body.model != self.model_id:
            return error_response(
                400, f"model: unknown model {body.model!r}; this server has {self.model_id!r}", "model"
            )
        opened = await self._http_open(ids, body, request, body.length())
        if isinstance(opened, JSONResponse):
            return opened
        prep, events = opened
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{int(time.time() * 1000)}"
        obj = "chat.completion" if chat else "text_completion"
        detok = Detokenizer(self.tok)

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            content = {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): content, "finish_reason": finish}

        def usage(u: Usage) -> dict:
            extra = {"canvases": u.canvases, "steps_per_canvas": u.steps_per_canvas, "tier": prep.tier_name}
            return {
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.generated_tokens,
                "total_tokens": u.prompt_tokens + u.generated_tokens,
                **extra,
            }

        if not body.stream:
            text, final = "", None
            async for e in events:
                if isinstance(e, CanvasEvent):
                    text += detok.add(e.tokens)
                elif isinstance(e, FinalEvent):
                    final = e
            reply = {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": self.model_id,
                "choices": [choice(text, finish_reason(final), delta=False)],
                "usage": usage(final.usage),
            }
            return JSONResponse(reply)

        async def sse():
            chunk_obj = obj + ".chunk" if chat else obj
            try:
                async for e in events:
                    if isinstance(e, CanvasEvent):
                        c = choice(detok.add(e.tokens), None, delta=True)
                        yield sse_line({"id": rid, "object": chunk_obj, "model": self.model_id, "choices": [c]})
                    elif isinstance(e, FinalEvent):
                        c = choice("", finish_reason(e), delta=True)
                        yield sse_line(
                            {
                                "id": rid,
                                "object": chunk_obj,
                                "model": self.model_id,
                                "choices": [c],
                                "usage": usage(e.usage),
                            }
                        )
            except Exception as exc:  # after the headers went out: report in-band, OpenAI style
                yield sse_line({"error": {"message": str(exc), "type": "server_error"}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    # ---------------------------------------------------------------- HTTP: native and health

    @api.post("/v1/generate")
    async def generate(self, body: GenerateBody, request: Request):
        given = [k for k in ("text", "prompt", "token_ids") if getattr(body, k) is not None]
        if len(given) != 1:
            return error_response(400, "exactly one of text, prompt or token_ids is required", "text")
        if body.text is not None:
            ids = self.chat_ids([{"role": "user", "content": body.text}])
        elif body.prompt is not None:
            ids = self.text_ids(body.prompt)
        else:
            ids = body.token_ids
        opened = await self._http_open(ids, body, request, body.max_new_tokens, body.stream_drafts)
        if isinstance(opened, JSONResponse):
            return opened
        prep, events = opened
        detok = Detokenizer(self.tok)

        def as_json(e) -> dict:
            if isinstance(e, CanvasEvent):
                return {
                    "type": "canvas",
                    "index": e.index,
                    "steps": e.steps,
                    "token_ids": e.tokens,
                    "text": detok.add(e.tokens),
                }
            if isinstance(e, DraftEvent):
                return {
                    "type": "draft",
                    "canvas_index": e.canvas_index,
                    "step": e.step,
                    "token_ids": e.tokens,
                    "text": self.tok.decode(e.tokens, skip_special_tokens=True),
                }
            return {"type": "final", "finish_reason": e.finish_reason, "tier": prep.tier_name, "usage": asdict(e.usage)}

        if body.stream:

            async def sse():
                try:
                    async for e in events:
                        yield sse_line(as_json(e))
                except Exception as exc:
                    yield sse_line({"type": "error", "message": str(exc)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        tokens, final = await collect(events)
        return {
            "text": self.tok.decode(tokens, skip_special_tokens=True),
            "token_ids": tokens,
            "finish_reason": final.finish_reason,
            "tier": prep.tier_name,
            "usage": asdict(final.usage),
        }

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self):
        """Ready when every pool answers a load query."""
        loads = {}
        for name, handle in self.pools.items():
            try:
                loads[name] = await handle.load.remote()
            except Exception as exc:
                return error_response(503, f"pool {name!r} is not ready: {exc}")
        return {"status": "ready", "pools": loads}
