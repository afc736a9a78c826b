import pytest

from opsdc_megatron.prompts import PromptFileError, PromptRecord, load_prompts, write_prompts


def test_round_trip_keeps_extra_fields(tmp_path):
    records = [PromptRecord("1 + 1 ?", "2", {"level": 1}), PromptRecord("2 + 2 ?", "4")]
    write_prompts(tmp_path / "p.jsonl", records)
    assert load_prompts(tmp_path / "p.jsonl") == records
    assert not (tmp_path / "p.jsonl.tmp").exists()


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": '], r"p.jsonl:2: invalid JSON"),
        (['{"prompt": "a"}'], r"p.jsonl:1: field 'answer' must be a string, got missing"),
        (['{"prompt": 3, "answer": "1"}'], r"p.jsonl:1: field 'prompt' must be a string, got int"),
        (['[1, 2]'], r"p.jsonl:1: expected a JSON object"),
        ([""], r"no prompts"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptFileError, match=message):
        load_prompts(path)


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
