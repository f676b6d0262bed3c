"""Stop strings on committed text: the answer ends before the first one, the rest is discarded.

A canvas's text arrives whole, but a stop string may straddle two canvases, so the text that could still grow
into one (the longest end of it that starts some stop string) is held back until the next canvas decides it;
what is left when the answer ends is released then. Used by the front end for every protocol.
"""

from __future__ import annotations

MAX_STOPS = 16  # OpenAI allows 4; vLLM any number: enough for every client seen, and bounded
MAX_STOP_CHARS = 256


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that may go out now, whether a stop string was found): with a stop, the text before it;
        otherwise all but what is held back."""
        pending = self.held + text
        found = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return pending[: min(found)], True
        keep = max((n for s in self.stops for n in range(1, len(s)) if pending.endswith(s[:n])), default=0)
        self.held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def release(self) -> str:
        """At the end of the answer: what was held back."""
        held, self.held = self.held, ""
        return held


def check_stops(stop: str | list[str] | None) -> list[str]:
    """A request's `stop` as a list (ValueError naming the problem where it is not a usable one)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"each stop string must hold 1 to {MAX_STOP_CHARS} characters")
    return stops
