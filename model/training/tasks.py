"""The embedded model's training and evaluation data, generated here (no downloads).

Two kinds of checkable tasks, plus plain English from the `pydoc_data` topics that ship with Python:

1. single answer, checked by exact match: reverse letters, sort digits, add two numbers, shift letters;
2. many answers, checked by a validity function: pick k distinct letters from a set, arrange given letters in
   any order, complete a 3x3 Latin square (blanks written 0). Here the answer's positions depend on each other:
   every free position sees the same spread of choices, so committing them all at once (argmax of each) repeats a
   letter or mixes squares, while each extra denoising step pins one more position and the rest follow.

Any task may also be asked for its answer as JSON (`as_json`): the prompt ends with JSON_ASK and the answer is
`{"answer": "<the plain answer>"}`, what structured outputs ask of the model (bench/eval_structured.py).

Letters are written space-separated and digits unspaced: the tokenizer splits digits one per token, and a
space before a letter belongs to the letter's token, so every letter and digit is one token. Answers in letters
start with a space too, so an answer's first letter is the same token as that letter in the prompt (without
it the model has to learn that `x` and ` x` are one letter before it can tell which letters are still free).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SINGLE = ("reverse", "sort", "add", "shift")
MANY = ("pick", "arrange", "latin")
LATIN_SQUARES = [
    sq
    for rows in itertools.permutations(itertools.permutations("123"), 3)
    if all(len(set(col)) == 3 for col in zip(*rows))
    for sq in ["".join("".join(r) for r in rows)]
]


JSON_ASK = " (answer in json)"


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str  # one right answer (for many-answer tasks: one of several)


def as_json(e: Example) -> Example:
    """The same task asked for a JSON answer: {"answer": "<the plain answer>"}."""
    return Example(e.task, e.prompt + JSON_ASK, json.dumps({"answer": e.answer}))


def spaced(items) -> str:
    return " ".join(items)


def letters(items) -> str:
    """An answer in letters: each one after a space, the first included."""
    return "".join(" " + x for x in items)


def grid_text(cells: str) -> str:
    """Nine cells of a 3x3 grid as three rows of digits, ' 200 / 002 / 000', 0 for a blank: one token per digit.
    (Blanks were `_` once, and BPE merges runs of them, `__` and ` ___`, so a blank row was one token that said
    nothing of where its cells sat; the model learnt latin squares far worse.)"""
    return " " + " / ".join(cells[r * 3 : r * 3 + 3] for r in range(3))


def grid_cells(text: str) -> str:
    """grid_text's inverse: the nine cells of ' 200 / 002 / 000' as '200002000' (whatever the spacing)."""
    return "".join(text.replace("/", " ").split())


def make(task: str, rnd: random.Random) -> Example:
    if task == "reverse":
        w = rnd.choices(LETTERS, k=rnd.randint(3, 7))
        return Example(task, f"reverse: {spaced(w)}", letters(reversed(w)))
    if task == "sort":
        d = rnd.choices("0123456789", k=rnd.randint(4, 7))
        return Example(task, f"sort: {''.join(d)}", "".join(sorted(d)))
    if task == "add":
        a, b = rnd.randint(10, 99), rnd.randint(10, 99)
        return Example(task, f"add: {a} + {b}", str(a + b))
    if task == "shift":
        w = rnd.choices(LETTERS[:-1], k=rnd.randint(3, 7))
        return Example(task, f"shift: {spaced(w)}", letters(chr(ord(c) + 1) for c in w))
    if task == "pick":
        pool = rnd.sample(LETTERS, rnd.randint(5, 8))
        k = rnd.randint(3, 4)
        return Example(task, f"pick {k} distinct: {spaced(pool)}", letters(rnd.sample(pool, k)))
    if task == "arrange":
        chosen = rnd.sample(LETTERS, rnd.randint(3, 5))
        return Example(task, f"arrange in any order: {spaced(chosen)}", letters(rnd.sample(chosen, len(chosen))))
    if task == "latin":
        square = rnd.choice(LATIN_SQUARES)
        shown = set(rnd.sample(range(9), rnd.randint(1, 2)))
        cells = "".join(square[i] if i in shown else "0" for i in range(9))
        return Example(task, f"latin square:{grid_text(cells)}", grid_text(square))
    raise ValueError(f"unknown task {task!r}")


def check(example: Example, reply: str) -> bool:
    """Does `reply` solve the example's task? Exact match for single-answer tasks, validity for the others; a
    JSON example's reply must be {"answer": ...} with an answer that would pass plain."""
    if example.prompt.endswith(JSON_ASK):
        try:
            value = json.loads(reply)
        except ValueError:
            return False
        if not isinstance(value, dict) or not isinstance(value.get("answer"), str):
            return False
        plain = Example(example.task, example.prompt[: -len(JSON_ASK)], json.loads(example.answer)["answer"])
        return check(plain, value["answer"])
    got = reply.split()
    if example.task in SINGLE:
        return got == example.answer.split()
    p = example.prompt
    if example.task == "pick":
        k = int(re.match(r"pick (\d+)", p).group(1))
        pool = set(p.split(":", 1)[1].split())
        return len(got) == k and len(set(got)) == k and set(got) <= pool
    if example.task == "arrange":
        return sorted(got) == sorted(p.split(":", 1)[1].split())
    if example.task == "latin":
        digits, grid = grid_cells(reply), grid_cells(p.split(":", 1)[1])
        return digits in LATIN_SQUARES and all(g in ("0", s) for g, s in zip(grid, digits))
    raise ValueError(f"unknown task {example.task!r}")


def english_passages(max_words: int = 32) -> list[Example]:
    """(topic question, opening of the topic's text) pairs from the pydoc topics that ship with Python."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        words = re.sub(r"\s+", " ", _prose(topics[name])).strip().split(" ")
        title = name.replace("-", " ").replace("_", " ")
        out.append(Example("english", f"Tell me about {title}.", " ".join(words[:max_words])))
    return out


def _prose(text: str) -> str:
    """Drop reST underlines (lines of *, =, -, ~) from a pydoc topic."""
    return "\n".join(line for line in text.splitlines() if not re.fullmatch(r"\s*[*=~^-]{3,}\s*", line))


def english_corpus() -> list[str]:
    """Full pydoc topic texts, for training the tokenizer."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


HELD_OUT_PER_TASK = 40


def held_out(n_per_task: int = HELD_OUT_PER_TASK, seed: int = 1234) -> list[Example]:
    """The evaluation set: a fixed stream, disjoint from training (training rejects these prompts)."""
    rnd = random.Random(seed)
    out, seen = [], set()
    for task in SINGLE + MANY:
        while sum(e.task == task for e in out) < n_per_task:
            e = make(task, rnd)
            if e.prompt not in seen:
                seen.add(e.prompt)
                out.append(e)
    return out


def validation(n_per_task: int = 60, seed: int = 777) -> list[Example]:
    """A set for choosing sampler defaults, so that no choice is fitted to the evaluation set: the same generator
    under another seed, less every held-out prompt. Training does not reject these prompts (it may have seen some),
    so the set ranks settings; it does not estimate accuracy."""
    held = {e.prompt for e in held_out()}
    return [e for e in held_out(n_per_task, seed) if e.prompt not in held]


# SINGLE + MANY order: the single-answer tasks are learnt early; the rest of the budget goes to the constraints
DEFAULT_WEIGHTS = (0.8, 0.6, 1.2, 0.6, 1.5, 2.0, 1.5)


def training_batches(
    seed: int,
    batch: int,
    exclude: set[str],
    english_share: float = 0.05,
    weights: tuple[float, ...] = DEFAULT_WEIGHTS,
    json_share: float = 0.0,
) -> Callable[[], list[Example]]:
    """Deterministic under its seed: every call returns the next batch. English passages come in batches of
    their own, so the short task prompts are not padded to the length of a passage. A `json_share` of the task
    examples are asked for JSON answers (as_json; 0 draws nothing more, so earlier runs repeat)."""
    rnd = random.Random(seed)
    passages = english_passages()
    tasks = SINGLE + MANY

    def task_example() -> Example:
        while True:
            e = make(rnd.choices(tasks, weights)[0], rnd)
            if e.prompt not in exclude:
                return as_json(e) if json_share and rnd.random() < json_share else e

    def next_batch() -> list[Example]:
        if rnd.random() < english_share:
            return [rnd.choice(passages) for _ in range(batch)]
        return [task_example() for _ in range(batch)]

    return next_batch
