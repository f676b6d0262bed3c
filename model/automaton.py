"""A regular language over a checkpoint's own tokens: the automaton a constrained row of the sampler walks.

outlines-core compiles a regex into a deterministic automaton over token ids (each token's bytes read as one
step). Here it becomes two dense tables the sampler's per-step work indexes on the device:

- tokens that act alike in every state form one class (`class_of` [V]): a JSON schema's automaton over a
  262,144-token vocabulary has a few thousand classes, so the transition table is [states, classes];
- `next_state` [S, K]: the state after a token of class k in state s, -1 where the language has no way on.

State `done` (the last one) is where an end-of-sequence token leads from an accepting state: every token
leads from it to itself, so the positions after the EOS (cut from the answer) are free. Special tokens other
than EOS (turn markers, padding) lead nowhere from the language's states. `steps_to_done` [S] is the fewest
tokens from a state to `done` (the EOS included): what a canvas's end may leave for the canvases after it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

# The largest transition table a constraint may have (states x token classes), about 64 MiB of int32: past it a
# schema is refused as too complex rather than slowing every step of its row.
MAX_TABLE = 16 << 20
UNREACHABLE = 1 << 30


class AutomatonError(ValueError):
    """The regex cannot be served: it does not parse, its language is empty over these tokens, or its automaton
    exceeds MAX_TABLE."""


@dataclass(frozen=True)
class TokenAutomaton:
    next_state: torch.Tensor  # [S, K] int64, -1: no way on
    class_of: torch.Tensor  # [V] int64: each token's class
    steps_to_done: torch.Tensor  # [S] int64, UNREACHABLE where the language cannot end from there
    start: int
    done: int
    # The live transitions ("edges", [E] each: source state, token class, and the (source, target) pair they
    # fall into), sorted by pair, and the pairs ([P] each: source, target, and where their edges start in that
    # order, [P + 1]). A schema's table is mostly -1, and inside a JSON string most classes lead to one of a few
    # states, so P is far below E (3,251 against 83,091 for a four-field schema over 32,768 tokens): the sampler
    # reduces each position's classes to pairs once, over the whole canvas, walks positions over pairs only,
    # and looks into a pair's edges only for the pair a position chose.
    src: torch.Tensor | None = None
    cls: torch.Tensor | None = None
    pair: torch.Tensor | None = None
    pair_src: torch.Tensor | None = None
    pair_dst: torch.Tensor | None = None
    pair_offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.src is None:
            S = self.next_state.shape[0]
            src, cls = (self.next_state >= 0).nonzero(as_tuple=True)
            keys, pair = torch.unique(src * S + self.next_state[src, cls], return_inverse=True)
            order = torch.argsort(pair, stable=True)
            counts = torch.bincount(pair, minlength=len(keys))
            offset = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
            edges = {"src": src[order], "cls": cls[order], "pair": pair[order]}
            pairs = {"pair_src": keys // S, "pair_dst": keys % S, "pair_offset": offset}
            for name, value in (edges | pairs).items():
                object.__setattr__(self, name, value)

    @property
    def states(self) -> int:
        return self.next_state.shape[0]

    def to(self, device: torch.device) -> TokenAutomaton:
        tensors = (
            "next_state",
            "class_of",
            "steps_to_done",
            "src",
            "cls",
            "pair",
            "pair_src",
            "pair_dst",
            "pair_offset",
        )
        return TokenAutomaton(**{k: getattr(self, k).to(device) for k in tensors}, start=self.start, done=self.done)

    def walk(self, state: int, tokens: list[int]) -> int:
        """The state after `tokens` from `state` (-1 once no way on): the host-side check of an answer."""
        for t in tokens:
            if state < 0:
                return -1
            state = int(self.next_state[state, self.class_of[t]])
        return state


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as in a ByteLevel tokenizer's vocab."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tokenizer_json: dict) -> list[bytes | None]:
    """Each token id's bytes as it appears in decoded text, None for special tokens, read from a tokenizer.json:
    byte-level BPE (GPT-2's alphabet), SentencePiece-style pieces (U+2581 for a space, <0xNN> byte fallback), or
    plain pieces (word-level)."""
    model = tokenizer_json["model"]
    vocab = model["vocab"]
    pieces = dict(vocab) if isinstance(vocab, dict) else {p[0]: i for i, p in enumerate(vocab)}
    special = {t["id"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    size = max([*pieces.values(), *special]) + 1
    out: list[bytes | None] = [None] * size
    decoders = json.dumps(tokenizer_json.get("decoder") or {})
    byte_level = '"ByteLevel"' in decoders
    table = _byte_decoder() if byte_level else {}
    for piece, i in pieces.items():
        if i in special:
            continue
        if byte_level:
            if all(ch in table for ch in piece):
                out[i] = bytes(table[ch] for ch in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = bytes([int(piece[3:5], 16)])
        else:
            out[i] = piece.replace("\u2581", " ").encode()
    return out


@dataclass(frozen=True, eq=False)
class TokenVocabulary:
    """Each token id's bytes (None: a special token), compared and hashed by a fingerprint of them, so a
    cache keyed by it does not hash a whole vocabulary per lookup."""

    pieces: tuple[bytes | None, ...]
    fingerprint: str
    special_ids: tuple[tuple[str, int], ...] = ()  # each special token's text and id

    @classmethod
    def of(cls, pieces, special_ids: dict[str, int] | None = None) -> TokenVocabulary:
        digest = hashlib.sha256()
        for b in pieces:
            digest.update(b"\x00" if b is None else len(b).to_bytes(4, "little") + b)
        named = tuple(sorted((special_ids or {}).items()))
        digest.update(repr(named).encode())
        return cls(tuple(pieces), digest.hexdigest(), named)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenVocabulary) and other.fingerprint == self.fingerprint


def vocabulary_of(checkpoint: str | Path) -> TokenVocabulary | None:
    """The token bytes of a checkpoint folder's tokenizer.json; None when it has none (ids-only checkpoints)."""
    path = Path(checkpoint) / "tokenizer.json"
    if not path.exists():
        return None
    tokenizer = json.loads(path.read_text())
    specials = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    return TokenVocabulary.of(token_bytes(tokenizer), specials)


# outlines-core (0.2.14) drops the transitions that leave a final state for a non-final one, so `a+b?` would end
# after its first `a`. The regex is therefore compiled with an end marker only a virtual token writes: its final
# states are past the marker, and the states the marker leads there from are where the language may end (a
# character class such as `[^"]` admits the marker too, but reading it there leads on, not to a final state).
END_MARKERS = ("\U0010fffd", "\U000ffffd", "\ufdd0")


@lru_cache(maxsize=256)
def compile_regex(
    regex: str,
    vocabulary: TokenVocabulary,
    eos_ids: tuple[int, ...],
    vocab_size: int,
    specials: tuple[tuple[int, str], ...] = (),
) -> TokenAutomaton:
    """The automaton of `regex` over `vocabulary` (token_bytes), ending with any of `eos_ids`; `specials` lets
    special token ids stand for characters of the regex (its placeholders); cached per argument. AutomatonError
    where it cannot be served."""
    import outlines_core

    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(vocabulary.pieces[:vocab_size]):
        if b and i not in eos_ids:
            by_bytes.setdefault(b, []).append(i)
    for i, char in specials:
        by_bytes.setdefault(char.encode(), []).append(i)
    marker = next(m for m in END_MARKERS if not any(m.encode() in b for b in by_bytes))
    by_bytes.setdefault(marker.encode(), []).append(vocab_size)  # the virtual token, one past the vocabulary
    try:
        index = outlines_core.Index(f"(?:{regex}){marker}", outlines_core.Vocabulary(eos_ids[0], by_bytes))
    except (ValueError, RuntimeError, TypeError) as exc:  # outlines_core raises ValueError (bad regex, no path)
        raise AutomatonError(str(exc).splitlines()[0][:200]) from None
    transitions = index.get_transitions()
    finals = set(index.get_final_states())  # past the marker: the states the marker leads there from may end
    ends = {s for s, moves in transitions.items() if moves.get(vocab_size) in finals}
    return _tables(transitions, ends, index.get_initial_state(), set(eos_ids), vocab_size)


def _tables(transitions: dict, ends: set[int], initial: int, eos: set[int], vocab_size: int) -> TokenAutomaton:
    """Dense class tables from outlines-core's {state: {token: next}} (`ends`: where the language may end), one
    state's column of tokens at a time (the whole [states, vocabulary] table would be a gigabyte for a large
    schema over a real vocabulary)."""
    states = sorted(set(transitions) | {initial})
    number = {s: i for i, s in enumerate(states)}
    done = len(states)
    S = done + 1
    eos_ids = np.array(sorted(e for e in eos if e < vocab_size), dtype=np.int64)

    def row(i: int) -> np.ndarray:  # the next state of every token from state i
        if i == done:
            return np.full(vocab_size, done, dtype=np.int64)
        out = np.full(vocab_size, -1, dtype=np.int64)
        moves = transitions.get(states[i], {})
        if moves:
            real = [(t, n) for t, n in moves.items() if t < vocab_size and t not in eos]
            if real:
                out[np.array([t for t, _ in real])] = np.array([number[n] for _, n in real])
        out[eos_ids] = done if states[i] in ends else -1
        return out

    # Tokens alike in every state share a 128-bit signature (two multiply-add hashes over the states); the
    # check below makes the classes exact whatever the hashes do.
    h1 = np.zeros(vocab_size, dtype=np.uint64)
    h2 = np.zeros(vocab_size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(S):
            r = row(i).astype(np.uint64) + np.uint64(2)
            h1 = h1 * np.uint64(0x100000001B3) + r
            h2 = (h2 ^ r) * np.uint64(0x9E3779B97F4A7C15)
    _, first, class_of = np.unique(np.stack([h1, h2], 1), axis=0, return_index=True, return_inverse=True)
    class_of = class_of.reshape(-1)
    K = len(first)
    if S * K > MAX_TABLE:
        raise AutomatonError(f"the constraint's automaton is too large: {S} states x {K} token classes")
    table = np.empty((S, K), dtype=np.int64)
    for i in range(S):
        r = row(i)
        table[i] = r[first]
        if not np.array_equal(table[i][class_of], r):
            raise AutomatonError("token classes collided")  # 2^-64: never seen, but never silently wrong
    next_state = torch.from_numpy(table)
    steps = _steps_to_done(next_state, done)
    if steps[number[initial]] >= UNREACHABLE:
        raise AutomatonError("no answer of these tokens matches the constraint")
    return TokenAutomaton(next_state, torch.from_numpy(class_of.astype(np.int64)), steps, number[initial], done)


def _steps_to_done(next_state: torch.Tensor, done: int) -> torch.Tensor:
    """Fewest tokens from each state to `done`, by relaxing every edge until nothing shortens (at most S rounds)."""
    S = next_state.shape[0]
    steps = torch.full((S,), UNREACHABLE, dtype=torch.int64)
    steps[done] = 0
    target = next_state.clamp(min=0)
    live = next_state >= 0
    for _ in range(S):
        via = torch.where(live, steps[target] + 1, UNREACHABLE).amin(-1)
        new = torch.minimum(steps, via)
        new[done] = 0
        if torch.equal(new, steps):
            break
        steps = new
    return steps
