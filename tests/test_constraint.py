"""The constraint automaton and a constrained canvas's choices, against enumeration of every canvas."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from model.automaton import AutomatonError, TokenVocabulary, compile_regex, token_bytes
from model.constraint import canvas_ends, class_logsum, class_max, constrained_canvas, sample_path, viterbi

# pad, eos, then pieces that overlap (a, b, ab) and JSON-ish punctuation; a turn marker that is special
PIECES = (None, None, b"a", b"b", b"ab", b"{", b"}", b" ", None)
EOS = (1,)
V = len(PIECES)


def automaton(regex: str):
    return compile_regex(regex, TokenVocabulary.of(PIECES), EOS, V)


def text_of(seq: tuple[int, ...]) -> tuple[str, bool]:
    """The text before the first EOS and whether there was one; None pieces other than EOS poison it."""
    out = b""
    for t in seq:
        if t in EOS:
            return out.decode(), True
        if PIECES[t] is None:
            return "\0", False
        out += PIECES[t]
    return out.decode(), False


@pytest.mark.parametrize("regex", [r"\{(a|b)*\}", r"(ab|ba)+", r"a{2,3}b?", r"\{ ?a ?\}"])
def test_the_automaton_ends_exactly_on_the_language_followed_by_eos(regex):
    a = automaton(regex)
    for n in range(1, 5):
        for seq in itertools.product(range(V), repeat=n):
            text, ended = text_of(seq)
            want = ended and re.fullmatch(regex, text) is not None
            assert (a.walk(a.start, list(seq)) == a.done) == want, (seq, text)


def test_steps_to_done_is_the_shortest_completion():
    a = automaton(r"\{(a|b)*\}")
    assert int(a.steps_to_done[a.start]) == 3  # "{" "}" EOS
    after_open = a.walk(a.start, [5])
    assert int(a.steps_to_done[after_open]) == 2


def test_tokens_that_act_alike_share_a_class():
    a = automaton(r"(a|b)+")
    assert a.class_of[2] == a.class_of[3]  # "a" and "b" are the same in every state of (a|b)+
    assert a.class_of[5] == a.class_of[6] == a.class_of[8]  # "{", "}" and the special token lead nowhere


def test_a_language_these_tokens_cannot_write_is_refused():
    with pytest.raises(AutomatonError):
        automaton(r"xyz")
    with pytest.raises(AutomatonError):
        automaton(r"(unbalanced")


def test_token_bytes_reads_byte_level_and_sentencepiece_vocabularies():
    byte_level = {
        "model": {"type": "BPE", "vocab": {"<eos>": 0, "Ġa": 1, "{": 2, "Ċ": 3}},
        "added_tokens": [{"id": 0, "content": "<eos>", "special": True}],
        "decoder": {"type": "ByteLevel"},
    }
    assert token_bytes(byte_level) == [None, b" a", b"{", b"\n"]
    pieces = {
        "model": {"type": "BPE", "vocab": {"<eos>": 0, "\u2581the": 1, "<0x0A>": 2, "é": 3}},
        "added_tokens": [{"id": 0, "content": "<eos>", "special": True}],
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}]},
    }
    assert token_bytes(pieces) == [None, b" the", b"\n", "é".encode()]


def valid_canvases(a, start: int, C: int, left: int) -> list[tuple[int, ...]]:
    out = []
    for seq in itertools.product(range(V), repeat=C):
        end = a.walk(start, list(seq))
        if end >= 0 and int(a.steps_to_done[end]) <= left:
            out.append(seq)
    return out


@pytest.mark.parametrize("regex,left", [(r"\{(a|b)*\}", 0), (r"\{(a|b)*\}", 5), (r"(ab|ba)+", 0), (r"a{2,9}b?", 2)])
def test_the_argmax_canvas_is_the_most_likely_valid_canvas(regex, left):
    a = automaton(regex)
    C = 4
    gen = torch.Generator().manual_seed(len(regex) + left)
    for _ in range(5):
        logp = torch.log_softmax(torch.randn(C, V, generator=gen) * 3, -1)
        best, first = class_max(logp, a)
        classes, end = viterbi(a, torch.tensor(a.start), best, a.steps_to_done <= left)
        tokens = first.gather(1, classes[:, None])[:, 0].tolist()
        candidates = valid_canvases(a, a.start, C, left)
        scores = [sum(float(logp[i, t]) for i, t in enumerate(seq)) for seq in candidates]
        assert tuple(tokens) in candidates
        assert scores[candidates.index(tuple(tokens))] == pytest.approx(max(scores), abs=1e-5)
        assert int(end) == a.walk(a.start, tokens)


def test_the_sampled_path_follows_the_restricted_distribution():
    """Drawn paths' frequencies match the product of class weights normalised over the valid canvases."""
    a = automaton(r"\{(a|b)*\}")
    C, left = 3, 0
    gen = torch.Generator().manual_seed(3)
    weights = torch.rand(C, V, generator=gen) + 0.05
    logw = class_logsum(weights, a)
    classes_of = lambda seq: tuple(int(a.class_of[t]) for t in seq)  # noqa: E731
    exact: dict[tuple, float] = {}
    for seq in valid_canvases(a, a.start, C, left):
        exact[classes_of(seq)] = exact.get(classes_of(seq), 0.0) + math.prod(
            float(weights[i, t]) for i, t in enumerate(seq)
        )
    total = sum(exact.values())
    n = 4000
    u = torch.rand(n, C + 1, generator=gen)
    seen: dict[tuple, int] = {}
    for k in range(n):
        path, weighed = sample_path(a, torch.tensor(a.start), logw, a.steps_to_done <= left, u[k])
        assert bool(weighed)
        seen[tuple(path.tolist())] = seen.get(tuple(path.tolist()), 0) + 1
    assert set(seen) <= set(exact)
    for key, w in exact.items():
        p = w / total
        assert abs(seen.get(key, 0) / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, key


def test_a_constrained_canvas_is_valid_whatever_the_logits_say():
    """Logits that favour an invalid token everywhere still give a valid argmax and a valid sample; the sample
    keeps within the room (left 0: the EOS inside this canvas)."""
    a = automaton(r"\{(a|b)*\}")
    C = 6
    logits = torch.zeros(C, V)
    logits[:, 8] = 20.0  # the special token, never allowed
    gen = torch.Generator().manual_seed(0)
    for temp in (1.0, 0.0):
        u = torch.rand(2, C + 1, generator=gen)
        out = constrained_canvas(a, torch.tensor(a.start), logits, torch.tensor(temp), a.steps_to_done == 0, u)
        assert a.walk(a.start, out.argmax.tolist()) == a.done == int(out.argmax_end)
        assert a.walk(a.start, out.sample.tolist()) == a.done


def test_a_template_pins_positions_inside_the_constraint():
    a = automaton(r"\{(a|b)*\}")
    C = 5
    fixed = torch.tensor([-1, 3, -1, -1, -1])  # "b" second
    logits = torch.randn(C, V, generator=torch.Generator().manual_seed(1))
    u = torch.rand(2, C + 1, generator=torch.Generator().manual_seed(2))
    ends = a.steps_to_done == 0
    out = constrained_canvas(a, torch.tensor(a.start), logits, torch.tensor(0.7), ends, u, fixed=fixed)
    assert out.argmax[1] == 3 and out.sample[1] == 3
    assert a.walk(a.start, out.argmax.tolist()) == a.done


def test_canvas_ends_know_what_a_template_leaves_possible():
    """Row k of canvas_ends: the states after k canvases from which the rest can finish with the template kept,
    checked against enumeration of the rest of the answer."""
    a = automaton(r"\{(a|b)*\}")
    C, room = 2, 6
    template = [-1, -1, -1, 6, -1, -1]  # "}" fourth
    ends = canvas_ends(a, room, C, template)
    assert ends.shape == (4, a.states)
    for k in range(4):
        rest = template[k * C :]
        for s in range(a.states):
            want = any(
                a.walk(s, list(seq)) == a.done
                for seq in itertools.product(range(V), repeat=room - k * C)
                if all(t < 0 or seq[i] == t for i, t in enumerate(rest))
            )
            assert bool(ends[k, s]) == want, (k, s)
    assert torch.equal(canvas_ends(a, room, C)[0], a.steps_to_done <= room)
