"""Dual-path answer scoring: a response is correct if its last `Answer:` line OR its last `\\boxed{}` matches.

The paper's accuracy numbers depend on this (FACTS section 1): reasoning models answer in either
form, and a single-format scorer moves Qwen3 MATH-500 accuracy by tens of points.

Two steps decide whether an extracted answer equals the gold answer:
1. a light canonical string form (spaces, `$`, `**`, a trailing period, `\\text{}`, thousands
   separators) compared exactly: cheap, and it covers the toy task and literal answers;
2. otherwise math-verify (Hugging Face's checker, https://github.com/huggingface/Math-Verify):
   the candidate and the gold answer are parsed as LaTeX into SymPy and compared symbolically and
   numerically (`\\frac{3}{4}` = 0.75, `x^2+1` = `1+x^2`, `5^\\circ` = 5, sets, intervals, tuples).

Extraction stays ours, not math-verify's: only the two paths the paper defines may answer, so a
number in the middle of the reasoning never counts. Nor does anything inside a reasoning block
(`<think> ... </think>`, Qwen3's): both paths read what follows it, and a response cut off before it
closes has no answer. An `Answer:` or a box written while thinking is a draft; counting it would give a
cut-off response, or one whose final answer is wrong, a free second guess (most of all at the 8K budget).
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_ANSWER_MARKER = re.compile(r"answer[*_]*\s*:", re.IGNORECASE)
"""`Answer:`, also with the word in bold or italics and the colon outside (`**Answer**:`)."""
_LATEX_EMPHASIS = re.compile(r"\\(?:textbf|textit|emph|underline)\s*\{([^{}]*answer[^{}]*)\}", re.IGNORECASE)
"""`\\textbf{Answer:} 33`, `\\textbf{Final Answer}: 33`: the LaTeX twin of markdown's bold, read as the plain words."""
_LEAD_WORDS = frozenset("so thus hence therefore then and in conclusion summary the my our final correct overall".split())
"""Words that may open the clause of an Answer line (`So the final answer: 42`, `In conclusion, the answer: 7`)."""
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_LIST_OF_GROUPS = re.compile(r"^[+-]?\d{1,3}(,[1-9]\d{2})+$")
"""`120,240`: one number by the thousands rule, or a list written without spaces (no element of a list starts with 0)."""
_DIGIT_GROUP_SPACE = re.compile(r"(?<=\d)(?:\\,|\\!|\\ |~| )(?=\d{3}\b)")
_TRAILING_WORDS = re.compile(r"^([+-]?\d[\d.,/]*)\s+([A-Za-z][A-Za-z ]*)$")
"""`12 dollars`, `5 square cm per second`: a number followed by plain words only (units); the number is the
answer, unless a word says more than a unit does (`7 is not the answer`, `3 or more`, `5 thousand`: _NOT_UNITS)."""
_NOT_UNITS = frozenset(
    "is are was not no or and nor but than more less least most at either neither maybe possibly "
    "hundred hundreds thousand thousands million millions billion billions dozen squared cubed times "
    "factorial half halves minus plus over choose sqrt root roots pi".split()  # math words (`5 factorial`)
)
_VARIABLES = frozenset("x y z n k i".split())
"""Lower-case letters after a number that are variables (`7 x`), compared case-sensitively: `10 N`, `300 K` are units."""
_PI_WORD = re.compile(r"(?<![\\A-Za-z])pi\b", re.IGNORECASE)
_SQRT_SIGN = re.compile(r"√\s*(\d+(?:\.\d+)?|[A-Za-z]|\{[^{}]*\}|\([^()]*\))")
"""`2 pi`, `π` and `√3`, `2√3`, `√{x+1}` in a plain-text answer: LaTeX's `\\pi` and `\\sqrt{}` for math-verify, which stops
reading at them (`2√3` was 2, and `2 pi` the number 2 with a unit)."""
_MATH_SPAN = re.compile(r"(?<!\\)\$([^$]+?)(?<!\\)\$")
_LIST_SEPARATOR = re.compile(r"^\s*(?:,|;|or|and|,\s*and|,\s*or)?\s*$", re.IGNORECASE)
"""What may stand between the math spans of one answer that lists several (`$x=3$ or $x=5$`)."""
_HEDGES = frozenset("not no nor neither either maybe possibly perhaps".split())
"""Words between math spans that take the first one back or leave the answer open (`$2$, not $6$`)."""
_PROSE_LEAD = re.compile(r"^((?:[A-Za-z']+\s+){1,8}?)(?:is|are|equals)\s+(?=\S)", re.IGNORECASE)
"""`The answer is`, `The smallest n is` opening a plain-text answer (see `_from_prose`)."""
_PLAIN_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]+")
"""A word of plain text, not a LaTeX command's name (`\\not`, `\\neq`)."""
_TEXT_COMMAND = re.compile(r"\\(?:text|mathrm|mbox)\s*\{([^{}]*)\}")
_REMARK = re.compile(
    r"(?:,\s*|\s+)(?:since|because|as|from|which|where|i\.e\.|e\.g\.)\b.*$|\s+\(([^()]*)\)\.?$|(?<=\d)\.\s+(?-i:[A-Z]).*$", re.IGNORECASE
)
"""A remark after a plain-text answer (`24, since ...`, `8 (from x + 8 = 16)`, `5. This is because ...`): the answer
is what precedes it."""
_DISPLAY_MATH = re.compile(r"^\s*(?:\\\[|\\\(|\$\$)\s*((?:(?!\\\]|\\\)|\$\$).)*?)\s*(?:\\\]|\\\)|\$\$)\s*\.?\s*$", re.DOTALL)
"""`\\[ ... \\]`, `\\( ... \\)`, `$$ ... $$` around a whole answer (one math block, no closing delimiter inside)."""
_INLINE_MATH = re.compile(r"\\\((.+?)\\\)", re.DOTALL)
"""`\\( ... \\)`: the same as a `$ ... $` span."""
_WORDS_AFTER_NUMBER = re.compile(r"(?<=\d)\s*\\\(\s*\\(?:text|mathrm|mbox)\s*\{([^{}]*)\}\s*(?:\^\s*\{?\d\}?)?\s*\\\)")
"""`5 \\(\\text{cm}\\)`: words in inline math right after a number, read as the plain words (`5 cm`)."""
_TEXT_AFTER_NUMBER = re.compile(r"(?<=\d)\s*\\(?:text|mathrm|mbox)\s*\{\s*([A-Za-z][A-Za-z ]*)\}\s*(?:\^\s*\{?\d\}?)?\s*$")
"""`5 \\text{ million}` ending an answer (inside `\\boxed{}`): the plain words, so that the checks of words after a
number apply (`5 million` is no 5); math-verify read the number alone."""
_NUMBER_SPAN_THEN_WORDS = re.compile(r"^\$[+-]?\d[\d.,/]*\$\s+([A-Za-z][A-Za-z ]*)\.?$")
"""`$5$ thousand`, `$7$ is not the answer`: a number in math, then plain words only."""
_QUALIFIERS = frozenset(
    "not no nor or more less least most at either neither maybe possibly hundred hundreds thousand thousands million millions "
    "billion billions dozen".split()
)
"""Words after a number in math that take it back or change it (`$3$ or more`, `$5$ thousand`); others confirm it (`$12$ is correct`)."""
_SUPERSCRIPT = re.compile(r"[⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+")
_SUPERSCRIPT_DIGITS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
"""`2³`, `10⁶` in a plain-text answer: `2^{3}`, `10^{6}` (math-verify read the 2 and the 10)."""
_COPULA_AT_END = re.compile(r"(?:\b(?:is|equals|are)|=)\s*$", re.IGNORECASE)
"""Words between two math spans that make the second the value of the first (`the smallest $n$ is $5$`)."""
_PERCENT_AT_END = re.compile(r"\\?%(?=\s*(?:\$|\\\)|\\\])?\s*\.?\s*$)")
_VARIABLE = re.compile(r"^([a-zA-Z])=")
"""`x=5` (after normalize): the answer names its variable."""
_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())
REASONING_OPEN, REASONING_CLOSE = "<think>", "</think>"
PARSE_TIMEOUT_S = 5
"""math-verify's per-call limit (it uses SIGALRM, so only in the main thread; elsewhere no limit)."""


def answer_line(response: str) -> str | None:
    """What follows the last `Answer:` (any case, any spacing before the colon) up to the end of its line.

    When the marker ends its line (`**Answer:**` then the answer below it), the next non-blank line
    is the answer. A display-math block (`\\[` ... `\\]`, `$$` ... `$$`) the answer opens is read to its end over
    the lines that follow. None when there is no marker or nothing follows it (a response cut off there).
    """
    response = _LATEX_EMPHASIS.sub(r"\1", response)
    markers = [marker for marker in _ANSWER_MARKER.finditer(response) if _opens_answer(response, marker.start())]
    if not markers:
        return None
    lines = response[markers[-1].end() :].split("\n")
    for index, line in enumerate(lines):
        text = line.strip().removeprefix("**")  # the bold the marker opened (`**Answer:** **42**`)
        text = _unbold(text).strip().strip("*").strip()
        closing = next((close for open_, close in (("\\[", "\\]"), ("$$", "$$")) if text.startswith(open_)), None)
        if closing and closing not in text[2:]:  # a display block that goes on over the next lines
            block = [text, *(rest.strip() for rest in lines[index + 1 :])]
            end = next((i for i, rest in enumerate(block) if i and closing in rest), None)
            if end is None:
                return None  # cut off inside the block
            last = block[end]
            return " ".join([*block[:end], last[: last.index(closing) + len(closing)]])
        if text:
            return text
    return None


def _opens_answer(response: str, start: int) -> bool:
    """The marker opens its line, sentence or clause, after nothing but connectives and articles
    (`Answer:`, `**Final Answer:**`, `So the final answer: 42`, the toy's `. Answer : 16` and
    `= 8 Answer : 8`), not inside a phrase of the reasoning (`To check the answer: 12 x 3 = 36`,
    `Is 12 the answer: 12?`)."""
    clause = re.split(r"[.!?;:\n]", response[:start])[-1]
    return set(re.findall(r"[a-z]{2,}", clause.lower())) <= _LEAD_WORDS  # one letter is math (`x = 5 Answer: 5`)


def last_boxed(response: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces; None when absent or cut off."""
    starts = [m.end() for m in _BOXED.finditer(response)]
    if not starts:
        return None
    start = starts[-1]
    depth = 1
    for index in range(start, len(response)):
        char = response[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return response[start:index]
    return None  # unbalanced (truncated): an earlier complete box is not the final answer either


def normalize(answer: str) -> str:
    """Light canonical string form of an answer (no algebra): the exact-match step."""
    text = answer.strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    display = _DISPLAY_MATH.match(text)
    if display:
        text = display.group(1)
    text = _unbold(text.replace("\\$", "").replace("$", ""))
    text = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", text)
    text = _DIGIT_GROUP_SPACE.sub("", text)  # `1 000 000` and `1\,000` are one number
    text = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ ", "", text)
    thousands = _THOUSANDS.match(text.strip().rstrip("."))  # before spaces go: `1, 234` is a list, not 1234
    # Other spaces go, except between two digits: `1 7` is two numbers, not 17.
    text = re.sub(r"(?<=\d)\s+(?=\d)", " ", text)
    text = re.sub(r"(?<![\d ])\s+|\s+(?!\d)", "", text)
    text = text.rstrip(".")
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    if thousands:
        text = text.replace(",", "")
    return text


def _unbold(text: str) -> str:
    """Markdown bold (`**5**`) unwrapped; a power (`2**3`) kept."""
    return re.sub(r"\*\*(.+?)\*\*", r"\1", text)


def _without_variable(text: str) -> str:
    return re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", text)


def _latex_candidate(answer: str) -> str | None:
    """The answer as a LaTeX math environment for math-verify: markup, units and a leading `x =` stripped.

    Several math spans joined by `,`, `;`, `and` or `or` are one list (`$x=3$ or $x=5$` is `$3, 5$`);
    otherwise the first span is the answer and the rest comment on it (`$5$ because $2+3=5$`), unless
    the words between them take it back (`$2$, not $6$`: no answer). math-verify alone would pick one."""
    text = _unbold(answer.strip()).strip()
    display = _DISPLAY_MATH.match(text)
    if display:
        text = display.group(1)
    text = _INLINE_MATH.sub(r"$\1$", _WORDS_AFTER_NUMBER.sub(lambda words: f" {words.group(1).strip()}", text))
    spans = list(_MATH_SPAN.finditer(text))
    if len(spans) > 1:
        between = [text[left.end() : right.start()] for left, right in zip(spans, spans[1:])]
        contents = [_without_variable(span.group(1)).strip() for span in spans]
        if all(_LIST_SEPARATOR.match(words) for words in between):
            return "$" + ", ".join(contents) + "$"
        if any(_HEDGES & set(re.findall(r"[a-z]+", words.lower())) for words in between):
            return None
        answer = 0  # the first span, or the value a chain of `$n$ is $5$` gives it
        while answer < len(between) and _COPULA_AT_END.search(between[answer]):
            answer += 1
        return f"${contents[answer]}$"
    text = _DIGIT_GROUP_SPACE.sub("", text.replace("\\$", ""))
    if text.startswith("$") and text.endswith("$"):
        text = text.strip("$")
    qualified = _NUMBER_SPAN_THEN_WORDS.match(text)
    if qualified and _QUALIFIERS & set(qualified.group(1).lower().split()):
        return None  # math-verify would read the number alone
    text = _without_variable(_without_remark(text).rstrip(".").strip())
    text = _SQRT_SIGN.sub(lambda root: "\\sqrt{" + root.group(1).strip("{}()") + "}", _PI_WORD.sub(r"\\pi", text).replace("π", "\\pi "))
    text = _SUPERSCRIPT.sub(lambda power: "^{" + power.group().translate(_SUPERSCRIPT_DIGITS) + "}", text.replace("∞", "\\infty "))
    text = _TEXT_AFTER_NUMBER.sub(lambda words: f" {words.group(1).strip()}", text)
    words = _TRAILING_WORDS.match(text)
    if words:
        if _NOT_UNITS & set(words.group(2).lower().split()) or _VARIABLES & set(words.group(2).split()):
            return None  # a number qualified in words is no number: math-verify would read its first one
        text = words.group(1)
    return text if "$" in text else f"${text}$"


def _without_remark(text: str) -> str:
    """`text` without a trailing remark: a clause (`, since ...`) or a parenthesis with words or an equation
    in it (`(8 each)`, `(from x + 8 = 16)`); `2 (x + 1)` stays a product."""
    remark = _REMARK.search(text)
    if remark is None or not text[: remark.start()].strip():
        return text
    parenthesis = remark.group(1)
    if parenthesis is not None and "=" not in parenthesis and not re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", parenthesis):
        return text
    return text[: remark.start()]


def _timeout_s() -> int | None:
    return PARSE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _parse(latex: str) -> tuple:
    """math-verify's parse of one answer (cached: a gold answer is compared with k samples)."""
    return tuple(parse(latex, extraction_config=_EXTRACTION, parsing_timeout=_timeout_s()))


def answers_match(candidate: str | None, gold: str) -> bool:
    """Equal canonical strings, or equivalent by math-verify (gold first: its comparison is asymmetric).

    `x = 5` equals `5`, but never `y = 5`: an answer that names another variable is another answer.
    A percent sign may be left out when the gold answer is a number of at least 1 without one (`12.5%` for
    12.5; math-verify reads 0.125); below 1 the gold may be a probability, which 0.5% is not. Digit groups
    joined by commas without spaces (`120,240`) are one number, or the list they may be."""
    if candidate is None:
        return False
    candidate = _from_prose(candidate)
    if _hedged(candidate):
        return False
    without_percent = _PERCENT_AT_END.sub("", candidate) if "%" not in gold and abs(_number(gold) or 0) >= 1 else candidate
    if _equivalent(candidate, gold) or (without_percent != candidate and _equivalent(without_percent, gold)):
        return True
    # `120,240` against the list `120, 240`: the space alone decided. In order, and only against a side that is no
    # such number itself (`240,120` is not `120,240`).
    as_lists = _list_reading(candidate), _list_reading(gold)
    if all(as_lists) or not any(as_lists):
        return False
    return normalize(as_lists[0] or candidate) == normalize(as_lists[1] or gold)


def _from_prose(answer: str) -> str:
    """A plain-text answer that opens with a sentence, as what the sentence gives: `The answer is 5 or 7` is `5 or 7`,
    `x is 3` is `x = 3` (still another answer than `y = 3`). math-verify read the whole sentence and picked one of its
    numbers: `The answer is 5 or 7` matched 5, where `5 or 7` alone does not."""
    text = answer.strip()
    lead = _PROSE_LEAD.match(text)
    if lead is None:
        return answer
    named = lead.group(1).split()[-1]
    return f"{named} = {text[lead.end():]}" if len(named) == 1 and named not in "aAI" else text[lead.end():]


def _hedged(answer: str) -> bool:
    """A plain-text answer holding a number and a word that takes it back or leaves it open (`not 5`, `5, maybe 7`,
    `12, but it could be 13`), a remark after it aside (`5, since 4 is not prime`): math-verify would pick a number.
    Answers in words alone (`No`, `no solution`) are not hedged."""
    boxed = last_boxed(answer)
    text = _without_remark(_TEXT_COMMAND.sub(r" \1", _unbold(answer.strip() if boxed is None else boxed)).strip())
    return bool(re.search(r"\d", text)) and bool((_HEDGES | {"but"}) & {word.lower() for word in _PLAIN_WORD.findall(text)})


def _list_reading(answer: str) -> str | None:
    """An answer of digit groups joined by commas without spaces, as the list it may be (`120,240` -> `120, 240`)."""
    boxed = last_boxed(answer)
    text = (boxed if boxed is not None else answer).strip().strip("$").strip().rstrip(".")
    return text.replace(",", ", ") if _LIST_OF_GROUPS.match(text) else None


def _number(text: str) -> float | None:
    try:
        return float(normalize(text))
    except ValueError:
        return None


def _equivalent(candidate: str, gold: str) -> bool:
    candidate_form, gold_form = normalize(candidate), normalize(gold)
    if not candidate_form:
        return False
    if candidate_form == gold_form:
        return True
    named = [_VARIABLE.match(form) for form in (candidate_form, gold_form)]
    if all(named) and named[0].group(1) != named[1].group(1):
        return False
    if _VARIABLE.sub("", candidate_form) == _VARIABLE.sub("", gold_form):
        return True
    gold_latex, candidate_latex = _latex_candidate(gold), _latex_candidate(candidate)
    if gold_latex is None or candidate_latex is None:
        return False
    gold_parsed, candidate_parsed = _parse(gold_latex), _parse(candidate_latex)
    if not gold_parsed or not candidate_parsed:
        return False
    return verify(list(gold_parsed), list(candidate_parsed), timeout_seconds=_timeout_s())


def opens_reasoning(prompt: str) -> bool:
    """A chat-formatted prompt that ends inside a reasoning block (a template whose generation prompt ends with
    `<think>`, as Qwen3-Thinking-2507's does): its responses start inside the block."""
    return prompt.rfind(REASONING_OPEN) > prompt.rfind(REASONING_CLOSE)


def final_part(response: str, reasoning_open: bool = False) -> str:
    """The part of a response that may answer: what follows its last `</think>`, the whole response when it has no
    reasoning block, and nothing while a block is still open (`reasoning_open`: the prompt opened it)."""
    close = response.rfind(REASONING_CLOSE)
    if close >= 0:
        return response[close + len(REASONING_CLOSE) :]
    return "" if reasoning_open or REASONING_OPEN in response else response


def score_paths(response: str, gold: str, reasoning_open: bool = False) -> tuple[bool, bool]:
    """(the Answer line matches, the last box matches) in the response's `final_part`: single-format accuracies
    come from these."""
    answer = final_part(response, reasoning_open)
    return answers_match(answer_line(answer), gold), answers_match(last_boxed(answer), gold)


def score(response: str, gold: str, reasoning_open: bool = False) -> bool:
    """Correct if the last Answer-line answer or the last boxed answer after any reasoning block equals the gold answer."""
    answer = final_part(response, reasoning_open)
    return answers_match(answer_line(answer), gold) or answers_match(last_boxed(answer), gold)
