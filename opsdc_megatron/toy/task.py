"""A synthetic task that reproduces, at toy scale, the phenomenon OPSDC removes.

A person starts with some objects, then 2-5 operations (add, subtract, double) change the count.
Two solution styles answer the same question:

- VERBOSE restates the problem, works one step at a time and, after every step, independently
  decides whether to "wait , let me verify" the step by recomputing it. A recomputation slips by
  1-2 with probability `SLIP_RATE` and the slipped value is carried on, so the redundant checks
  cost tokens AND accuracy, as over-thinking does in large reasoning models. The style decisions
  are spread over the whole response instead of being one choice at its first token.
- CONCISE writes only the needed equations.

Both end with the line `Answer : N`. The base model (toy/base_model.py) learns to answer plain
prompts mostly verbosely and prompts prefixed with `TOY_INSTRUCTION` concisely, which is the
starting point the paper's method needs: a teacher (instructed) that is shorter and at least as
accurate as the student (plain).

Everything is plain text of space-separated words, numbers and punctuation, so the word-level
toy tokenizer (toy/tokenizer.py) maps each number and word to one token.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from opsdc_megatron.prompts import PromptRecord

TASK_VERSION = "toy-task-v1"
"""Bump when the text or the distributions change: the cached base model is keyed by it."""

TOY_INSTRUCTION = "be concise ."
"""The teacher's conciseness instruction (three tokens, prepended to the prompt)."""

LEVELS = (2, 3, 4, 5)
"""Difficulty = number of operations."""
START_RANGE = (2, 15)
STEP_RANGE = (1, 6)
"""Amount added or subtracted in one operation."""
MAX_VALUE = 40
"""Bound on every intermediate value of the correct solution."""
MAX_NUMBER = 99
"""Largest number the tokenizer knows; slipped values drift above MAX_VALUE but stay below this."""
VERIFY_RATE = 0.7
"""Probability that the verbose style re-checks a step (decided independently after each step)."""
SLIP_RATE = 0.1
"""Probability that one re-check computes a wrong value (off by 1 or 2) and carries it on."""
HELDOUT_PERCENT = 20
"""Share of distinct question texts reserved for evaluation."""

NAMES = ("tom", "ann", "sam", "lily", "ben", "mia", "max", "zoe")
OBJECTS = ("apples", "coins", "books", "marbles", "cards", "stickers", "shells", "pens")

_ADD_TEXT = ("{name} gets {k} more {obj} .", "{name} finds {k} {obj} .", "then {name} buys {k} more {obj} .")
_SUB_TEXT = ("{name} gives away {k} {obj} .", "{name} loses {k} {obj} .", "then {name} sells {k} {obj} .")
_DOUBLE_TEXT = ("the number of {obj} doubles .", "{name} doubles the {obj} .")
_VERIFY_TEXT = ("wait , let me verify .", "wait , let me check that again .", "hmm , let me double check .")
_ORDINALS = ("first", "second", "third", "fourth", "fifth")

ADD, SUB, DOUBLE = "add", "sub", "double"
_SYMBOL = {ADD: "+", SUB: "-", DOUBLE: "*"}


@dataclass(frozen=True)
class ToyProblem:
    question: str
    answer: int
    level: int
    start: int
    ops: tuple[tuple[str, int], ...]
    """(kind, amount) per operation; amount is 2 for DOUBLE."""
    name: str
    obj: str


def apply_op(value: int, op: tuple[str, int]) -> int:
    """The exact result of one operation."""
    kind, amount = op
    if kind == ADD:
        return value + amount
    if kind == SUB:
        return value - amount
    return value * 2


def _equation(value: int, op: tuple[str, int], result: int) -> str:
    return f"{value} {_SYMBOL[op[0]]} {op[1]} = {result}"


def make_problem(rng: random.Random, level: int) -> ToyProblem:
    """A random problem with `level` operations whose correct intermediate values stay in 0..MAX_VALUE."""
    if level < 1 or level > len(_ORDINALS):
        raise ValueError(f"level must be in 1..{len(_ORDINALS)}, got {level}")
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    start = rng.randint(*START_RANGE)
    value, ops, sentences = start, [], [f"{name} has {start} {obj} ."]
    for _ in range(level):
        allowed = []
        if value + STEP_RANGE[0] <= MAX_VALUE:
            allowed.append(ADD)
        if value - STEP_RANGE[0] >= 0:
            allowed.append(SUB)
        if 0 < value and 2 * value <= MAX_VALUE:
            allowed.append(DOUBLE)
        kind = rng.choice(allowed)
        if kind == ADD:
            amount = rng.randint(STEP_RANGE[0], min(STEP_RANGE[1], MAX_VALUE - value))
            template = rng.choice(_ADD_TEXT)
        elif kind == SUB:
            amount = rng.randint(STEP_RANGE[0], min(STEP_RANGE[1], value))
            template = rng.choice(_SUB_TEXT)
        else:
            amount = 2
            template = rng.choice(_DOUBLE_TEXT)
        ops.append((kind, amount))
        sentences.append(template.format(name=name, k=amount, obj=obj))
        value = apply_op(value, (kind, amount))
    sentences.append(f"how many {obj} does {name} have now ?")
    return ToyProblem(" ".join(sentences), value, level, start, tuple(ops), name, obj)


def concise_solution(problem: ToyProblem) -> str:
    """Only the needed equations, then the answer line."""
    value, parts = problem.start, []
    for op in problem.ops:
        result = apply_op(value, op)
        parts.append(_equation(value, op, result) + " .")
        value = result
    return " ".join(parts + [f"Answer : {value}"])


def _op_phrase(op: tuple[str, int]) -> str:
    kind, amount = op
    if kind == ADD:
        return f"gets {amount} more"
    if kind == SUB:
        return f"loses {amount}"
    return "doubles"


def _stays_in_range(value: int, ops: tuple[tuple[str, int], ...]) -> bool:
    for op in ops:
        value = apply_op(value, op)
        if not 0 <= value <= MAX_NUMBER:
            return False
    return True


def _slip(rng: random.Random, value: int, remaining: tuple[tuple[str, int], ...]) -> int:
    """A wrong recomputation, off by 1 or 2, such that the rest of the solution stays in 0..MAX_NUMBER."""
    delta = rng.choice((1, 2))
    sign = rng.choice((-1, 1))
    for candidate in (value + sign * delta, value - sign * delta):
        if 0 <= candidate <= MAX_NUMBER and _stays_in_range(candidate, remaining):
            return candidate
    raise AssertionError("unreachable: an upward slip of a bounded solution stays below MAX_NUMBER")


def verbose_solution(problem: ToyProblem, rng: random.Random) -> str:
    """Restate, compute each step, and re-check steps at random; a slipped re-check is carried on.

    One slip always changes the final answer (add, subtract and double are injective); two slips
    can cancel (-1 then +1), so a slipped solution may still end right.
    """
    name, obj = problem.name, problem.obj
    restated = " , then ".join(_op_phrase(op) for op in problem.ops)
    parts = [f"let me restate the problem . {name} starts with {problem.start} {obj} , then {restated} ."]
    value = problem.start
    for index, op in enumerate(problem.ops):
        result = apply_op(value, op)
        parts.append(f"{_ORDINALS[index]} , {_equation(value, op, result)} .")
        if rng.random() < VERIFY_RATE:
            checked = _slip(rng, result, problem.ops[index + 1 :]) if rng.random() < SLIP_RATE else result
            parts.append(f"{rng.choice(_VERIFY_TEXT)} {_equation(value, op, checked)} . so {name} has {checked} {obj} .")
            result = checked
        value = result
    parts.append(f"so in the end {name} has {value} {obj} . Answer : {value}")
    return " ".join(parts)


def final_answer(solution: str) -> int:
    """The number on a solution's last `Answer :` line (toy texts only)."""
    return int(solution.rsplit("Answer :", 1)[1].split()[0])


def split_of(question: str) -> str:
    """'train' or 'heldout', fixed by a hash of the question text, so the two never share a question."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def sample_problems(rng: random.Random, count: int, split: str, unique: bool = True) -> list[ToyProblem]:
    """`count` problems of uniformly drawn level whose questions belong to `split`."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    problems: list[ToyProblem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise RuntimeError(f"could not draw {count} distinct {split} problems")
        problem = make_problem(rng, rng.choice(LEVELS))
        if split_of(problem.question) != split or (unique and problem.question in seen):
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def toy_prompts(seed: int, count: int, split: str) -> list[PromptRecord]:
    """Distinct prompts of one split with gold answers and extra={"level": int}; same seed, same list."""
    rng = random.Random(f"toy-prompts:{seed}:{split}")
    return [
        PromptRecord(p.question, str(p.answer), {"level": p.level})
        for p in sample_problems(rng, count, split)
    ]


def vocabulary_words() -> list[str]:
    """Every non-number word the task can write (the toy tokenizer's vocabulary)."""
    texts = [*_ADD_TEXT, *_SUB_TEXT, *_DOUBLE_TEXT, *_VERIFY_TEXT, " ".join(_ORDINALS), TOY_INSTRUCTION]
    texts += ["{name} has {k} {obj} . how many {obj} does {name} have now ?", "Answer : + - * ="]
    texts += ["let me restate the problem . {name} starts with {k} {obj} , then gets more loses doubles ."]
    texts += ["so {name} has {k} {obj} . so in the end"]
    words = set(NAMES) | set(OBJECTS)
    for text in texts:
        words.update(w for w in text.split() if not w.startswith("{"))
    return sorted(words)
