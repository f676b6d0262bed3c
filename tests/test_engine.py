"""The step-level batcher (serving/replica/engine.py) on a tiny random checkpoint, in a real asyncio loop.

The reference for every output is the denoiser's own `generate` on the request alone: a request's tokens
with a fixed seed must not depend on what it was batched with, when it joined, or who was cancelled.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from model.config import SamplerSettings
from model.denoiser import Denoiser, Request
from model.weights import load_network
from serving.replica.engine import Engine
from serving.request import CanvasEvent, DraftEvent, ErrorEvent, FinalEvent, GenerateRequest, InvalidRequest, Overloaded

CONTEXT = 64


@pytest.fixture(scope="module")
def net(window):
    return load_network(str(window.path))[0]


def requests(net) -> list[GenerateRequest]:
    """Different prompts, lengths, step caps and sampler settings (adaptive stop on for some)."""
    C = net.config.canvas_length
    return [
        GenerateRequest([2, 5, 6, 7, 8, 9], 3 * C, SamplerSettings(max_denoising_steps=4), seed=42),
        GenerateRequest([2, 3], 2 * C, SamplerSettings(max_denoising_steps=2), seed=1),
        GenerateRequest([2, 7, 7, 7], 4 * C, SamplerSettings(max_denoising_steps=6, t_max=1.2, entropy_bound=0.5), 2),
        GenerateRequest(
            [2, 9], C, SamplerSettings(max_denoising_steps=5, stability_threshold=0, confidence_threshold=9.0), 3
        ),
        GenerateRequest([2, 11, 12, 13], 2 * C, SamplerSettings(max_denoising_steps=3, confidence_threshold=None), 4),
    ]


def alone(net, r: GenerateRequest):
    d = Denoiser(net, slots=1, max_context=CONTEXT, eos_token_ids=())
    return d.generate([Request(r.prompt, r.max_new_tokens, r.settings, r.seed)])[0]


def make_engine(net, slots=4, registry=None, **kw) -> Engine:
    d = Denoiser(net, slots=slots, max_context=CONTEXT, eos_token_ids=())
    return Engine(d, registry=registry or CollectorRegistry(), **kw)


async def collect(stream) -> tuple[list[int], list, FinalEvent | ErrorEvent]:
    tokens, events = [], []
    async for e in stream:
        events.append(e)
        if isinstance(e, CanvasEvent):
            tokens += e.tokens
    return tokens, events, events[-1]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def test_outputs_match_running_alone_whether_batched_or_joining_mid_flight(net):
    reqs = requests(net)
    expected = [alone(net, r) for r in reqs]

    registry = CollectorRegistry()

    async def main():
        engine = make_engine(net, slots=3, registry=registry)  # five requests, three slots: two join mid-flight
        engine.start()
        first = [engine.submit(r) for r in reqs[:3]]
        while engine.iterations < 2:  # the first three are already stepping when the rest arrive
            await asyncio.sleep(0.001)
        late = [engine.submit(r) for r in reqs[3:]]
        results = await asyncio.gather(*(collect(s) for s in first + late))
        await engine.stop()
        return engine, results

    engine, results = run(main())
    for r, exp, (tokens, _, final) in zip(reqs, expected, results):
        assert isinstance(final, FinalEvent)
        assert tokens == exp.tokens
        assert final.usage.steps_per_canvas == exp.steps
        assert final.finish_reason == exp.finish_reason
        assert final.usage.prompt_tokens == len(r.prompt)
        assert final.usage.generated_tokens == len(exp.tokens)
        assert final.usage.canvases == len(exp.steps)
        assert final.usage.time_to_first_canvas_s <= final.usage.total_time_s
    assert expected[3].steps == [1]  # the adaptive stop fired: that row left the batch early
    assert engine.load().free_slots == 3
    # Rows at different steps shared forwards: fewer forwards than running the requests one by one.
    one_by_one = sum(len(e.steps) + sum(e.steps) for e in expected)
    assert engine.forwards < one_by_one
    # The metrics saw every canvas, every row-step and every request.
    metric = lambda name, **labels: registry.get_sample_value(name, {"engine": "default", **labels})
    steps = [s for e in expected for s in e.steps]
    assert metric("dgs_steps_per_canvas_count") == len(steps)
    assert metric("dgs_steps_per_canvas_sum") == sum(steps)
    assert metric("dgs_batch_rows_sum") == sum(steps)  # each denoising row-step is one row of one forward
    assert metric("dgs_batch_rows_count") < sum(steps)
    assert metric("dgs_queue_time_seconds_count") == len(reqs)
    assert metric("dgs_time_to_first_canvas_seconds_count") == len(reqs)
    assert metric("dgs_requests_total", outcome="length") == len(reqs)
    assert metric("dgs_queue_depth") == 0 and metric("dgs_batch_occupancy") == 0
    assert 0 < metric("dgs_busy_seconds_total") == engine.busy_s  # every iteration's forwards counted


def test_drafts_stream_every_step_and_end_in_the_committed_canvas(net):
    r = requests(net)[0]
    r.stream_drafts = True
    exp = alone(net, r)

    async def main():
        engine = make_engine(net)
        engine.start()
        out = await collect(engine.submit(r))
        await engine.stop()
        return out

    tokens, events, final = run(main())
    drafts = [e for e in events if isinstance(e, DraftEvent)]
    assert len(drafts) == sum(exp.steps)
    assert [d.step for d in drafts if d.canvas_index == 0] == list(range(1, exp.steps[0] + 1))
    canvases = [e for e in events if isinstance(e, CanvasEvent)]
    last_drafts = [max((d for d in drafts if d.canvas_index == c.index), key=lambda d: d.step) for c in canvases]
    assert [d.tokens for d in last_drafts] == [c.tokens for c in canvases]
    assert tokens == exp.tokens and isinstance(final, FinalEvent)


def test_cancelling_one_request_frees_its_slot_and_leaves_the_others_unchanged(net):
    reqs = requests(net)
    victim = GenerateRequest([2, 4, 4], 8 * net.config.canvas_length, SamplerSettings(max_denoising_steps=6), seed=9)
    expected = [alone(net, r) for r in reqs[:3]]

    async def main():
        engine = make_engine(net, slots=4)
        engine.start()
        streams = [engine.submit(r) for r in reqs[:2]]
        v = engine.submit(victim)
        streams.append(engine.submit(reqs[2]))
        async for e in v:  # cancel once the victim has committed its first canvas
            if isinstance(e, CanvasEvent):
                assert engine.cancel(victim.request_id)
                break
        v_rest = [e async for e in v]
        results = await asyncio.gather(*(collect(s) for s in streams))
        load = engine.load()
        await engine.stop()
        return v_rest, results, load

    v_rest, results, load = run(main())
    assert isinstance(v_rest[-1], FinalEvent) and v_rest[-1].finish_reason == "cancelled"
    assert v_rest[-1].usage.canvases < 8
    for exp, (tokens, _, final) in zip(expected, results):
        assert tokens == exp.tokens and final.finish_reason == "length"
    assert load.free_slots == 4 and load.live_requests == 0


def test_leaving_the_stream_early_cancels_the_request(net):
    long = GenerateRequest([2, 4], 8 * net.config.canvas_length, SamplerSettings(max_denoising_steps=6), seed=5)

    async def main():
        engine = make_engine(net, slots=2)
        engine.start()
        async with engine.submit(long) as stream:
            async for e in stream:
                if isinstance(e, CanvasEvent):
                    break
        for _ in range(100):  # the slot is freed at the next iteration
            if engine.load().free_slots == 2:
                break
            await asyncio.sleep(0.01)
        load = engine.load()
        await engine.stop()
        return load

    load = run(main())
    assert load.free_slots == 2 and load.outstanding_steps == 0


class FaultyDenoiser(Denoiser):
    """Raises whenever a poisoned slot is in a denoising batch (stands in for a bad row on a device)."""

    poisoned: set[int] = set()

    def step(self, slots):
        if self.poisoned & set(slots):
            raise RuntimeError("poisoned row")
        return super().step(slots)


def test_an_exception_in_one_request_fails_only_that_request(net):
    reqs = requests(net)[:3]
    expected = [alone(net, r) for r in reqs]

    async def main():
        d = FaultyDenoiser(net, slots=4, max_context=CONTEXT, eos_token_ids=())
        d.poisoned = {1}  # the second admitted request gets slot 1
        engine = Engine(d, registry=CollectorRegistry())
        engine.start()
        streams = [engine.submit(r) for r in reqs]
        results = await asyncio.gather(*(collect(s) for s in streams))
        d.poisoned = set()
        after = await collect(engine.submit(reqs[1]))  # the loop is still alive and serves the next request
        await engine.stop()
        return results, after

    results, after = run(main())
    assert isinstance(results[1][2], ErrorEvent) and "poisoned row" in results[1][2].message
    for i in (0, 2):
        assert results[i][0] == expected[i].tokens and isinstance(results[i][2], FinalEvent)
    assert after[0] == expected[1].tokens


class SmallDevice(Denoiser):
    """A device with room for at most `fits` rows in one denoising forward: more raise out of memory, as a GPU's
    caching allocator does."""

    fits = 2
    largest: list[int] = []

    def step(self, slots):
        if len(slots) > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {len(slots)} rows)")
        self.largest.append(len(slots))
        return super().step(slots)


def test_out_of_memory_splits_the_batch_and_lowers_rows_per_forward(net):
    """Every request still finishes with its own tokens; the engine takes at most half the failing rows after."""
    reqs = requests(net)[:4]
    expected = [alone(net, r) for r in reqs]
    registry = CollectorRegistry()

    async def main():
        d = SmallDevice(net, slots=4, max_context=CONTEXT, eos_token_ids=())
        d.largest = []
        engine = Engine(d, registry=registry)
        engine.start()
        results = await asyncio.gather(*(collect(engine.submit(r)) for r in reqs))
        rows_after = engine.scheduler.max_batch_rows
        await engine.stop()
        return results, rows_after, d.largest

    results, rows_after, largest = run(main())
    for got, want in zip(results, expected):
        assert isinstance(got[2], FinalEvent) and got[0] == want.tokens
    assert rows_after == 2 and max(largest) <= 2
    assert registry.get_sample_value("dgs_out_of_memory_total", {"engine": "default"}) == 1


def test_requests_that_cannot_fit_are_refused_and_a_full_queue_overloads(net):
    C = net.config.canvas_length

    async def main():
        engine = make_engine(net, slots=1, max_queue=2)
        with pytest.raises(InvalidRequest, match="max_new_tokens") as too_long:
            engine.submit(GenerateRequest([2] * 50, 4 * C))
        assert too_long.value.field == "max_new_tokens"
        with pytest.raises(InvalidRequest, match="prompt"):
            engine.submit(GenerateRequest([], C))
        with pytest.raises(InvalidRequest, match="prompt"):
            engine.submit(GenerateRequest([2, net.config.vocab_size], C))
        with pytest.raises(InvalidRequest, match="stability_threshold"):
            engine.submit(GenerateRequest([2], C, SamplerSettings(stability_threshold=99)))
        # Not started: nothing leaves the queue, so the third request overloads it.
        a = engine.submit(GenerateRequest([2, 3], C, SamplerSettings(max_denoising_steps=2), seed=1))
        engine.submit(GenerateRequest([2, 3], 2 * C, SamplerSettings(max_denoising_steps=3), seed=2))
        with pytest.raises(Overloaded) as over:
            engine.submit(GenerateRequest([2, 3], C))
        assert over.value.retry_after_s > 0
        load = engine.load()
        assert (load.queue_depth, load.outstanding_steps, load.free_slots) == (2, 2 + 2 * 3, 1)
        engine.start()
        tokens, _, final = await collect(a)
        await engine.stop()
        return tokens, final

    tokens, final = run(main())
    assert isinstance(final, FinalEvent) and len(tokens) == C


class RecordingDenoiser(Denoiser):
    """Records the slots of every denoising forward it runs."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.stepped: list[list[int]] = []

    def step(self, slots):
        self.stepped.append(list(slots))
        return super().step(slots)


def all_at_once(net, reqs: list[GenerateRequest], slots: int, **engine_kw) -> tuple[list[list[int]], list[list[int]]]:
    """Every request submitted at once: their tokens, and the slots of each denoising forward."""
    d = RecordingDenoiser(net, slots=slots, max_context=CONTEXT, eos_token_ids=())

    async def main():
        engine = Engine(d, registry=CollectorRegistry(), **engine_kw)
        engine.start()
        results = await asyncio.gather(*(collect(engine.submit(r)) for r in reqs))
        await engine.stop()
        return [tokens for tokens, _, _ in results]

    return run(main()), d.stepped


def test_row_buckets_pad_with_a_scratch_slot_and_change_nothing(net):
    reqs = requests(net)[:3]
    tokens, stepped = all_at_once(net, reqs, slots=5, row_buckets=(2, 4))
    assert tokens == [alone(net, r).tokens for r in reqs]
    assert {len(s) for s in stepped} <= {2, 4}  # every forward padded up to a bucket
    scratch = 4  # the denoiser's last slot, never given to a request
    assert sorted(stepped[0]) == [0, 1, 2, scratch]  # three rows padded to 4 with the scratch slot
    assert all(scratch not in s[: len(s) - s.count(scratch)] for s in stepped)  # requests never get it
    assert any(s.count(scratch) == 1 and len(s) == 2 for s in stepped)  # one row left: padded to 2


def test_more_live_requests_than_batch_rows_all_finish_in_turn(net):
    reqs = requests(net)
    tokens, stepped = all_at_once(net, reqs, slots=5, max_batch_rows=2)
    assert tokens == [alone(net, r).tokens for r in reqs]
    assert max(len(s) for s in stepped) == 2  # five live requests, never more than two rows in a forward
    assert len({slot for s in stepped[:3] for slot in s}) == 5  # rotation: all five stepped within 3 forwards


def test_health_check_fails_when_the_loop_is_stuck_or_dead(net):
    async def main():
        engine = make_engine(net, stuck_after_s=0.2)
        with pytest.raises(RuntimeError, match="never started"):
            engine.check_health()
        engine.start()
        engine.check_health()
        step = engine.denoiser.step

        def slow_step(slots):  # one iteration that hangs well past stuck_after_s
            time.sleep(0.6)
            return step(slots)

        engine.denoiser.step = slow_step
        stream = engine.submit(requests(net)[1])
        await asyncio.sleep(0.4)
        with pytest.raises(RuntimeError, match="has run for over"):
            engine.check_health()
        engine.denoiser.step = step
        await collect(stream)
        engine.check_health()  # healthy again once the iteration ends
        engine._task.cancel()  # the loop dies
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="dead"):
            engine.check_health()
        await engine.stop()

    asyncio.run(main())


def test_a_flood_of_one_tier_leaves_queue_places_and_slots_to_the_others(net):
    """Tiers sharing a pool: quality may hold at most half the queue, and a freed slot goes to the waiting tier
    holding the fewest, so fast requests submitted behind a quality flood finish before most of it."""
    C = net.config.canvas_length
    slow = SamplerSettings(max_denoising_steps=12, confidence_threshold=None)
    quick = SamplerSettings(max_denoising_steps=1, confidence_threshold=None)

    async def main():
        engine = make_engine(net, slots=2, max_queue=8, tier_queue_share=0.5)
        quality, refused = [], 0  # submitted before the loop starts: everything waits in the queue first
        for i in range(10):
            try:
                quality.append(engine.submit(GenerateRequest([2, 5 + i], 2 * C, slow, seed=i, tier="quality")))
            except Overloaded as exc:
                refused += 1
                assert "holds its share of the queue" in str(exc)
        fast = [engine.submit(GenerateRequest([2, 9], C, quick, seed=i, tier="fast")) for i in range(3)]
        engine.start()
        done_at: dict[str, float] = {}

        async def finish(name: str, stream) -> None:
            _, _, final = await collect(stream)
            assert isinstance(final, FinalEvent)
            done_at[name] = time.perf_counter()

        await asyncio.gather(
            *(finish(f"q{i}", s) for i, s in enumerate(quality)), *(finish(f"f{i}", s) for i, s in enumerate(fast))
        )
        await engine.stop()
        return refused, len(quality), done_at

    refused, accepted, done_at = run(main())
    assert accepted == 4 and refused == 6  # 8 places, 4 of them quality's
    last_fast = max(t for k, t in done_at.items() if k.startswith("f"))
    assert sum(t > last_fast for k, t in done_at.items() if k.startswith("q")) >= 2  # fast did not wait behind them


def test_a_second_request_under_a_live_id_is_refused(net):
    """Ids name jobs in the engine (a cancel finds its job by id): a duplicate would be taken for the first."""
    C = net.config.canvas_length

    async def main():
        engine = make_engine(net, slots=1, max_queue=2)
        first = engine.submit(GenerateRequest([2, 5], C, request_id="same"))
        with pytest.raises(InvalidRequest, match="already in flight") as twice:
            engine.submit(GenerateRequest([2, 6], C, request_id="same"))
        engine.start()
        _, _, final = await collect(first)
        again = await collect(engine.submit(GenerateRequest([2, 6], C, request_id="same")))  # free again
        await engine.stop()
        return twice.value, final, again[2]

    twice, final, again = run(main())
    assert twice.field == "request_id"
    assert isinstance(final, FinalEvent) and isinstance(again, FinalEvent)


def test_the_latency_bound_follows_the_cost_of_a_row():
    from serving.replica.latency_bound import LatencyBound

    cpu = LatencyBound(max_slowdown=2.0, slots=32)
    assert cpu.limit() == 32  # nothing measured yet
    cpu.observe(4, 0.05)
    assert cpu.limit() == 32  # one row count: no slope yet
    for rows in (1, 2, 4, 8):
        for _ in range(50):
            cpu.observe(rows, 0.01 + 0.01 * rows)  # a forward costs in proportion to its rows
    assert cpu.limit() == 3  # t(3) = 0.04 = 2 * t(1)
    gpu = LatencyBound(max_slowdown=2.0, slots=32)
    for rows in (1, 4, 16, 32):
        gpu.observe(rows, 0.015 + 0.0001 * rows)  # a forward reads the weights once, whatever its rows
    assert gpu.limit() == 32
    tight = LatencyBound(max_slowdown=1.01, slots=32)
    for rows in (1, 2):
        tight.observe(rows, rows * 1.0)
    assert tight.limit() == 1  # never below one request


def test_a_replica_at_its_latency_bound_refuses_with_a_retry_hint_and_routers_see_no_room(net):
    C = net.config.canvas_length

    async def main():
        engine = make_engine(net, slots=4, max_queue=8, max_slowdown=2.0)
        for rows in (1, 2, 3, 4):  # as if measured: each row costs as much as a lone forward
            for _ in range(50):
                engine.latency_bound.observe(rows, 0.01 * rows)
        assert engine.latency_bound.limit() == 2
        held = [
            engine.submit(GenerateRequest([2, 3], C, SamplerSettings(max_denoising_steps=2), seed=i)) for i in (1, 2)
        ]
        assert engine.load().free_slots == 0  # the cap leaves no room, though two slots are free
        with pytest.raises(Overloaded, match="latency bound") as over:
            engine.submit(GenerateRequest([2, 3], C))
        assert over.value.retry_after_s >= 1
        engine.start()
        finals = [(await collect(s))[2] for s in held]
        after = engine.submit(GenerateRequest([2, 3], C, SamplerSettings(max_denoising_steps=2), seed=3))
        last = (await collect(after))[2]
        await engine.stop()
        return finals, last

    finals, last = run(main())
    assert all(isinstance(f, FinalEvent) for f in finals) and isinstance(last, FinalEvent)
