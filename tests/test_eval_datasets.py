"""Benchmark loaders on tiny samples in the published layouts (tests/data/), and their errors."""

import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from opsdc_megatron.cli import main
from opsdc_megatron.eval.datasets import DatasetLayoutError, load_dataset_file
from opsdc_megatron.eval.scoring import score
from opsdc_megatron.prompts import PromptFileError, load_prompts, write_prompts
from tests.launch import run_opsdc

pytestmark = pytest.mark.eval

DATA = Path(__file__).parent / "data"


def test_math500_jsonl():
    layout, records = load_dataset_file(DATA / "math500_test.jsonl")
    assert (layout.name, layout.benchmark, len(records)) == ("math500", "MATH-500", 3)
    first = records[0]
    assert first.prompt.startswith("Convert the point $(0,3)$")
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.extra == {"level": 2, "subject": "Precalculus", "id": "test/precalculus/807.json"}


def test_aime2024_parquet_with_integer_answers():
    layout, records = load_dataset_file(DATA / "aime_2024_problems.parquet")
    assert layout.name == "aime2024" and [r.answer for r in records] == ["204", "25"]
    assert records[0].extra == {"id": "2024-I-1"} and "Aya" in records[0].prompt


def test_aime2025_jsonl():
    layout, records = load_dataset_file(DATA / "aime2025-I.jsonl")
    assert (layout.name, layout.benchmark) == ("aime2025", None)  # question/answer fields are any Q/A file's (GSM8K): the file names it
    assert [r.answer for r in records] == ["70", "16"] and records[0].prompt.startswith("Find the sum of all integer bases")


def test_gsm8k_gold_is_the_number_after_the_hashes(tmp_path):
    """GSM8K's answer field is the worked solution; read whole, math-verify took a number from its text
    (here the first `$...$` span: 3), and a right `Answer: 1027` scored wrong."""
    solution = ("He pays 2*5=$<<2*5=10>>10 for apples and 3*4=$<<3*4=12>>12 for pears.\n"
                "Milk costs $<<2=2>>2 and eggs cost $<<1003=1003>>1,003.\nIn all 10+12+2+1003=<<10+12+2+1003=1027>>1027\n#### 1,027")
    path = write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": "How much does he pay?", "answer": solution}])
    layout, records = load_dataset_file(path)
    assert layout.name == "aime2025" and records[0].answer == "1027"
    assert score("Answer: 1027", records[0].answer) and score("\\boxed{1,027}", records[0].answer)


def test_dapo_parquet_keeps_the_published_user_message():
    layout, records = load_dataset_file(DATA / "dapo_math_17k_sample.parquet")
    assert layout.name == "dapo" and [r.answer for r in records] == ["2", "12"]
    assert records[0].prompt.startswith("Solve the following math problem step by step. The last line of your response should be of the form Answer:")
    assert "$2^{10}$" in records[0].prompt and records[0].extra["source"] == "math_dapo"


def test_project_prompt_files_and_forced_layout(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "tom has 3 apples .", "answer": "3", "level": 2}) + "\n")
    layout, records = load_dataset_file(path)
    assert layout.name == "opsdc" and records[0].extra == {"level": 2}
    with pytest.raises(DatasetLayoutError, match=r"p\.jsonl: line 1: missing field 'problem' \(layout math500"):
        load_dataset_file(path, layout="math500")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MATH_ROW = {"problem": "1+1?", "solution": "2", "answer": "2", "subject": "Algebra", "level": 1, "unique_id": "test/a/1.json"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([MATH_ROW, {k: v for k, v in MATH_ROW.items() if k != "answer"}], r"line 2: missing field 'answer' \(layout math500"),
        ([MATH_ROW, {**MATH_ROW, "hint": "x"}], r"line 2: unexpected field 'hint' \(layout math500"),
        ([MATH_ROW, {**MATH_ROW, "answer": ["2"]}], r"line 2: field 'answer' must be a string or an integer, got list"),
        ([{"text": "1+1?", "label": "2"}], r"first row has fields \['label', 'text'\], which match no known layout \(dapo: data_source"),
    ],
)
def test_wrong_layout_names_file_row_and_field(tmp_path, rows, message):
    with pytest.raises(DatasetLayoutError, match=message):
        load_dataset_file(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_dapo_rows_repeated_in_the_parquet_are_read_once_and_split_apart(tmp_path, capsys):
    """The published parquet holds each prompt ~100 times: read whole, `opsdc eval` scored every copy, and an
    80/20 split of the rows put nearly every validation prompt into training too."""
    template = pyarrow.parquet.read_table(DATA / "dapo_math_17k_sample.parquet").to_pylist()[0]
    distinct = []
    for index in range(10):
        row = json.loads(json.dumps(template))
        row["prompt"][0]["content"] += f" (variant {index})"
        row["reward_model"]["ground_truth"] = str(index)
        distinct.append(row)
    source = tmp_path / "dapo.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([row for _ in range(30) for row in distinct]), source)
    layout, records = load_dataset_file(source)
    assert layout.name == "dapo" and [r.answer for r in records] == [str(i) for i in range(10)]

    main(["data", "split", str(source), "--out", str(tmp_path / "split"), "--seed", "3"])
    train, validation = (load_prompts(tmp_path / "split" / f"{name}.jsonl") for name in ("train", "validation"))
    assert (len(train), len(validation)) == (8, 2) and not {r.prompt for r in train} & {r.prompt for r in validation}
    assert {r.answer for r in train + validation} == {str(i) for i in range(10)}
    assert "10 distinct prompts -> 8 in" in capsys.readouterr().out
    copies = tmp_path / "copies.jsonl"  # another layout: the split reads each prompt once as well
    write_prompts(copies, records * 3)
    main(["data", "split", str(copies), "--out", str(tmp_path / "copies_split")])
    assert "10 distinct prompts -> 8 in" in capsys.readouterr().out
    status, _, error = run_opsdc(capsys, "data", "split", str(source), "--out", str(tmp_path / "split"), "--seed", "4")
    assert status == 2 and "already exist" in error  # the files are there: nothing is replaced
    assert load_prompts(tmp_path / "split" / "train.jsonl") == train
    for out, message in ((copies, f"--out: {copies} exists and is not a folder"), (copies / "split", "--out: [Errno 20] Not a directory")):
        status, _, error = run_opsdc(capsys, "data", "split", str(source), "--out", str(out))
        assert status == 2 and message in error  # was a traceback


def test_wrong_dapo_rows_name_the_parquet_row(tmp_path):
    rows = pyarrow.parquet.read_table(DATA / "dapo_math_17k_sample.parquet").to_pylist()
    rows[1]["reward_model"] = {"style": "rule"}
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    with pytest.raises(DatasetLayoutError, match=r"dapo\.parquet: row 2: field 'reward_model' must be a mapping with 'ground_truth'"):
        load_dataset_file(tmp_path / "dapo.parquet")


def test_file_errors(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetLayoutError, match=r"unsupported file type '\.csv': expected \.jsonl or \.parquet"):
        load_dataset_file(tmp_path / "x.csv")
    with pytest.raises(DatasetLayoutError, match="data file not found"):
        load_dataset_file(tmp_path / "missing.jsonl")
    (tmp_path / "broken.jsonl").write_text(json.dumps(MATH_ROW) + "\n{oops\n")
    with pytest.raises(PromptFileError, match=r"broken\.jsonl:2: invalid JSON"):
        load_dataset_file(tmp_path / "broken.jsonl")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetLayoutError, match=r"broken\.parquet: not a readable Parquet file"):
        load_dataset_file(tmp_path / "broken.parquet")
    assert issubclass(DatasetLayoutError, PromptFileError)  # the CLI reports both as input errors


def test_a_closed_layout_with_an_added_column_is_read_as_the_open_one(tmp_path):
    layout, records = load_dataset_file(write_jsonl(tmp_path / "math.jsonl", [MATH_ROW | {"idx": 7}]))
    assert layout.name == "problem_answer" and records[0].extra["idx"] == 7


@pytest.mark.parametrize("row, field", [
    ({"problem": "2+2\ud800?", "answer": "4"}, "problem"),
    ({"prompt": "2+2?", "answer": "4\udfff"}, "answer"),
])
def test_an_unpaired_surrogate_is_named(tmp_path, row, field):
    """JSON admits the escape; the tokenizer failed on it only after the model or the servers were up."""
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(row) + "\n")  # the lone surrogate as a \udXXX escape
    with pytest.raises(DatasetLayoutError, match=rf"s\.jsonl: line 1: field '{field}' holds an unpaired surrogate"):
        load_dataset_file(path)
