"""The per-replica engine: one denoiser, its KV-cache slots, and one background loop that batches per step.

    engine = Engine(denoiser, max_queue=64)
    engine.start()                                   # inside a running event loop
    stream = engine.submit(GenerateRequest(prompt_ids, max_new_tokens=64, settings=..., seed=7))
    async for event in stream: ...                   # CanvasEvent / DraftEvent, then FinalEvent or ErrorEvent

Each loop iteration asks the scheduler for a plan (serving/scheduler.py), runs it on a worker thread (so the
event loop keeps taking submissions and cancels during a forward), then turns the results into events.
One iteration is at most two forwards: a causal one that encodes new prompts and committed canvases together,
and one denoising step for every stepping row, whatever step or canvas each is at and whatever its settings.

Failure isolation: if a batched forward raises, its rows are retried one at a time and only the rows that
fail alone get an ErrorEvent (a step changes no state until it has succeeded, and an encode is idempotent
until the cache length moves), so one bad request cannot take the others down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from prometheus_client import REGISTRY, CollectorRegistry

from model.config import SamplerSettings
from model.denoiser import Denoiser
from serving.metrics import engine_metrics
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
from serving.scheduler import Job, Load, Plan, Scheduler

# The scratch slot only pads row buckets: one step per canvas, no adaptive stop.
_SCRATCH_SETTINGS = SamplerSettings(max_denoising_steps=1, confidence_threshold=None)


@dataclass
class StepOutcome:
    done: bool
    steps: int
    canvas: list[int] | None  # the argmax canvas, when it is committed or streamed as a draft


@dataclass
class Outcome:
    stepped: dict[str, StepOutcome] = field(default_factory=dict)
    failed: dict[str, BaseException] = field(default_factory=dict)


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
        return self._job.request.request_id

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
        row_buckets: tuple[int, ...] | None = None,
        name: str = "default",
        registry: CollectorRegistry = REGISTRY,
        stuck_after_s: float = 120.0,
    ):
        """`row_buckets` pads every denoising forward up to the next listed row count with a scratch slot
        (the last one, then not given to requests), so a compiled graph per bucket is reused."""
        self.denoiser = denoiser
        slots = denoiser.cache.slots
        self.scratch: int | None = None
        if row_buckets:
            self.scratch = slots - 1
            slots -= 1
            if slots < 1:
                raise ValueError("row buckets need a denoiser with at least two slots (one is the scratch slot)")
            self.row_buckets = tuple(sorted(row_buckets))
        else:
            self.row_buckets = ()
        rows = min(max_batch_rows or slots, slots)
        self.scheduler = Scheduler(slots, rows, max_queue, max_prefill_tokens)
        self.name = name
        self.stuck_after_s = stuck_after_s
        self.metrics = engine_metrics(registry)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}")
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._busy_since: float | None = None
        self.iterations = 0
        self.forwards = 0
        self.busy_s = 0.0  # time spent in iterations, forwards and events (the rest it waited for requests)
        self._iteration_s = 0.0  # moving average of one iteration's wall time

    # ---------------------------------------------------------------- public API

    def start(self) -> None:
        """Start the loop on the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"engine-{self.name}")
            if self.scratch is not None:
                self._executor.submit(self._prepare_scratch).result()

    async def stop(self) -> None:
        """Stop the loop; every queued or live request gets an ErrorEvent."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in list(self.scheduler.queue) + list(self.scheduler.live.values()):
            self._fail(job, "the engine stopped")
        self.scheduler.queue.clear()
        self._executor.shutdown(wait=True)

    def submit(self, request: GenerateRequest) -> RequestStream:
        """Queue a request. Raises InvalidRequest if it can never be served, Overloaded if the queue is full."""
        try:
            self._validate(request)
        except InvalidRequest:
            self.metrics.requests.labels(self.name, "rejected").inc()
            raise
        c = self.denoiser.canvas_length
        job = Job(request, canvases_total=-(-request.max_new_tokens // c))
        if not self.scheduler.enqueue(job):
            self.metrics.requests.labels(self.name, "overloaded").inc()
            raise Overloaded(f"the queue is full ({self.scheduler.max_queue} requests waiting)", self.retry_after_s())
        self.metrics.queue_depth.labels(self.name).set(len(self.scheduler.queue))
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
        for job in self.scheduler.queue:
            if job.request.request_id == request_id:
                self.scheduler.queue.remove(job)
                self._finish(job, "cancelled")
                return True
        job = self.scheduler.live.get(request_id)
        if job is None or job.cancelled:
            return False
        job.cancelled = True
        self._wake.set()
        return True

    def load(self) -> Load:
        return self.scheduler.load()

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
            self._reap_cancelled()
            if self.scheduler.idle():
                self._wake.clear()
                await self._wake.wait()
                continue
            plan = self.scheduler.plan()
            now = time.perf_counter()
            for job in plan.admit:
                job.admitted = now
                self.metrics.queue_time.labels(self.name).observe(now - job.arrived)
            self._busy_since = began = time.monotonic()
            try:
                outcome = await loop.run_in_executor(self._executor, self._execute, plan)
            except Exception as exc:  # outside per-row isolation (a bug): fail this plan's rows, keep serving
                outcome = Outcome(failed={j.request.request_id: exc for j in _unique(plan)})
            finally:
                self._busy_since = None
            self._apply(plan, outcome)
            self.iterations += 1
            took = time.monotonic() - began
            self.busy_s += took
            self._iteration_s += 0.1 * (took - self._iteration_s)
            m = self.metrics
            m.busy.labels(self.name).inc(took)
            m.queue_depth.labels(self.name).set(len(self.scheduler.queue))
            m.occupancy.labels(self.name).set(len(self.scheduler.live) / self.scheduler.slots)
            await asyncio.sleep(0)  # let submissions and cancels in between iterations

    @torch.inference_mode()
    def _execute(self, plan: Plan) -> Outcome:
        """Worker thread: all denoiser calls happen here, one plan at a time."""
        d = self.denoiser
        out = Outcome()
        for job in plan.admit:
            try:
                d.admit(job.slot, job.request.settings, job.request.seed)
            except Exception as exc:
                out.failed[job.request.request_id] = exc
        encode = [j for j in plan.admit + plan.commit if j.request.request_id not in out.failed]

        def run_encode(jobs: list[Job]) -> list[None]:
            pre = [j for j in jobs if j.phase == "prefill"]
            com = [j for j in jobs if j.phase == "commit"]
            d.encode([j.slot for j in pre], [j.request.prompt for j in pre], [j.slot for j in com])
            self.forwards += 1
            return [None] * len(jobs)

        encoded = self._isolated(encode, run_encode, out)
        if encoded:
            d.start_canvas([j.slot for j in encoded])
        rows = [j for j in plan.denoise if j.request.request_id not in out.failed]

        def run_step(jobs: list[Job]) -> list[StepOutcome]:
            slots = [j.slot for j in jobs]
            pad = self._bucket(len(slots)) - len(slots)
            result = d.step(slots + [self.scratch] * pad)
            self.forwards += 1
            outs = []
            for i, j in enumerate(jobs):
                keep = result.done[i] or j.request.stream_drafts
                outs.append(StepOutcome(result.done[i], result.steps[i], result.argmax[i].tolist() if keep else None))
            return outs

        for job, step in zip(rows, self._isolated(rows, run_step, out, keep_rows=True)):
            if step is not None:
                out.stepped[job.request.request_id] = step
        if self.scratch is not None:
            d.start_canvas([self.scratch])  # keep the scratch row's state bounded
        return out

    def _isolated(self, jobs: list[Job], fn: Callable[[list[Job]], list], out: Outcome, keep_rows: bool = False):
        """fn(jobs) for all rows; if that raises, fn([job]) for each row alone, recording the failures.
        Returns the rows' results (keep_rows: aligned with jobs, None for failed ones) or the jobs that ran."""
        if not jobs:
            return []
        try:
            results = fn(jobs)
            return results if keep_rows else list(jobs)
        except Exception as batch_exc:
            if len(jobs) == 1:
                out.failed[jobs[0].request.request_id] = batch_exc
                return [None] if keep_rows else []
        results, ok = [], []
        for job in jobs:
            try:
                results.append(fn([job])[0])
                ok.append(job)
            except Exception as exc:
                out.failed[job.request.request_id] = exc
                results.append(None)
        return results if keep_rows else ok

    def _bucket(self, rows: int) -> int:
        for b in self.row_buckets:
            if b >= rows:
                return b
        return rows

    @torch.inference_mode()
    def _prepare_scratch(self) -> None:
        d = self.denoiser
        d.admit(self.scratch, _SCRATCH_SETTINGS, 0)
        d.encode([self.scratch], [[d.config.pad_token_id]], [])
        d.start_canvas([self.scratch])

    # ---------------------------------------------------------------- results to events

    def _apply(self, plan: Plan, outcome: Outcome) -> None:
        m = self.metrics
        committed = {j.request.request_id for j in plan.commit}
        for job in _unique(plan):
            if job.phase == "done":
                continue
            rid = job.request.request_id
            if rid in outcome.failed:
                self._fail(job, f"{type(outcome.failed[rid]).__name__}: {outcome.failed[rid]}")
                continue
            if job.phase == "prefill":
                job.phase = "denoise"
            elif rid in committed:
                job.phase = "denoise"
                job.canvas_index += 1
                job.steps_taken = 0
            step = outcome.stepped.get(rid)
            if step is None:
                continue
            job.last_stepped = self.scheduler.iteration
            job.steps_taken = step.steps
            if job.request.stream_drafts:
                job.events.put_nowait(DraftEvent(job.canvas_index, step.steps, step.canvas))
            if step.done:
                self._canvas_done(job, step)
        rows = len(plan.denoise)
        if rows:
            m.batch_rows.labels(self.name).observe(rows)

    def _canvas_done(self, job: Job, step: StepOutcome) -> None:
        m = self.metrics
        tokens, eos = self.denoiser.cut_at_eos(step.canvas)
        job.generated += len(tokens)
        job.steps_per_canvas.append(step.steps)
        if job.first_canvas is None:
            job.first_canvas = time.perf_counter()
            m.time_to_first_canvas.labels(self.name).observe(job.first_canvas - job.arrived)
        m.steps_per_canvas.labels(self.name).observe(step.steps)
        m.tokens_per_forward.labels(self.name).observe(len(tokens) / step.steps)
        job.events.put_nowait(CanvasEvent(job.canvas_index, tokens, step.steps))
        if eos:
            self._finish(job, "eos")
        elif job.canvas_index + 1 == job.canvases_total:
            self._finish(job, "length")
        else:
            job.phase = "commit"

    def _reap_cancelled(self) -> None:
        for job in [j for j in self.scheduler.live.values() if j.cancelled]:
            self._finish(job, "cancelled")

    def _finish(self, job: Job, reason: str) -> None:
        now = time.perf_counter()
        arrived = job.arrived
        usage = Usage(
            prompt_tokens=len(job.request.prompt),
            generated_tokens=job.generated,
            canvases=len(job.steps_per_canvas),
            steps_per_canvas=list(job.steps_per_canvas),
            queue_time_s=(job.admitted or now) - arrived,
            time_to_first_canvas_s=None if job.first_canvas is None else job.first_canvas - arrived,
            total_time_s=now - arrived,
        )
        self.scheduler.release(job)
        self.metrics.requests.labels(self.name, reason).inc()
        job.events.put_nowait(FinalEvent(reason, usage))

    def _fail(self, job: Job, message: str) -> None:
        self.scheduler.release(job)
        self.metrics.requests.labels(self.name, "error").inc()
        job.events.put_nowait(ErrorEvent(message))

    # ---------------------------------------------------------------- validation

    def _validate(self, r: GenerateRequest) -> None:
        d = self.denoiser
        vocab = d.config.vocab_size
        if not r.prompt:
            raise InvalidRequest("prompt", "must hold at least one token")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in r.prompt):
            raise InvalidRequest("prompt", f"token ids must be integers in [0, {vocab})")
        if not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens", f"must be an integer >= 1, got {r.max_new_tokens!r}")
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
        rid = r.request_id
        if rid in self.scheduler.live or any(j.request.request_id == rid for j in self.scheduler.queue):
            raise InvalidRequest("request_id", f"{rid!r} is already in flight")


def _unique(plan: Plan) -> list[Job]:
    """The plan's jobs, each once (a committed or new row is also a stepping row)."""
    return list({j.request.request_id: j for j in plan.admit + plan.commit + plan.denoise}.values())
