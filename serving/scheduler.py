"""Which requests run in the next forward: admission, ordering and the load a replica reports.

A request lives for many forwards: a prefill, then per canvas up to its step cap of denoising steps, then a
commit. The scheduler keeps that state per request (a `Job`) and, once per engine iteration, builds a `Plan`.

Policy (documented in README, "The batcher"):
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
import time
from collections import deque
from dataclasses import dataclass, field

from serving.request import Event, GenerateRequest


@dataclass
class Job:
    request: GenerateRequest
    canvases_total: int
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    slot: int | None = None
    admitted: float | None = None
    first_canvas: float | None = None
    phase: str = "queued"  # queued -> prefill -> denoise <-> commit -> done
    canvas_index: int = 0
    steps_taken: int = 0  # on the current canvas
    steps_per_canvas: list[int] = field(default_factory=list)
    generated: int = 0
    last_stepped: int = -1  # engine iteration of the last denoising step
    cancelled: bool = False

    @property
    def cap(self) -> int:
        return self.request.settings.max_denoising_steps

    def steps_left(self) -> int:
        """Denoising steps still to run at most (adaptive stopping may need fewer)."""
        canvases_after = self.canvases_total - self.canvas_index - 1
        return max(0, self.cap - self.steps_taken) + canvases_after * self.cap


@dataclass(frozen=True)
class Load:
    """What a replica tells the router: work it has not done yet and room it has left."""

    outstanding_steps: int  # upper bound on denoising steps left for every live and queued request
    live_canvases: int  # canvases being denoised now
    free_slots: int
    queue_depth: int
    live_requests: int


@dataclass
class Plan:
    """One iteration: who gets a slot (and so has its prompt encoded), whose committed canvas is encoded,
    who takes a step."""

    admit: list[Job]
    commit: list[Job]
    denoise: list[Job]  # includes the rows prefill/commit start in this iteration


class Scheduler:
    def __init__(self, slots: int, max_batch_rows: int, max_queue: int, max_prefill_tokens: int):
        self.free = list(range(slots))[::-1]  # pop() hands out slot 0 first
        self.slots = slots
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.queue: deque[Job] = deque()
        self.live: dict[str, Job] = {}
        self.iteration = 0

    def enqueue(self, job: Job) -> bool:
        if len(self.queue) >= self.max_queue:
            return False
        self.queue.append(job)
        return True

    def idle(self) -> bool:
        return not self.queue and not self.live

    def plan(self) -> Plan:
        self.iteration += 1
        admit: list[Job] = []
        budget = self.max_prefill_tokens
        while self.queue and self.free:
            job = self.queue[0]
            if admit and len(job.request.prompt) > budget:
                break
            self.queue.popleft()
            budget -= len(job.request.prompt)
            job.slot = self.free.pop()
            job.phase = "prefill"
            self.live[job.request.request_id] = job
            admit.append(job)
        commit = [j for j in self.live.values() if j.phase == "commit"]
        stepping = [j for j in self.live.values() if j.phase == "denoise"] + admit + commit
        stepping.sort(key=lambda j: (j.last_stepped, j.steps_left()))
        return Plan(admit, commit, stepping[: self.max_batch_rows])

    def release(self, job: Job) -> None:
        """The job is over: its slot is free for the next iteration's admissions."""
        job.phase = "done"
        if self.live.pop(job.request.request_id, None) is not None and job.slot is not None:
            self.free.append(job.slot)

    def load(self) -> Load:
        live = list(self.live.values())
        queued = sum(j.canvases_total * j.cap for j in self.queue)
        return Load(
            outstanding_steps=sum(j.steps_left() for j in live) + queued,
            live_canvases=len(live),  # a live request always has exactly one canvas in flight
            free_slots=len(self.free),
            queue_depth=len(self.queue),
            live_requests=len(live),
        )
