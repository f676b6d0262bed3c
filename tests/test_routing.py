"""The step-aware replica ranking (serving/routing.py), on its own: no cluster needed for a sort."""

from __future__ import annotations

from serving.routing import Standing, rank, request_steps


def test_request_steps_is_canvases_times_the_step_cap():
    payload = {"max_new_tokens": 40, "settings": {"max_denoising_steps": 8}}
    assert request_steps(payload, canvas_length=16) == 3 * 8


def test_free_slots_first_then_least_outstanding_work():
    standings = {
        "full_idle": Standing(outstanding_steps=0, free_slots=0, queue_depth=3),
        "busy": Standing(outstanding_steps=900, free_slots=2, queue_depth=0),
        "light": Standing(outstanding_steps=40, free_slots=1, queue_depth=0),
    }
    assert rank(standings) == [["light"], ["busy"], ["full_idle"]]


def test_ties_go_to_the_shorter_queue():
    standings = {"a": Standing(100, 0, 5), "b": Standing(100, 0, 1)}
    assert rank(standings) == [["b"], ["a"]]
