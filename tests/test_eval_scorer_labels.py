"""The dual-path scorer against hand-labelled tricky responses (tests/data/scorer_labels.jsonl).

Each label was decided by hand with the paper's rule: correct when the last `Answer:` line or the
last complete `\\boxed{}` is mathematically equal to the gold answer; the `why` field says why.
"""

import json
from pathlib import Path

import pytest

from opsdc_megatron.eval.scoring import score

pytestmark = pytest.mark.eval

LABELS = [json.loads(line) for line in (Path(__file__).parent / "data" / "scorer_labels.jsonl").read_text(encoding="utf-8").splitlines() if line]


def test_label_set_covers_the_tricky_cases():
    assert len(LABELS) >= 40
    assert len({row["id"] for row in LABELS}) == len(LABELS)
    categories = {row["category"] for row in LABELS}
    assert {"fraction", "frac-decimal", "units", "several-boxes", "several-spans", "variable", "disagree", "no-answer", "truncated"} <= categories
    for category in ("fraction", "frac-decimal", "units", "several-boxes", "several-spans", "variable", "disagree"):
        assert {row["correct"] for row in LABELS if row["category"] == category} == {True, False}, category


@pytest.mark.parametrize("row", LABELS, ids=[row["id"] for row in LABELS])
def test_scorer_matches_label(row):
    assert score(row["response"], row["gold"]) is row["correct"], row["why"]
