"""The step-aware replica ranking (serving/routing.py), on its own: no cluster needed for a sort."""

from __future__ import annotations

from model.config import SamplerSettings
from serving.request import GenerateRequest
from serving.routing import Standing, horizon_cost, rank, request_steps


def test_request_steps_is_canvases_times_the_step_cap():
    request = GenerateRequest([2, 5], 40, SamplerSettings(max_denoising_steps=8))
    assert request_steps(request, canvas_length=16) == 3 * 8


def test_horizon_cost_counts_the_row_steps_a_request_would_share():
    assert horizon_cost((60, 2, 2), steps=2) == 6  # a short request sees the rows running now
    assert horizon_cost((60, 2, 2), steps=32) == 36  # a long one sees the work ahead
    assert horizon_cost((), steps=8) == 0


def test_short_requests_go_where_fewer_rows_run():
    standings = {
        "one_long": Standing(work=(60,), free_slots=4, queue_depth=0),
        "three_short": Standing(work=(2, 2, 2), free_slots=2, queue_depth=0),
    }
    assert rank(standings, steps=2) == [["one_long"], ["three_short"]]  # 2 shared row-steps against 6


def test_long_requests_go_where_less_work_lies_ahead():
    standings = {
        "one_long": Standing(work=(60,), free_slots=4, queue_depth=0),
        "three_short": Standing(work=(2, 2, 2), free_slots=2, queue_depth=0),
    }
    assert rank(standings, steps=32) == [["three_short"], ["one_long"]]  # 6 shared row-steps against 32


def test_free_slots_first_then_least_shared_work():
    standings = {
        "full_idle": Standing(work=(), free_slots=0, queue_depth=3),
        "busy": Standing(work=(900,), free_slots=2, queue_depth=0),
        "light": Standing(work=(40,), free_slots=1, queue_depth=0),
    }
    assert rank(standings, steps=64) == [["light"], ["busy"], ["full_idle"]]


def test_ties_go_to_the_shorter_queue():
    standings = {"a": Standing((100,), 0, 5), "b": Standing((100,), 0, 1)}
    assert rank(standings, steps=8) == [["b"], ["a"]]


def test_the_replica_holding_the_prompts_start_goes_first_when_loads_are_close():
    from model.prefix_keys import block_keys

    prompt = list(range(2, 2 + 3 * 64 + 10))  # three whole blocks of 64
    keys = block_keys(prompt, 64)
    held_two = frozenset(keys[:2])
    standings = {
        "idle": Standing(work=(), free_slots=4, queue_depth=0),
        "holder": Standing(work=(4,), free_slots=3, queue_depth=0, prefix=held_two),
        "partial": Standing(work=(2,), free_slots=3, queue_depth=0, prefix=frozenset(keys[:1])),
    }
    # 8 steps: the holder's 4 shared row-steps are within one request of the idle replica's 0
    assert rank(standings, steps=8, keys=keys) == [["holder"], ["partial"], ["idle"]]
    assert rank(standings, steps=8) == [["idle"], ["partial"], ["holder"]]  # by load alone
    # a chain is held from its first block: the later blocks alone are no match
    assert Standing((), 1, 0, prefix=frozenset(keys[1:])).held(keys) == 0
    # far busier than the best (beyond the request's own steps): load wins over the prefix
    standings["holder"] = Standing(work=(40, 40), free_slots=3, queue_depth=0, prefix=held_two)
    assert rank(standings, steps=8, keys=keys)[0] == ["partial"]
    # a full replica never goes before one with a free slot, prefix or not
    standings["holder"] = Standing(work=(), free_slots=0, queue_depth=0, prefix=frozenset(keys))
    assert rank(standings, steps=8, keys=keys)[-1] == ["holder"]
