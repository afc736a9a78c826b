"""Dual-path scoring: the Answer line OR the last \\boxed{} decides."""

from __future__ import annotations

import pytest

from opsdc_megatron.eval.scoring import score
from opsdc_megatron.eval.scoring import answer_line, last_boxed, normalize, opens_reasoning, score_paths

pytestmark = pytest.mark.eval


@pytest.mark.parametrize(
    "response",
    [
        "7 + 3 = 10 . Answer : 10",
        "Answer: 10",
        "answer:10",
        "Answer: $10$",
        "Answer: 10.",
        "**Answer:** 10",
        "Answer: x = 10",
        "so it is ten.\nAnswer:   10  \n",
        "Answer: 10.0",
    ],
)
def test_answer_line_only(response: str) -> None:
    assert score(response, "10")


@pytest.mark.parametrize("response", ["The result is \\boxed{10}.", "$\\boxed{ 10 }$", "\\boxed{\\text{10}}", "\\fbox{10}"])
def test_boxed_only(response: str) -> None:
    assert score(response, "10")


def test_both_agree() -> None:
    assert score("so \\boxed{12}\nAnswer: 12", "12")
    assert not score("so \\boxed{12}\nAnswer: 12", "13")


def test_disagreeing_paths_are_correct_if_either_matches() -> None:
    response = "the sum is \\boxed{12}\nAnswer: 13"
    assert score(response, "12")
    assert score(response, "13")
    assert not score(response, "14")


def test_last_answer_line_and_last_box_win() -> None:
    assert score("Answer: 3\nwait, I was wrong.\nAnswer: 4", "4")
    assert not score("Answer: 3\nwait, I was wrong.\nAnswer: 4", "3")
    assert score("\\boxed{3} no, \\boxed{4}", "4")
    assert not score("\\boxed{3} no, \\boxed{4}", "3")


@pytest.mark.parametrize("response", ["", "I do not know.", "the answer is 10", "answer 10"])
def test_no_answer(response: str) -> None:
    assert not score(response, "10")


def test_truncated_responses() -> None:
    assert not score("7 + 3 = 10 . Answer :", "10")  # cut right after the marker
    assert not score("\\boxed{1", "1")  # unbalanced brace
    assert last_boxed("\\boxed{\\frac{1}{2}") is None
    assert not score("7 + 3 = 10 . 10 * 2 =", "20")


def test_nested_braces() -> None:
    assert last_boxed("\\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert score("\\boxed{\\frac{1}{2}}", "1/2")


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("Answer: \\frac{1}{2}", "1/2"),
        ("Answer: \\dfrac{3}{4}", "0.75"),
        ("Answer: 1/2", "\\frac{1}{2}"),
        ("Answer: \\frac12", "0.5"),
        ("Answer: -\\frac{3}{4}", "-3/4"),
        ("Answer: 2/4", "1/2"),
        ("\\boxed{0.50}", "1/2"),
    ],
)
def test_fractions(response: str, gold: str) -> None:
    assert score(response, gold)


@pytest.mark.parametrize(
    ("response", "gold"),
    [("Answer : 1 000", "1000"), ("Answer: 1,000", "1000"), ("Answer:  17 ", " 17"), ("Answer: \\left( 3 \\right)", "(3)")],
)
def test_spaces_and_separators(response: str, gold: str) -> None:
    assert score(response, gold)


def test_non_numeric_answers_compare_as_strings() -> None:
    assert score("Answer: (1, 2)", "(1,2)")
    assert not score("Answer: (1, 2)", "(2,1)")
    assert score("\\boxed{x^2+1}", "x^2 + 1")


def test_wrong_numbers() -> None:
    assert not score("Answer: 17", "71")
    assert not score("Answer: 1/0", "0")
    assert not score("Answer: 10", "1")


def test_helpers() -> None:
    assert answer_line("a\nAnswer : 5\nb") == "5"
    assert answer_line("no marker") is None
    assert normalize(" $17$. ") == "17"


@pytest.mark.parametrize("response", ["\\textbf{Answer:} 33", "\\textbf{Final Answer}: 33", "So \\textbf{Answer: 33}", "\\emph{Answer:} $33$"])
def test_an_answer_marker_in_latex_bold_or_italics(response: str) -> None:
    assert answer_line(response) in ("33", "$33$")
    assert score(response, "33")


@pytest.mark.parametrize(
    "response",
    [
        "Answer:\n\\[\nx = \\frac{1}{2}\n\\]",
        "Answer: \\[ x =\n \\frac{1}{2} \\]",
        "Answer: $$\\frac{1}{2}\n$$.",
        "**Answer:** \\[\n\\frac{1}{2}\n\\] as shown above",
    ],
)
def test_a_display_block_on_the_answer_line_is_read_to_its_end(response: str) -> None:
    assert score(response, "0.5")
    assert not score(response, "1")  # the 1 of the fraction alone


def test_a_display_block_cut_off_is_no_answer() -> None:
    assert answer_line("Answer: \\[ \\frac{1}{2}") is None
    assert not score("Answer: \\[ \\frac{1}{2}", "1/2")


def test_only_what_follows_the_reasoning_block_answers() -> None:
    """An Answer line or a box written while thinking is a draft: the final part after `</think>` decides."""
    drafted = "<think>\nSo the answer: 41. Wait, let me recheck: 6*7=42.\n</think>\n\nThe product is $\\boxed{42}$."
    assert score_paths(drafted, "42") == (False, True)
    assert not score(drafted, "41")
    assert not score("<think>\nAnswer: 41\n</think>\nI cannot decide.", "41")
    assert score("<think>\n\\boxed{41}?\n</think>\nAnswer: 42", "42")


def test_a_response_cut_off_while_thinking_has_no_answer() -> None:
    assert not score("<think>\nMaybe it's \\boxed{41}? Hmm, let me recheck and", "41")
    assert not score("<think>\nAnswer: 41\n</think>", "41")  # closed, then cut off before any answer
    # a prompt that opened the block (the template's generation prompt ends with <think>): the response starts inside it
    assert not score("Maybe it's \\boxed{41}? Hmm", "41", reasoning_open=True)
    assert score("Maybe it's 41.\n</think>\n\\boxed{41}", "41", reasoning_open=True)
    assert score("no block at all: \\boxed{41}", "41")


def test_opens_reasoning() -> None:
    assert opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3 with thinking switched off
    assert not opens_reasoning("<|im_start|>assistant\n")


@pytest.mark.parametrize(("answer", "gold", "correct"), [
    ("The answer is 5 or 7", "5", False),  # as `5 or 7` alone: math-verify picked one number of the sentence
    ("The answer is 7 or 5", "7", False),
    ("The answer is 12, but it could be 13", "12", False),
    ("The answer is not 5", "5", False),
    ("The answer is 12", "12", True),
    ("The smallest n is 5", "5", True),
    ("It is 12 apples", "12", True),  # a unit after the number, as in `12 apples`
    ("The answer is $\\frac{1}{2}$", "1/2", True),
    ("x is 3", "x = 3", True),
    ("x is 3", "y = 3", False),  # still another variable's value
    ("The value of y is 3", "x=3", False),
    # a hedge word in a remark, or in an answer in words, is no hedge
    ("5, since 4 is not prime", "5", True),
    ("24 because no other choice works", "24", True),
    ("3. This is not a coincidence.", "3", True),
    ("8 (from x + 8 = 16, not 12)", "8", True),
    ("\\boxed{5 \\text{ (not 6)}}", "5", True),
    ("No", "\\text{no}", True),
    ("\\boxed{\\text{NO}}", "\\text{No}", True),
    ("\\boxed{\\text{No solution}}", "\\text{no solution}", True),
])
def test_an_answer_line_in_prose_is_what_the_sentence_gives(answer: str, gold: str, correct: bool) -> None:
    assert score(f"Answer: {answer}", gold) is correct
