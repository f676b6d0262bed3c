"""The benchmarks' own arithmetic (bench/report.py, bench/bench_serve.py): percentiles, the paired
time-to-first-canvas difference and the per-request split read from Serve's access log."""

from __future__ import annotations

from bench.bench_serve import Done, Item, paired_added_ms, replica_split
from bench.report import percentile


def test_percentile_is_a_measured_value_by_nearest_rank():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 0.5) == 3.0 and percentile(xs, 0.99) == 5.0 and percentile(xs, 0.0) == 1.0


def test_paired_difference_is_the_median_of_per_request_differences():
    base = [Done(0.0, 1.0, 2.0, 16), Done(0.0, 2.0, 3.0, 16), Done(0.0, 3.0, 4.0, 16)]
    other = [Done(0.0, 1.1, 2.1, 16), Done(0.0, 2.0, 3.0, 16), Done(0.0, 3.5, 4.5, 16)]
    assert paired_added_ms(base, other) == 100.0


def test_the_split_reads_the_last_call_of_each_request_id_from_serves_log():
    items = [Item(0.0, [2, 5], "fast", 256, seed=i) for i in range(2)]
    base = [Done(0.0, 0.5, 1.0, 256), Done(0.0, 1.5, 2.0, 256)]
    http = [Done(0.0, 0.6, 1.05, 256), Done(0.0, 1.6, 2.06, 256)]
    log = "\n".join(
        [
            "INFO bench_Pool-cpu x1 bench-0 -- CALL generate OK 400.0ms",  # the warm-up request of that id
            "INFO bench_Pool-cpu x1 bench-0 -- CALL generate OK 1020.0ms",
            "INFO bench_Pool-cpu x1 bench-1 -- CALL generate OK 2030.0ms",
        ]
    )
    split = replica_split(items, base, http, log)
    assert split == {"http_path_ms": 30.0, "replica_vs_inprocess_ms": 25.0}
