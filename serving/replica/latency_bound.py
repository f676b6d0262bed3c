"""How many requests a replica may hold so that none runs more than `max_slowdown` times slower than it would
alone: the pool option that bounds admitted requests' latency under overload, by refusing (429) instead of
batching ever more rows.

A request's time is its denoising steps times the iteration time of the batches it rides in. The engine records
every iteration's wall time by its row count (a moving average per count) and fits t(rows) = a + b * rows; a
request alone takes steps * t(1), among B rows steps * t(B), so the bound is the largest B with
t(B) <= max_slowdown * t(1). On a GPU, where a forward costs about the same for 1 row as for 32 (it reads the
weights once), b is near zero and the bound is every slot; on a CPU, where a forward costs in proportion to its
rows, it is a few. Until two row counts have been seen the bound is every slot.
"""

from __future__ import annotations

import math

EMA = 0.1  # weight of the newest iteration in its row count's average


class LatencyBound:
    def __init__(self, max_slowdown: float, slots: int):
        self.max_slowdown = max_slowdown
        self.slots = slots
        self.by_rows: dict[int, float] = {}  # rows -> moving average of one iteration's seconds

    def observe(self, rows: int, seconds: float) -> None:
        if rows < 1:
            return
        last = self.by_rows.get(rows)
        self.by_rows[rows] = seconds if last is None else last + EMA * (seconds - last)

    def fit(self) -> tuple[float, float] | None:
        """(a, b) of t(rows) = a + b * rows, least squares over the row counts seen; None with fewer than two."""
        if len(self.by_rows) < 2:
            return None
        xs, ys = list(self.by_rows), list(self.by_rows.values())
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        return my - b * mx, b

    def limit(self) -> int:
        """Requests (live and queued) the replica may hold now: between 1 and every slot."""
        fitted = self.fit()
        if fitted is None:
            return self.slots
        a, b = fitted
        one = a + b
        if b <= 0 or one <= 0:
            return self.slots
        return max(1, min(self.slots, math.floor((self.max_slowdown * one - a) / b)))
