"""Dual-path answer scoring: a response is correct if its last `Answer:` line OR its last `\\boxed{}` matches.

The paper's accuracy numbers depend on this (FACTS section 1): reasoning models answer in either
form, and a single-format scorer moves Qwen3 MATH-500 accuracy by tens of points. Normalization is
deliberately light (spaces, `$`, a trailing period, thousands separators, `\\frac{a}{b}` vs `a/b`,
numeric equality of integers, decimals and fractions); a later issue adds math-verify for symbolic
answers. Dependency-free.
"""

from __future__ import annotations

import re
from fractions import Fraction

_ANSWER_LINE = re.compile(r"answer\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac(\d)(\d)")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def answer_line(response: str) -> str | None:
    """What follows the last `Answer:` (any case, any spacing before the colon), up to the end of its line."""
    matches = _ANSWER_LINE.findall(response)
    return matches[-1] if matches else None


def last_boxed(response: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces; None when absent or cut off."""
    starts = [m.end() for m in _BOXED.finditer(response)]
    for start in reversed(starts):
        depth = 1
        for index in range(start, len(response)):
            char = response[index]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return response[start:index]
        # unbalanced (truncated): an earlier complete box is not the final answer either
        return None
    return None


def normalize(answer: str) -> str:
    """Light canonical form of an answer string (no symbolic algebra)."""
    text = answer.strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.replace("$", "").replace("\\!", "").replace("\\,", "").replace("**", "")
    text = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\left|\\right", "", text)
    text = re.sub(r"\s+", "", text)
    text = text.rstrip(".")
    text = re.sub(r"^[a-zA-Z]=", "", text)  # "x = 5"
    text = _FRAC.sub(r"(\1)/(\2)", text)
    text = _FRAC_SHORT.sub(r"\1/\2", text)
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    return text


def _as_number(text: str) -> Fraction | None:
    """Exact value of an integer, decimal or simple fraction (a/b, (a)/(b)); None for anything else."""
    parts = text.split("/")
    if len(parts) > 2:
        return None
    values = []
    for part in parts:
        sign = ""
        if part.startswith("-(") or part.startswith("+("):
            sign, part = part[0], part[1:]
        if part.startswith("(") and part.endswith(")"):
            part = part[1:-1]
        part = sign + part
        if not _NUMBER.match(part):
            return None
        values.append(Fraction(part))
    if len(values) == 2:
        return None if values[1] == 0 else values[0] / values[1]
    return values[0]


def answers_match(candidate: str | None, gold: str) -> bool:
    """Equal after normalization, numerically where both sides are numbers."""
    if candidate is None:
        return False
    left, right = normalize(candidate), normalize(gold)
    if not left:
        return False
    if left == right:
        return True
    left_number, right_number = _as_number(left), _as_number(right)
    return left_number is not None and left_number == right_number


def score(response: str, gold: str) -> bool:
    """Correct if the last Answer-line answer or the last boxed answer equals the gold answer."""
    return answers_match(answer_line(response), gold) or answers_match(last_boxed(response), gold)
