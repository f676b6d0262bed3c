"""Which requests run in the next forward, and every change of a request's phase.

A request lives for many forwards: a prefill, then per canvas up to its step cap of denoising steps, then a
commit. The scheduler keeps that state per request (a `Job`) and alone moves it through its phases:

    QUEUED ─plan()─▶ PREFILL ─apply()─▶ DENOISE ─apply(canvas done)─▶ COMMIT ─apply()─▶ DENOISE … ─▶ DONE
                                                 └─ EOS, last canvas, failure or cancel ──────────────▶ DONE

Once per engine iteration `plan()` says who is admitted, whose canvas is encoded and who steps; the engine runs
the plan and hands the outcome to `apply()`, which moves the phases and returns `Report`s (drafts, committed
canvases, finished and failed jobs) for the engine to turn into events.

Policy:
- Admission: a bounded FIFO queue. A request is admitted into a free KV-cache slot in arrival order, so no
  request is overtaken by a later one while it waits. A slot reserves `max_context` tokens of KV memory, so
  slots are the memory budget; a request whose prompt plus output cannot fit a slot is refused at submit.
  New prompts admitted in one iteration are limited to `max_prefill_tokens` (always at least one prompt),
  so a burst of long prompts cannot stall the denoising of running requests for long.
- Ordering: every live request takes one denoising step per iteration while they fit `max_batch_rows`.
  When there are more, the rows that waited longest since their last step go first and, among those, the
  ones with the fewest steps left (they free their slot soonest). A row skipped now is first next time,
  so nobody starves, and a row is never more than ceil(live / max_batch_rows) - 1 iterations behind.
- Prefill and commit are both causal encoder passes: they share one forward per iteration, and the rows
  they start join that iteration's denoising forward at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from model.config import canvas_count
from serving.request import Event, GenerateRequest


class Phase(Enum):
    QUEUED = "queued"  # waiting for a slot
    PREFILL = "prefill"  # admitted: its prompt is encoded this iteration
    DENOISE = "denoise"  # a canvas is being denoised
    COMMIT = "commit"  # its canvas is done: encoded into the cache next iteration, then the next canvas
    DONE = "done"  # finished, failed or cancelled; its slot is free


@dataclass
class Job:
    request: GenerateRequest
    canvas_length: int
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    phase: Phase = Phase.QUEUED
    slot: int | None = None
    admitted: float | None = None
    first_canvas: float | None = None
    canvas_index: int = 0
    steps_taken: int = 0  # on the current canvas
    steps_per_canvas: list[int] = field(default_factory=list)
    generated: int = 0
    last_stepped: int = -1  # scheduler iteration of the last denoising step
    cached_tokens: int = 0  # prompt tokens its prefill took from the prefix cache
    cancelled: bool = False
    automaton: object | None = None  # the request's constraint compiled for this replica's tokens, at submit

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def step_cap(self) -> int:
        return self.request.settings.max_denoising_steps

    @property
    def canvases_total(self) -> int:
        return canvas_count(self.request.max_new_tokens, self.canvas_length)

    def steps_left(self) -> int:
        """Denoising steps still to run at most (adaptive stopping may need fewer)."""
        canvases_after = self.canvases_total - self.canvas_index - 1
        return max(0, self.step_cap - self.steps_taken) + canvases_after * self.step_cap


@dataclass(frozen=True)
class Load:
    """What a replica tells the request router: work it has not done yet and room it has left."""

    outstanding_steps: int  # upper bound on denoising steps left for every live and queued request
    live_canvases: int  # canvases being denoised now
    free_slots: int
    queue_depth: int
    live_requests: int


@dataclass
class Plan:
    """One iteration: who gets a slot (and so has its prompt encoded), whose committed canvas is encoded,
    who takes a step; and the cancelled jobs released before it."""

    admit: list[Job] = field(default_factory=list)
    commit: list[Job] = field(default_factory=list)
    denoise: list[Job] = field(default_factory=list)  # includes the rows prefill/commit start in this iteration
    cancelled: list[Job] = field(default_factory=list)

    def has_work(self) -> bool:
        return bool(self.admit or self.commit or self.denoise)

    def jobs(self) -> list[Job]:
        """The plan's jobs, each once (a committed or new row is also a stepping row)."""
        return list({j.id: j for j in self.admit + self.commit + self.denoise}.values())


@dataclass
class StepOutcome:
    """One row's denoising step, as the model runner saw it."""

    done: bool  # the canvas is finished
    steps: int  # steps taken on this canvas
    draft: list[int] | None  # the argmax canvas, when drafts are streamed
    tokens: list[int] | None = None  # done: the committed canvas, cut after its first EOS
    eos: bool = False  # done: the canvas held an EOS
    logprobs: list[float] | None = None  # done, when asked for: per committed token (CanvasEvent)
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class Outcome:
    stepped: dict[str, StepOutcome] = field(default_factory=dict)
    failed: dict[str, BaseException] = field(default_factory=dict)
    # the fewest rows a forward ran out of device memory at (the runner split it and went on): the engine
    # lowers its rows per forward below that, so it does not recur
    out_of_memory_rows: int | None = None
    cached_tokens: dict[str, int] = field(default_factory=dict)  # prompt tokens restored from the prefix cache


@dataclass(frozen=True)
class Drafted:
    job: Job
    step: StepOutcome


@dataclass(frozen=True)
class Committed:
    job: Job
    step: StepOutcome


@dataclass(frozen=True)
class Finished:
    job: Job
    reason: str  # "eos", "length" or "cancelled"


@dataclass(frozen=True)
class Failed:
    job: Job
    error: BaseException


Report = Drafted | Committed | Finished | Failed


class Scheduler:
    def __init__(
        self, slots: int, max_batch_rows: int, max_queue: int, max_prefill_tokens: int, tier_queue_share: float = 1.0
    ):
        self.free = list(range(slots))[::-1]  # pop() hands out slot 0 first
        self.slots = slots
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        # Tiers sharing a pool: one tier may hold at most this share of the queue's places (a flood of quality
        # requests leaves room for fast ones), and free slots go first to the waiting tier that holds the fewest.
        self.tier_places = max(1, math.ceil(tier_queue_share * max_queue)) if max_queue else 0
        self.queue: deque[Job] = deque()
        self.live: dict[str, Job] = {}
        self.iteration = 0

    # ---------------------------------------------------------------- arrivals and cancels

    def submit(self, job: Job, limit: int | None = None) -> str | None:
        """Queue a job; None if queued, else why not ("queue_full", "tier_share", or "latency": the replica
        holds `limit` requests, live and queued)."""
        if limit is not None and len(self.live) + len(self.queue) >= limit:
            return "latency"
        if len(self.queue) >= self.max_queue:
            return "queue_full"
        if sum(j.request.tier == job.request.tier for j in self.queue) >= self.tier_places:
            return "tier_share"
        self.queue.append(job)
        return None

    def find(self, request_id: str) -> Job | None:
        return self.live.get(request_id) or next((j for j in self.queue if j.id == request_id), None)

    def cancel(self, request_id: str) -> Job | None:
        """A queued job is released at once (phase DONE); a live one is released by the next plan(), after the
        forward it may be part of. None if the id is unknown, finished or already cancelled."""
        job = self.find(request_id)
        if job is None or job.cancelled:
            return None
        job.cancelled = True
        if job.phase is Phase.QUEUED:
            self.queue.remove(job)
            job.phase = Phase.DONE
        return job

    def drain(self) -> list[Job]:
        """Release every queued and live job (the engine is stopping)."""
        jobs = [*self.queue, *self.live.values()]
        self.queue.clear()
        for job in jobs:
            self._release(job)
        return jobs

    # ---------------------------------------------------------------- one iteration

    def idle(self) -> bool:
        return not self.queue and not self.live

    def plan(self) -> Plan:
        self.iteration += 1
        plan = Plan(cancelled=[j for j in self.live.values() if j.cancelled])
        for job in plan.cancelled:
            self._release(job)
        budget = self.max_prefill_tokens
        now = time.perf_counter()
        while self.queue and self.free:
            job = self._next_admission()
            if plan.admit and len(job.request.prompt) > budget:
                break
            self.queue.remove(job)
            budget -= len(job.request.prompt)
            job.slot = self.free.pop()
            job.phase = Phase.PREFILL
            job.admitted = now
            self.live[job.id] = job
            plan.admit.append(job)
        plan.commit = [j for j in self.live.values() if j.phase is Phase.COMMIT]
        stepping = [j for j in self.live.values() if j.phase is Phase.DENOISE] + plan.admit + plan.commit
        stepping.sort(key=lambda j: (j.last_stepped, j.steps_left()))
        plan.denoise = stepping[: self.max_batch_rows]
        return plan

    def _next_admission(self) -> Job:
        """The oldest waiting job of the tier that holds the fewest live slots (FIFO within a tier; with one
        tier, plain FIFO)."""
        holding: dict[str, int] = {}
        for j in self.live.values():
            holding[j.request.tier] = holding.get(j.request.tier, 0) + 1
        return min(self.queue, key=lambda j: holding.get(j.request.tier, 0))  # min keeps the first of equals

    def apply(self, plan: Plan, outcome: Outcome) -> list[Report]:
        """Move each planned job on by what its forwards did; return what its client must be told."""
        reports: list[Report] = []
        for job in plan.jobs():
            if job.phase is Phase.DONE:
                continue
            if job.id in outcome.failed:
                self._release(job)
                reports.append(Failed(job, outcome.failed[job.id]))
                continue
            job.cached_tokens += outcome.cached_tokens.get(job.id, 0)
            if job.phase is Phase.COMMIT:  # its canvas is in the cache now: the next canvas starts
                job.canvas_index += 1
                job.steps_taken = 0
            job.phase = Phase.DENOISE
            step = outcome.stepped.get(job.id)
            if step is None:
                continue
            job.last_stepped = self.iteration
            job.steps_taken = step.steps
            if job.request.stream_drafts:
                reports.append(Drafted(job, step))
            if step.done:
                reports += self._canvas_done(job, step)
        return reports

    def _canvas_done(self, job: Job, step: StepOutcome) -> list[Report]:
        job.generated += len(step.tokens)
        job.steps_per_canvas.append(step.steps)
        if job.first_canvas is None:
            job.first_canvas = time.perf_counter()
        reports: list[Report] = [Committed(job, step)]
        if step.eos or job.canvas_index + 1 == job.canvases_total:
            self._release(job)
            reports.append(Finished(job, "eos" if step.eos else "length"))
        else:
            job.phase = Phase.COMMIT
        return reports

    def _release(self, job: Job) -> None:
        """The job is over: its slot is free for the next iteration's admissions."""
        job.phase = Phase.DONE
        if self.live.pop(job.id, None) is not None and job.slot is not None:
            self.free.append(job.slot)

    def work(self) -> list[int]:
        """Denoising steps left per request, live ones then queued ones (upper bounds: adaptive stop)."""
        return [j.steps_left() for j in self.live.values()] + [j.canvases_total * j.step_cap for j in self.queue]

    def load(self) -> Load:
        return Load(
            outstanding_steps=sum(self.work()),
            live_canvases=len(self.live),  # a live request always has exactly one canvas in flight
            free_slots=len(self.free),
            queue_depth=len(self.queue),
            live_requests=len(self.live),
        )
