"""The embedded model's tasks: every generated answer passes its own check, wrong answers fail it, and every
letter or digit of a prompt and of an answer is one token of the embedded tokenizer."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from model.checkpoint import EMBEDDED
from model.training import tasks


@pytest.mark.parametrize("task", tasks.SINGLE + tasks.MANY)
def test_generated_answers_pass_their_check(task):
    rnd = random.Random(0)
    for _ in range(50):
        e = tasks.make(task, rnd)
        assert tasks.check(e, e.answer), e


def test_the_validity_checks_reject_what_breaks_a_constraint():
    pick = tasks.Example("pick", "pick 3 distinct: a b c d e", " a b c")
    assert tasks.check(pick, " e c a")
    assert not tasks.check(pick, " a a c")  # a repeat
    assert not tasks.check(pick, " a b z")  # not in the set
    assert not tasks.check(pick, " a b")  # too few

    arrange = tasks.Example("arrange", "arrange in any order: a b c", " a b c")
    assert tasks.check(arrange, " c a b")
    assert not tasks.check(arrange, " a a b")  # one letter twice, one dropped

    latin = tasks.Example("latin", "latin square:" + tasks.grid_text("200000000"), tasks.grid_text("231123312"))
    assert latin.prompt == "latin square: 200 / 000 / 000"
    assert tasks.check(latin, " 213 / 132 / 321")  # another solution with the given 2 in place
    assert not tasks.check(latin, " 123 / 231 / 312")  # a latin square, but not with the given 2
    assert not tasks.check(latin, " 213 / 132 / 312")  # a digit twice in a column
    assert not tasks.check(latin, " 213 / 132")  # unfinished


def test_held_out_prompts_are_fixed_and_distinct():
    a, b = tasks.held_out(), tasks.held_out()
    assert a == b and len({e.prompt for e in a}) == len(a) == tasks.HELD_OUT_PER_TASK * len(tasks.SINGLE + tasks.MANY)


def test_the_validation_set_leaves_out_every_held_out_prompt():
    val, held = tasks.validation(), {e.prompt for e in tasks.held_out()}
    assert {e.task for e in val} == set(tasks.SINGLE + tasks.MANY)
    assert len(val) > 300 and not held & {e.prompt for e in val}


def test_every_letter_and_digit_is_one_token():
    """What the formats are for: an answer's tokens line up one to one with its letters and digits, and a latin
    grid's blanks are separate tokens (a run of `_` blanks once merged into one)."""
    tok = AutoTokenizer.from_pretrained(EMBEDDED)
    rnd = random.Random(1)
    for task in tasks.SINGLE + tasks.MANY:
        e = tasks.make(task, rnd)
        for text in (e.prompt.split(":", 1)[1], e.answer):
            pieces = [tok.decode([i]).strip() for i in tok(text, add_special_tokens=False)["input_ids"]]
            symbols = [p for p in pieces if p and p not in ("/", "+")]
            assert all(len(p) == 1 for p in symbols), (task, text, pieces)
