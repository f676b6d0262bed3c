"""The model runner: carries out one plan on the denoiser, on the engine's worker thread.

One plan is at most two forwards: a causal one that encodes new prompts and committed canvases together, and
one denoising step for every stepping row, whatever step or canvas each is at and whatever its settings.

Failure isolation: if a batched forward raises, its rows are retried one at a time and only the rows that
fail alone are reported failed (a step changes no state until it has succeeded, and an encode is idempotent
until the cache length moves), so one bad request cannot take the others down. A forward that runs out of
device memory is split in halves instead, recursively, so every row still runs (a single row that does not fit
fails alone); the outcome says at how many rows it ran out, and the engine takes fewer rows per forward from
then on.

Row buckets: with `row_buckets`, every denoising forward is padded up to the next listed row count with a
scratch slot (the denoiser's last, then not given to requests), so one compiled graph per bucket is reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from model.config import SamplerSettings
from model.denoiser import Denoiser
from serving.replica.scheduler import Job, Outcome, Phase, Plan, StepOutcome

# The scratch slot only pads row buckets: one step per canvas, no adaptive stop.
_SCRATCH_SETTINGS = SamplerSettings(max_denoising_steps=1, confidence_threshold=None)

R = TypeVar("R")


class ModelRunner:
    def __init__(self, denoiser: Denoiser, row_buckets: tuple[int, ...] | None = None):
        self.denoiser = denoiser
        self.slots = denoiser.cache.slots  # the slots requests may have
        self.scratch: int | None = None
        self.row_buckets: tuple[int, ...] = ()
        if row_buckets:
            self.slots -= 1
            if self.slots < 1:
                raise ValueError("row buckets need a denoiser with at least two slots (one is the scratch slot)")
            self.scratch = self.slots
            self.row_buckets = tuple(sorted(row_buckets))
        self.forwards = 0

    @torch.inference_mode()
    def prepare(self) -> None:
        """Give the scratch slot a one-token context and a canvas, so it can pad any denoising forward."""
        if self.scratch is None:
            return
        d = self.denoiser
        d.admit(self.scratch, _SCRATCH_SETTINGS, 0)
        d.encode([self.scratch], [[d.config.pad_token_id]], [])
        d.start_canvas([self.scratch])

    @torch.inference_mode()
    def run(self, plan: Plan) -> Outcome:
        d = self.denoiser
        out = Outcome()
        for job in plan.admit:
            try:
                r = job.request
                room = job.canvases_total * d.canvas_length
                d.admit(job.slot, r.settings, r.seed, r.logprobs, r.template, job.automaton, room)
            except Exception as exc:
                out.failed[job.id] = exc
        encode = [j for j in plan.admit + plan.commit if j.id not in out.failed]
        results = self._isolated(encode, self._encode, out)
        encoded = [job for job, cached in zip(encode, results) if cached is not None]
        out.cached_tokens = {job.id: cached for job, cached in zip(encode, results) if cached}
        if encoded:
            d.start_canvas([j.slot for j in encoded])
        rows = [j for j in plan.denoise if j.id not in out.failed]
        for job, step in zip(rows, self._isolated(rows, self._step, out)):
            if step is not None:
                out.stepped[job.id] = step
        if self.scratch is not None:
            d.start_canvas([self.scratch])  # keep the scratch row's state bounded
        return out

    def _encode(self, jobs: list[Job]) -> list[int]:
        """Per job, the prompt tokens taken from the prefix cache (0 for a commit)."""
        prefill = [j for j in jobs if j.phase is Phase.PREFILL]
        commit = [j for j in jobs if j.phase is Phase.COMMIT]
        prompts = [j.request.prompt for j in prefill]
        cached = self.denoiser.encode([j.slot for j in prefill], prompts, [j.slot for j in commit])
        self.forwards += 1
        by_id = dict(zip((j.id for j in prefill), cached))
        return [by_id.get(j.id, 0) for j in jobs]

    def _step(self, jobs: list[Job]) -> list[StepOutcome]:
        slots = [j.slot for j in jobs]
        pad = self._bucket(len(slots)) - len(slots)
        result = self.denoiser.step(slots + [self.scratch] * pad)
        self.forwards += 1
        outs = []
        for i, job in enumerate(jobs):
            done = result.done[i]
            canvas = result.argmax[i].tolist() if done or job.request.stream_drafts else None
            step = StepOutcome(done, result.steps[i], canvas if job.request.stream_drafts else None)
            if done:
                step.tokens, step.eos = self.denoiser.cut_at_eos(canvas)
                k = job.request.logprobs
                if k is not None and result.logprobs is not None:
                    n, lp = len(step.tokens), result.logprobs
                    step.logprobs = lp.chosen[i, :n].tolist()
                    ids, values = lp.top_ids[i, :n, :k].tolist(), lp.top[i, :n, :k].tolist()
                    step.top_logprobs = [list(zip(a, b)) for a, b in zip(ids, values)]
            outs.append(step)
        return outs

    def _isolated(self, jobs: list[Job], fn: Callable[[list[Job]], list[R]], out: Outcome) -> list[R | None]:
        """fn(jobs) for all rows; if that raises, fn([job]) for each row alone, recording the failures in
        `out`. Returns the rows' results, None for the failed ones."""
        if not jobs:
            return []
        try:
            return fn(jobs)
        except torch.OutOfMemoryError as oom:
            if len(jobs) == 1:
                out.failed[jobs[0].id] = oom
                return [None]
            out.out_of_memory_rows = min(len(jobs), out.out_of_memory_rows or len(jobs))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what the failed forward held goes back before the halves run
            half = len(jobs) // 2
            return self._isolated(jobs[:half], fn, out) + self._isolated(jobs[half:], fn, out)
        except Exception as batch_exc:
            if len(jobs) == 1:
                out.failed[jobs[0].id] = batch_exc
                return [None]
        results: list[R | None] = []
        for job in jobs:
            try:
                results.append(fn([job])[0])
            except Exception as exc:
                out.failed[job.id] = exc
                results.append(None)
        return results

    def _bucket(self, rows: int) -> int:
        return next((b for b in self.row_buckets if b >= rows), rows)
