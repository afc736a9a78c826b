"""`opsdc eval` end to end on a tiny toy model: result files, mean@k bookkeeping, seeds, input errors."""

import json
import statistics
from pathlib import Path

import numpy
import pytest

from opsdc_megatron.cli import main
from opsdc_megatron.eval import score
from opsdc_megatron.prompts import load_prompts, write_prompts
from opsdc_megatron.toy.base_model import BuildSettings, build_base_model
from opsdc_megatron.toy.task import toy_prompts

pytestmark = pytest.mark.eval

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    model = build_base_model(root / "model", seed=0, steps=5, settings=BuildSettings(batch_size=4, bucket_batches=2, warmup_steps=1), progress=False)
    write_prompts(root / "test.jsonl", toy_prompts(3, 8, "heldout"))
    return model, root / "test.jsonl"


def run_eval(model: Path, data: Path, out: Path, *extra: str) -> None:
    main(["eval", "--model", str(model), "--data", str(data), "--temperature", "1", "--top-p", "1", "--top-k", "0",
          "--max-tokens", str(MAX_TOKENS), "--instruction-text", "be concise .", "--batch-prompts", "8", "--out", str(out), *extra])


def read(out: Path, instruction: str) -> tuple[dict, list[dict]]:
    [summary] = out.glob(f"*.{instruction}.json")
    responses = summary.with_name(summary.name.removesuffix(".json") + ".responses.jsonl")
    return json.loads(summary.read_text()), [json.loads(line) for line in responses.read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(toy, tmp_path_factory):
    """mean@2 at seed 5 on plain and instructed prompts, and mean@1 at seed 6 on plain prompts."""
    model, data = toy
    out = tmp_path_factory.mktemp("eval")
    run_eval(model, data, out / "k2", "--samples", "2", "--seed", "5", "--instruction", "both")
    run_eval(model, data, out / "k1", "--samples", "1", "--seed", "6")
    return out


def test_mean_at_k_result_files_both_instructions(toy, evaluated):
    model, data = toy
    records = load_prompts(data)
    for instruction in ("none", "concise"):
        summary, responses = read(evaluated / "k2", instruction)
        result = summary["result"]
        assert summary["benchmark"] == "test" and summary["layout"] == "opsdc" and summary["model"] == str(model.resolve())
        assert summary["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": MAX_TOKENS}
        assert summary["instruction_text"] == (None if instruction == "none" else "be concise .")
        assert (result["n"], result["samples_per_prompt"], len(responses)) == (8, 2, 16)
        assert sorted((r["prompt_index"], r["sample_index"]) for r in responses) == [(p, s) for p in range(8) for s in range(2)]
        # every number is recomputable from the scored responses
        correct = [score(r["text"], records[r["prompt_index"]].answer) for r in responses]
        assert [r["correct"] for r in responses] == correct
        assert result["accuracy"] == pytest.approx(sum(correct) / 16)
        lengths = [r["response_tokens"] for r in responses]
        assert result["mean_tokens"] == pytest.approx(sum(lengths) / 16)
        assert result["median_tokens"] == statistics.median(lengths) and result["p90_tokens"] == pytest.approx(numpy.percentile(lengths, 90))
        assert all(1 <= n <= MAX_TOKENS for n in lengths)
        assert result["truncated"] == pytest.approx(sum(r["truncated"] for r in responses) / 16)
        assert all(r["response_tokens"] == MAX_TOKENS for r in responses if r["truncated"])
        levels = {str(r.extra["level"]) for r in records}
        assert set(result["per_level"]) == levels and sum(v["n"] for v in result["per_level"].values()) == 8
    # the instruction changes the prompts, so the responses differ
    assert read(evaluated / "k2", "none")[1] != read(evaluated / "k2", "concise")[1]


def test_sample_s_is_drawn_with_seed_plus_s(evaluated):
    """mean@2 at seed 5 holds, as its sample 1, exactly the single-sample evaluation at seed 6."""
    _, two = read(evaluated / "k2", "none")
    _, one = read(evaluated / "k1", "none")

    def texts(rows, sample):
        return [r["text"] for r in sorted(rows, key=lambda r: r["prompt_index"]) if r["sample_index"] == sample]

    assert texts(two, 1) == texts(one, 0)
    assert texts(two, 0) != texts(two, 1)


def expect_input_error(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_input_errors(toy, tmp_path, capsys):
    model, data = toy
    run = tmp_path / "run"
    (run / "best_hf").mkdir(parents=True)
    (run / "config.yaml").write_text("out_dir: x\n")
    expect_input_error(capsys, ["eval", "--model", str(run), "--data", str(data)], f"this is a training run folder; expected a Hugging Face folder")
    checkpoint = tmp_path / "checkpoints"
    (checkpoint / "step_10").mkdir(parents=True)
    (checkpoint / "latest").write_text("step_10")
    expect_input_error(capsys, ["eval", "--model", str(checkpoint), "--data", str(data)], "this is a megatron distributed checkpoint")
    (tmp_path / "empty").mkdir()
    expect_input_error(capsys, ["eval", "--model", str(tmp_path / "empty"), "--data", str(data)], "missing config.json, *.safetensors")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(tmp_path / "none.jsonl")], "data file not found")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--samples", "0"], "--samples must be >= 1, got 0")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--layout", "math500"], "line 1: missing field 'problem'")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--prompt-template", "Solve:"], "--prompt-template must contain {problem}")
