"""Locust load test for a running deployment: the OpenAI routes, the native /v1/generate and gRPC.

    locust -f loadtest/locustfile.py --headless -u 16 -r 4 -t 2m --host http://127.0.0.1:8000 \
        --grpc-host 127.0.0.1:9000 --tier-mix fast:3,balanced:2,quality:1 --prompt-mix short:3,long:1 \
        --csv runs/locust --json-file runs/locust --exit-code-on-error 1

User classes (pick some by naming them after the options, all run by default): OpenAIChatUser (chat, plain
and streaming), OpenAICompletionUser (completions, plain and streaming), NativeUser (/v1/generate, plain and
streaming) and GrpcUser (Generate and GenerateStream). Options, also read from the environment:

- `--tier-mix` / LOCUST_TIER_MIX: `tier:weight,...`, the tier each request asks for
  (default fast:3,balanced:2,quality:1)
- `--prompt-mix` / LOCUST_PROMPT_MIX: `name:weight,...` over PROMPTS below: `short` asks for one canvas,
  `long` for four (default short:3,long:1)
- `--grpc-host` / LOCUST_GRPC_HOST: host:port of Serve's gRPC proxy (default 127.0.0.1:9000)
- `--app-name` / LOCUST_APP_NAME: the Serve application gRPC calls name in metadata (default diffusiongemma)
- `--pace` / LOCUST_PACE: seconds between the starts of one user's requests (default 0: back to back); users / pace
  is the offered rate even where most requests are refused at once (an overload test)
- `--completion-template` / LOCUST_COMPLETION_TEMPLATE: a user turn with `{prompt}`, for /v1/completions (which
  takes its prompt as is; the default is the embedded model's chat template)

Every answer's content is checked: a 200 without text, or with a malformed body, is a failure. A 429 or
RESOURCE_EXHAUSTED is overload, not a server error: it is counted in its own rows (request type OVERLOAD) and
does not fail the run; any other status fails. Streams add rows `<route> first canvas` (time to the first
canvas) and `<route> total`; `response_length` is the answer's token count.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel opens: gRPC's blocking calls then yield to other users

import grpc  # noqa: E402
from locust import HttpUser, User, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402

from protos.diffusiongemma.v1 import diffusion_pb2 as pb  # noqa: E402
from protos.diffusiongemma.v1 import diffusion_pb2_grpc as pb_grpc  # noqa: E402

OVERLOAD = "OVERLOAD"
# One user turn in the embedded model's chat template, for /v1/completions (which applies no template); set
# --completion-template for another model's, with {prompt} where the message goes.
EMBEDDED_TURN = "<|turn>user\n{prompt}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
FINISH_REASONS = {"eos", "length", "cancelled", "stop"}


@dataclass(frozen=True)
class Prompt:
    text: str  # one user message
    max_tokens: int


# Prompts the embedded model answers (its training tasks); a real model answers them too. `short` needs one
# 16-token canvas, `long` up to four, so a mix of them is a mix of light and heavy denoising work.
PROMPTS: dict[str, list[Prompt]] = {
    "short": [
        Prompt("reverse: a b c d", 16),
        Prompt("sort: 4132", 16),
        Prompt("add: 23 + 45", 16),
        Prompt("shift: a b c", 16),
    ],
    "long": [
        Prompt("pick 4 distinct: a b c d e f g", 64),
        Prompt("latin square: 1 0 0 / 0 0 0 / 0 0 0", 64),
        Prompt("arrange in any order: q w e r t", 64),
    ],
}


def parse_mix(spec: str, known: set[str] | None, option: str) -> dict[str, float]:
    """`a:3,b:1` -> {"a": 3.0, "b": 1.0}; a bad entry stops locust with a message naming the option."""
    mix = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition(":")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError:
            raise SystemExit(f"{option}: weight {weight!r} of {name!r} is not a number") from None
        if known is not None and name not in known:
            raise SystemExit(f"{option}: unknown name {name!r}; choose from {sorted(known)}")
        if mix[name] < 0:
            raise SystemExit(f"{option}: weight of {name!r} must not be negative")
    if not mix or sum(mix.values()) <= 0:
        raise SystemExit(f"{option}: at least one positive weight is needed")
    return mix


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--tier-mix", env_var="LOCUST_TIER_MIX", default="fast:3,balanced:2,quality:1")
    parser.add_argument("--prompt-mix", env_var="LOCUST_PROMPT_MIX", default="short:3,long:1")
    parser.add_argument("--grpc-host", env_var="LOCUST_GRPC_HOST", default="127.0.0.1:9000")
    parser.add_argument("--app-name", env_var="LOCUST_APP_NAME", default="diffusiongemma")
    parser.add_argument("--pace", env_var="LOCUST_PACE", type=float, default=0.0)
    parser.add_argument("--completion-template", env_var="LOCUST_COMPLETION_TEMPLATE", default=EMBEDDED_TURN)


def paced(user: User) -> float:
    """The wait before a user's next request: its requests start `--pace` seconds apart, or back to back where
    one took longer (locust's constant_pacing, with the pace from the command line)."""
    opts = user.environment.parsed_options
    pace = getattr(opts, "pace", 0.0) if opts else 0.0
    now = time.perf_counter()
    user.next_start = max(now, getattr(user, "next_start", now) + pace)
    return user.next_start - now


class Workload:
    """The tier and prompt of the next request, drawn from the mixes."""

    def __init__(self, environment: Environment):
        opts = environment.parsed_options
        tier_spec = opts.tier_mix if opts else "fast:3,balanced:2,quality:1"
        prompt_spec = opts.prompt_mix if opts else "short:3,long:1"
        self.tiers = parse_mix(tier_spec, None, "--tier-mix")
        self.prompts = parse_mix(prompt_spec, set(PROMPTS), "--prompt-mix")
        self.rnd = random.Random()

    def next(self) -> tuple[str, Prompt]:
        tier = self.rnd.choices(list(self.tiers), weights=list(self.tiers.values()))[0]
        kind = self.rnd.choices(list(self.prompts), weights=list(self.prompts.values()))[0]
        return tier, self.rnd.choice(PROMPTS[kind])


def fire(environment: Environment, kind: str, name: str, started: float, length: int, error: Exception | None):
    environment.events.request.fire(
        request_type=kind,
        name=name,
        response_time=(time.perf_counter() - started) * 1000,
        response_length=length,
        exception=error,
        context={},
    )


class BadAnswer(Exception):
    """A 200 whose body is empty or malformed."""


def sse_objects(response) -> list[tuple[float, dict]]:
    """The `data:` objects of a server-sent-events body, each with the time it arrived; [DONE] required."""
    seen, done = [], False
    for raw in response.iter_lines():
        line = raw.decode()
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
            break
        seen.append((time.perf_counter(), json.loads(data)))
    if not done:
        raise BadAnswer("the stream ended without [DONE]")
    return seen


class ServeHttpUser(HttpUser):
    """Shared by the HTTP users: each route plain and streaming (one task each), overload sorted from failure,
    the answer's content checked. A subclass says how to send one request in `send`."""

    abstract = True
    wait_time = paced

    def on_start(self) -> None:
        self.workload = Workload(self.environment)

    @task
    def plain(self) -> None:
        self.send(stream=False)

    @task
    def streaming(self) -> None:
        self.send(stream=True)

    def send(self, stream: bool) -> None:
        raise NotImplementedError

    def call(self, route: str, body: dict, tier: str, check, stream: bool) -> None:
        started = time.perf_counter()
        name = f"{route} stream" if stream else route
        with self.client.post(
            route, json=body, headers={"x-tier": tier}, name=name, catch_response=True, stream=stream
        ) as resp:
            if resp.status_code == 429:
                resp.request_meta["request_type"] = OVERLOAD
                resp.success()
                return
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                if stream:
                    tokens = self.read_stream(route, resp, started, check)
                else:
                    tokens = check(resp.json(), False)
            except (BadAnswer, ValueError, KeyError, TypeError) as exc:
                resp.failure(f"bad answer: {exc}")
                return
            resp.request_meta["response_length"] = tokens
            resp.success()

    def read_stream(self, route: str, resp, started: float, check) -> int:
        objects = sse_objects(resp)
        if not objects:
            raise BadAnswer("an empty stream")
        first = objects[0][0]
        tokens = check([o for _, o in objects], True)
        self.environment.events.request.fire(
            request_type="STREAM",
            name=f"{route} first canvas",
            response_time=(first - started) * 1000,
            response_length=0,
            exception=None,
            context={},
        )
        fire(self.environment, "STREAM", f"{route} total", started, tokens, None)
        return tokens


def check_openai(body: dict | list[dict], stream: bool, chat: bool) -> int:
    """Text present, a finish reason, usage with generated tokens: the token count, or BadAnswer."""
    if stream:
        text, finish = "", None
        for chunk in body:
            if "error" in chunk:
                raise BadAnswer(f"in-band error: {chunk['error']}")
            for choice in chunk["choices"]:  # none in the usage chunk (stream_options.include_usage)
                text += choice["delta"].get("content") or "" if chat else choice["text"]
                finish = choice["finish_reason"] or finish
        usage = body[-1].get("usage")
    else:
        choice = body["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        finish, usage = choice["finish_reason"], body.get("usage")
    if not text or not text.strip():
        raise BadAnswer("no text")
    if finish not in FINISH_REASONS:
        raise BadAnswer(f"finish_reason {finish!r}")
    if not usage or usage["completion_tokens"] <= 0:
        raise BadAnswer(f"usage {usage!r}")
    return int(usage["completion_tokens"])


def check_native(body: dict | list[dict], stream: bool) -> int:
    if stream:
        if any(o.get("type") == "error" for o in body):
            raise BadAnswer("in-band error")
        text = "".join(o["text"] for o in body if o["type"] == "canvas")
        final = body[-1]
        if final["type"] != "final":
            raise BadAnswer("no final event")
        finish, usage = final["finish_reason"], final["usage"]
    else:
        text, finish, usage = body["text"], body["finish_reason"], body["usage"]
        if len(body["token_ids"]) != usage["generated_tokens"]:
            raise BadAnswer("token_ids and usage disagree")
    if not text.strip():
        raise BadAnswer("no text")
    if finish not in FINISH_REASONS:
        raise BadAnswer(f"finish_reason {finish!r}")
    if usage["generated_tokens"] <= 0:
        raise BadAnswer(f"usage {usage!r}")
    return int(usage["generated_tokens"])


class OpenAIChatUser(ServeHttpUser):
    def send(self, stream: bool) -> None:
        tier, prompt = self.workload.next()
        body = {"messages": [{"role": "user", "content": prompt.text}], "max_tokens": prompt.max_tokens}
        if stream:  # a last chunk, with no choices, carries the usage
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        self.call("/v1/chat/completions", body, tier, lambda b, s: check_openai(b, s, chat=True), stream)


class OpenAICompletionUser(ServeHttpUser):
    def on_start(self) -> None:
        super().on_start()
        opts = self.environment.parsed_options
        self.completion_template = opts.completion_template if opts else EMBEDDED_TURN

    def send(self, stream: bool) -> None:
        tier, prompt = self.workload.next()
        text = self.completion_template.format(prompt=prompt.text)  # completions take the prompt as is
        body = {"prompt": text, "max_tokens": prompt.max_tokens, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        self.call("/v1/completions", body, tier, lambda b, s: check_openai(b, s, chat=False), stream)


class NativeUser(ServeHttpUser):
    def send(self, stream: bool) -> None:
        tier, prompt = self.workload.next()
        body = {"text": prompt.text, "max_new_tokens": prompt.max_tokens, "tier": tier, "stream": stream}
        self.call("/v1/generate", body, tier, check_native, stream)


class GrpcUser(User):
    """Serve's gRPC proxy, through the generated stub on a gevent-friendly channel; events fired by hand."""

    wait_time = paced

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.target = opts.grpc_host if opts else "127.0.0.1:9000"
        self.app = opts.app_name if opts else "diffusiongemma"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.DiffusionServiceStub(self.channel)
        self.workload = Workload(self.environment)

    def on_stop(self) -> None:
        self.channel.close()

    def request(self) -> tuple[pb.GenerateRequest, tuple]:
        tier, prompt = self.workload.next()
        req = pb.GenerateRequest(text=prompt.text, max_new_tokens=prompt.max_tokens)
        return req, (("application", self.app), ("x-tier", tier))

    def settle(self, name: str, started: float, exc: grpc.RpcError) -> None:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            fire(self.environment, OVERLOAD, name, started, 0, None)
        else:
            fire(self.environment, "grpc", name, started, 0, exc)

    @task
    def generate(self) -> None:
        req, metadata = self.request()
        name, started = "Generate", time.perf_counter()
        try:
            reply = self.stub.Generate(req, metadata=metadata, timeout=120)
        except grpc.RpcError as exc:
            return self.settle(name, started, exc)
        error = None
        if not reply.text.strip() or reply.usage.generated_tokens <= 0 or not reply.request_id:
            error = BadAnswer(f"empty or malformed reply: {str(reply)[:200]}")
        fire(self.environment, "grpc", name, started, reply.usage.generated_tokens, error)

    @task
    def generate_stream(self) -> None:
        req, metadata = self.request()
        name, started = "GenerateStream", time.perf_counter()
        first, text, final = None, "", None
        try:
            for chunk in self.stub.GenerateStream(req, metadata=metadata, timeout=120):
                kind = chunk.WhichOneof("kind")
                if kind == "canvas":
                    if first is None:
                        first = time.perf_counter()
                    text += chunk.canvas.text
                elif kind == "final":
                    final = chunk.final
        except grpc.RpcError as exc:
            return self.settle(name, started, exc)
        error = None
        if final is None or first is None or not text.strip() or final.usage.generated_tokens <= 0:
            error = BadAnswer("a stream without canvases, text or a final chunk")
        tokens = final.usage.generated_tokens if final is not None else 0
        fire(self.environment, "grpc", name, started, tokens, error)
        if error is None:
            self.environment.events.request.fire(
                request_type="STREAM",
                name="GenerateStream first canvas",
                response_time=(first - started) * 1000,
                response_length=0,
                exception=None,
                context={},
            )
            fire(self.environment, "STREAM", "GenerateStream total", started, tokens, None)
