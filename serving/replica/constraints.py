"""A replica's constraints: each request's regular expression compiled once over the checkpoint's own tokens.

The ingress sends a constraint as text (serving/request.py: Constraint); the automaton over token ids depends on
the vocabulary, so it is built here, off the event loop the first time (`prepare`), and kept on the replica's
device for the next requests that bring the same expression (`compiled`). A constraint that cannot be served is
refused at submit with the request field it came from: a regex that does not parse, an automaton past its size
bound, or a language no answer of the request's room can be written in.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import torch

from model.automaton import AutomatonError, TokenAutomaton, TokenVocabulary, compile_regex
from model.constraint import canvas_ends
from serving.request import Constraint, InvalidRequest, placeholder

KEPT = 64  # compiled automata kept on the device, the most recently used
COMPILE_WAIT_S = 20.0  # a request waits this long for its constraint to compile, then is refused as too complex


class Constraints:
    def __init__(
        self, vocabulary: TokenVocabulary | None, eos_ids: tuple[int, ...], vocab_size: int, device: torch.device
    ):
        self.vocabulary = vocabulary
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.device = device
        self._kept: OrderedDict[str, TokenAutomaton] = OrderedDict()
        self._one_at_a_time = asyncio.Semaphore(1)  # compiles take a core each: never all of them

    def _specials(self, constraint: Constraint) -> tuple[tuple[int, str], ...]:
        """The constraint's special tokens as (id, placeholder) pairs."""
        ids = dict(self.vocabulary.special_ids)
        missing = [s for s in constraint.specials if s not in ids]
        if missing:
            raise InvalidRequest(constraint.field, f"this checkpoint has no {missing[0]!r} token")
        return tuple((ids[s], placeholder(k)) for k, s in enumerate(constraint.specials))

    async def prepare(self, constraint: Constraint) -> None:
        """Compile in a worker thread (a large schema over a large vocabulary takes a moment), so the event
        loop keeps serving meanwhile; refusals raise as `compiled` would. A compile that outlasts
        COMPILE_WAIT_S refuses its request (the compile finishes in the background and is kept)."""
        if (constraint.regex, constraint.specials) in self._kept:
            return

        async def compile_one() -> None:  # holds the semaphore until the compile ends, even past its request
            async with self._one_at_a_time:
                await asyncio.to_thread(self.compiled, constraint)

        try:
            await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(compile_one())), COMPILE_WAIT_S)
        except asyncio.TimeoutError:
            raise InvalidRequest(
                constraint.field, f"is too complex: not compiled within {COMPILE_WAIT_S:.0f} s"
            ) from None

    def compiled(self, constraint: Constraint) -> TokenAutomaton:
        key = (constraint.regex, constraint.specials)
        a = self._kept.get(key)
        if a is None:
            if self.vocabulary is None:
                raise InvalidRequest(
                    constraint.field, "this checkpoint has no tokenizer.json to constrain answers with"
                )
            specials = self._specials(constraint)
            try:
                a = compile_regex(constraint.regex, self.vocabulary, self.eos_ids, self.vocab_size, specials)
            except AutomatonError as exc:
                raise InvalidRequest(constraint.field, f"cannot be served: {exc}") from None
            a = a.to(self.device)
            self._kept[key] = a
            while len(self._kept) > KEPT:
                self._kept.popitem(last=False)
        self._kept.move_to_end(key)
        return a

    def check(
        self, constraint: Constraint, room: int, canvas_length: int, template: list[int] | None
    ) -> TokenAutomaton:
        """The compiled automaton, if an answer of `room` tokens (with the template's fixed tokens) can match."""
        a = self.compiled(constraint)
        if template and any(t >= 0 for t in template):
            if not bool(canvas_ends(a, room, canvas_length, template)[0, a.start]):
                raise InvalidRequest(constraint.field, "no answer with this template's fixed tokens can match it")
        shortest = int(a.steps_to_done[a.start])
        if shortest > room:
            raise InvalidRequest(
                constraint.field,
                f"the shortest matching answer takes {shortest} tokens (its end included); max_tokens leaves {room}",
            )
        return a
