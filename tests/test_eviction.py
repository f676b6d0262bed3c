"""A GPU worker's eviction, on a local three-node Ray cluster (loadtest/drills/eviction.py): the preStop hook's drain
(deploy/node_drain.py) moves the pool replica to the other worker node while clients keep several streams and
unary requests in flight, then the drained node is killed; every request is answered."""

from __future__ import annotations

import pytest

from loadtest.drills import eviction

pytestmark = pytest.mark.slow  # a three-node cluster, a replica moved: about a minute


def test_a_drained_node_hands_its_replica_over_without_losing_a_request():
    result = eviction.main(["--workers", "6", "--before-s", "3", "--after-s", "5", "--deadline-s", "90"])
    windows = [result["before"], result["during"], result["after"]]
    outcomes = {outcome.split(" ", 1)[1] for window in windows for outcome in window}
    assert outcomes == {"answered"}, result
    # clients were busy throughout: six requests in flight on the one pool replica when the drain began
    assert all(sum(window.values()) > 0 for window in windows), result
    assert result["drain"]["drained"] and result["drain"]["serve_actors_left"] == [], result
    assert result["drain"]["node_id"] == result["drained_node"] == result["replica_nodes_before"][0]
    assert len(result["replica_nodes_after"]) == 1 and result["drained_node"] not in result["replica_nodes_after"]
