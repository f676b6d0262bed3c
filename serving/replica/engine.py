"""The per-replica engine: one denoiser, its KV-cache slots, and one background loop that batches per step.

    engine = Engine(denoiser, max_queue=64)
    engine.start()                                   # inside a running event loop
    stream = engine.submit(GenerateRequest(prompt_ids, max_new_tokens=64, settings=..., seed=7))
    async for event in stream: ...                   # CanvasEvent / DraftEvent, then FinalEvent or ErrorEvent

The loop is a few lines: the scheduler plans an iteration (serving/replica/scheduler.py), the model runner carries it
out on a worker thread (serving/replica/runner.py; the event loop keeps taking submissions and cancels meanwhile), the
scheduler applies the outcome, and the engine turns its reports into events and metrics. The engine never
changes a request's phase itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from model.automaton import TokenVocabulary
from model.config import MAX_TOP_LOGPROBS, canvas_count
from model.denoiser import Denoiser
from serving.metrics import engine_metrics
from serving.replica.constraints import Constraints
from serving.replica.latency_bound import LatencyBound
from serving.replica.runner import ModelRunner
from serving.replica.scheduler import Committed, Drafted, Failed, Finished, Job, Load, Outcome, Phase, Report, Scheduler
from serving.request import (
    CanvasEvent,
    DraftEvent,
    ErrorEvent,
    Event,
    FinalEvent,
    GenerateRequest,
    InvalidRequest,
    Overloaded,
    Usage,
)

log = logging.getLogger("ray.serve")


@dataclass
class Completion:
    """A whole generation, gathered from a stream (what non-streaming callers want)."""

    tokens: list[int]
    finish_reason: str
    usage: Usage


class RequestStream:
    """The events of one request. Closing it early (or leaving `async with`) cancels the request."""

    def __init__(self, engine: Engine, job: Job):
        self._engine = engine
        self._job = job
        self._finished = False

    @property
    def request_id(self) -> str:
        return self._job.id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self._finished:
            raise StopAsyncIteration
        event = await self._job.events.get()
        if isinstance(event, (FinalEvent, ErrorEvent)):
            self._finished = True
        return event

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self._engine.cancel(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class EngineError(RuntimeError):
    """A request failed inside the engine (its ErrorEvent, raised by `Engine.generate`)."""


class Engine:
    def __init__(
        self,
        denoiser: Denoiser,
        *,
        max_batch_rows: int | None = None,
        max_queue: int = 64,
        max_prefill_tokens: int = 4096,
        tier_queue_share: float = 1.0,
        row_buckets: tuple[int, ...] | None = None,
        name: str = "default",
        registry: CollectorRegistry | None = None,  # None: Ray's metrics in a Ray process, else the default
        stuck_after_s: float = 120.0,
        max_slowdown: float | None = None,
        vocabulary: TokenVocabulary | None = None,
    ):
        """`row_buckets` pads every denoising forward up to the next listed row count (serving/replica/runner.py);
        `max_slowdown` caps the requests held by the latency they would see (serving/replica/latency_bound.py);
        `vocabulary`, the checkpoint's token bytes, lets requests bring constraints (serving/replica/constraints.py)."""
        self.denoiser = denoiser
        d = denoiser
        self.constraints = Constraints(vocabulary, tuple(sorted(d.eos_ids)), d.config.vocab_size, d.net.device)
        self.runner = ModelRunner(denoiser, row_buckets)
        slots = self.runner.slots
        rows = min(max_batch_rows or slots, slots)
        self.scheduler = Scheduler(slots, rows, max_queue, max_prefill_tokens, tier_queue_share)
        self.latency_bound = LatencyBound(max_slowdown, slots) if max_slowdown is not None else None
        self.name = name
        self.stuck_after_s = stuck_after_s
        self.metrics = engine_metrics(registry)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}")
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._busy_since: float | None = None
        self.iterations = 0
        self.busy_s = 0.0  # time spent in iterations, forwards and events (the rest it waited for requests)
        self._iteration_s = 0.0  # moving average of one iteration's wall time

    @property
    def forwards(self) -> int:
        return self.runner.forwards

    # ---------------------------------------------------------------- public API

    def start(self) -> None:
        """Start the loop on the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"engine-{self.name}")
            self._executor.submit(self.runner.prepare).result()

    async def stop(self) -> None:
        """Stop the loop; every queued or live request gets an ErrorEvent."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self.scheduler.drain():
            self._fail(job, "the engine stopped")
        self._executor.shutdown(wait=True)

    def submit(self, request: GenerateRequest) -> RequestStream:
        """Queue a request. Raises InvalidRequest if it can never be served, Overloaded if the queue is full."""
        try:
            automaton = self._validate(request)
        except InvalidRequest:
            self.metrics.requests.labels(self.name, "rejected").inc()
            raise
        job = Job(request, self.denoiser.canvas_length, automaton=automaton)
        limit = self.latency_bound.limit() if self.latency_bound is not None else None
        refused = self.scheduler.submit(job, limit)
        if refused is not None:
            self.metrics.requests.labels(self.name, "overloaded").inc()
            if refused == "latency":
                message = f"the replica holds as many requests as its latency bound allows ({limit})"
            elif refused == "tier_share":
                message = f"tier {request.tier!r} holds its share of the queue ({self.scheduler.tier_places} waiting)"
            else:
                message = f"the queue is full ({self.scheduler.max_queue} requests waiting)"
            raise Overloaded(message, self.retry_after_s())
        self._gauges()
        self._wake.set()
        return RequestStream(self, job)

    async def generate(self, request: GenerateRequest) -> Completion:
        """Submit and wait for the whole answer."""
        tokens: list[int] = []
        async with self.submit(request) as stream:
            async for event in stream:
                if isinstance(event, CanvasEvent):
                    tokens += event.tokens
                elif isinstance(event, FinalEvent):
                    return Completion(tokens, event.finish_reason, event.usage)
                elif isinstance(event, ErrorEvent):
                    raise EngineError(event.message)
        raise EngineError("the stream ended without a final event")

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; its stream ends with finish_reason "cancelled". The slot is
        freed before the next iteration. Returns False if the id is unknown or already finished."""
        job = self.scheduler.cancel(request_id)
        if job is None:
            return False
        if job.phase is Phase.DONE:  # it was still queued: nothing runs it any more
            self._finish(job, "cancelled")
        self._wake.set()
        return True

    def load(self) -> Load:
        """The scheduler's load; with a latency bound, the free slots it leaves (what routers read)."""
        load = self.scheduler.load()
        if self.latency_bound is None:
            return load
        room = max(0, self.latency_bound.limit() - load.live_requests - load.queue_depth)
        return dataclasses.replace(load, free_slots=min(load.free_slots, room))

    def work(self) -> list[int]:
        """Steps left per live and queued request (the request router's view of what a new request would share)."""
        return self.scheduler.work()

    def check_health(self) -> None:
        """Raise if the loop has died or one iteration has been running for longer than `stuck_after_s`."""
        if self._task is None:
            raise RuntimeError("the engine loop was never started")
        if self._task.done():
            exc = None if self._task.cancelled() else self._task.exception()
            raise RuntimeError(f"the engine loop is dead: {exc!r}")
        if self._busy_since is not None and time.monotonic() - self._busy_since > self.stuck_after_s:
            raise RuntimeError(f"one engine iteration has run for over {self.stuck_after_s:.0f} s")

    def retry_after_s(self) -> float:
        """A retry hint for overload: the time the outstanding denoising steps take at the recent pace (the
        mean iteration time, with up to `max_batch_rows` row-steps per iteration), between 1 and 60 s."""
        rows = self.scheduler.max_batch_rows
        return max(1.0, min(60.0, self.load().outstanding_steps / rows * self._iteration_s))

    # ---------------------------------------------------------------- the loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.scheduler.idle():
                self._wake.clear()
                await self._wake.wait()
                continue
            plan = self.scheduler.plan()
            for job in plan.cancelled:
                self._finish(job, "cancelled")
            if not plan.has_work():
                continue
            for job in plan.admit:
                self.metrics.queue_time.labels(self.name).observe(job.admitted - job.arrived)
                if self.denoiser.prefix is not None:
                    self.metrics.prefix_queried_tokens.labels(self.name).inc(len(job.request.prompt))
            self._busy_since = began = time.monotonic()
            try:
                outcome = await loop.run_in_executor(self._executor, self.runner.run, plan)
            except Exception as exc:  # outside per-row isolation (a bug): fail this plan's rows, keep serving
                outcome = Outcome(failed={j.id: exc for j in plan.jobs()})
            finally:
                self._busy_since = None
            hits = sum(outcome.cached_tokens.values())
            if hits:
                self.metrics.prefix_hit_tokens.labels(self.name).inc(hits)
            if outcome.out_of_memory_rows is not None:
                self._lower_rows(outcome.out_of_memory_rows)
            self._report(self.scheduler.apply(plan, outcome))
            self._count(len(plan.denoise), time.monotonic() - began)
            await asyncio.sleep(0)  # let submissions and cancels in between iterations

    def _lower_rows(self, failed_at: int) -> None:
        """A forward of `failed_at` rows ran out of device memory: take at most half as many from now on."""
        rows = max(1, min(self.scheduler.max_batch_rows, failed_at // 2))
        if rows < self.scheduler.max_batch_rows:
            log.warning(
                "engine %s: out of device memory at %d rows in one forward; rows per forward lowered from %d to %d",
                self.name, failed_at, self.scheduler.max_batch_rows, rows,
            )  # fmt: skip
            self.scheduler.max_batch_rows = rows
            self.metrics.out_of_memory.labels(self.name).inc()

    def _report(self, reports: list[Report]) -> None:
        m = self.metrics
        for r in reports:
            job = r.job
            if isinstance(r, Drafted):
                job.events.put_nowait(DraftEvent(job.canvas_index, r.step.steps, r.step.draft))
            elif isinstance(r, Committed):
                if len(job.steps_per_canvas) == 1:
                    m.time_to_first_canvas.labels(self.name).observe(job.first_canvas - job.arrived)
                m.steps_per_canvas.labels(self.name).observe(r.step.steps)
                m.tokens_per_forward.labels(self.name).observe(len(r.step.tokens) / r.step.steps)
                m.generated_tokens.labels(self.name).inc(len(r.step.tokens))
                step = r.step
                job.events.put_nowait(
                    CanvasEvent(job.canvas_index, step.tokens, step.steps, step.logprobs, step.top_logprobs)
                )
            elif isinstance(r, Finished):
                self._finish(job, r.reason)
            elif isinstance(r, Failed):
                self._fail(job, f"{type(r.error).__name__}: {r.error}")

    def _count(self, rows: int, took: float) -> None:
        self.iterations += 1
        self.busy_s += took
        self._iteration_s += 0.1 * (took - self._iteration_s)
        if self.latency_bound is not None:
            self.latency_bound.observe(rows, took)
        m = self.metrics
        if rows:
            m.batch_rows.labels(self.name).observe(rows)
        m.busy.labels(self.name).inc(took)
        self._gauges()

    def _gauges(self) -> None:
        m, load = self.metrics, self.scheduler.load()
        m.queue_depth.labels(self.name).set(load.queue_depth)
        m.occupancy.labels(self.name).set(load.live_requests / self.scheduler.slots)
        m.outstanding_steps.labels(self.name).set(load.outstanding_steps)

    def _finish(self, job: Job, reason: str) -> None:
        now = time.perf_counter()
        usage = Usage(
            prompt_tokens=len(job.request.prompt),
            generated_tokens=job.generated,
            canvases=len(job.steps_per_canvas),
            steps_per_canvas=list(job.steps_per_canvas),
            queue_time_s=(job.admitted or now) - job.arrived,
            time_to_first_canvas_s=None if job.first_canvas is None else job.first_canvas - job.arrived,
            total_time_s=now - job.arrived,
            cached_tokens=job.cached_tokens,
        )
        self.metrics.requests.labels(self.name, reason).inc()
        job.events.put_nowait(FinalEvent(reason, usage))

    def _fail(self, job: Job, message: str) -> None:
        self.metrics.requests.labels(self.name, "error").inc()
        job.events.put_nowait(ErrorEvent(message))

    # ---------------------------------------------------------------- validation

    def _validate(self, r: GenerateRequest) -> object | None:
        """InvalidRequest naming the field where the request cannot be served; its compiled constraint if any."""
        d = self.denoiser
        vocab = d.config.vocab_size
        if not r.prompt:
            raise InvalidRequest("prompt", "must hold at least one token")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in r.prompt):
            raise InvalidRequest("prompt", f"token ids must be integers in [0, {vocab})")
        if not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens", f"must be an integer >= 1, got {r.max_new_tokens!r}")
        if r.logprobs is not None and not (isinstance(r.logprobs, int) and 0 <= r.logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidRequest("top_logprobs", f"must be an integer within [0, {MAX_TOP_LOGPROBS}]")
        if r.template is not None:
            room = canvas_count(r.max_new_tokens, d.canvas_length) * d.canvas_length
            if len(r.template) > room:
                raise InvalidRequest("template", f"{len(r.template)} positions; the answer's canvases hold {room}")
            if any(not isinstance(t, int) or isinstance(t, bool) or not -1 <= t < vocab for t in r.template):
                raise InvalidRequest("template", f"ids must be -1 (free) or integers in [0, {vocab})")
        limit = d.history.shape[1]
        if r.settings.stability_threshold > limit:
            raise InvalidRequest("stability_threshold", f"must be <= {limit} on this engine")
        need = d.context_needed(len(r.prompt), r.max_new_tokens)
        if need > d.cache.max_context:
            raise InvalidRequest(
                "max_new_tokens",
                f"prompt ({len(r.prompt)} tokens) plus output needs {need} context tokens; this engine holds "
                f"{d.cache.max_context}",
            )
        if self.scheduler.find(r.request_id) is not None:
            raise InvalidRequest("request_id", f"{r.request_id!r} is already in flight")
        if r.constraint is None:
            return None
        room = canvas_count(r.max_new_tokens, d.canvas_length) * d.canvas_length
        return self.constraints.check(r.constraint, room, d.canvas_length, r.template)
