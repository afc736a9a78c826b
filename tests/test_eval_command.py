"""`opsdc eval` end to end on a tiny toy model: result files, mean@k bookkeeping, seeds, megatron checkpoints, input errors."""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy
import pytest

from opsdc_megatron.cli import main
from opsdc_megatron.eval.scoring import score
from opsdc_megatron.prompts import load_prompts, write_prompts
from opsdc_megatron.toy.base_model import BuildSettings, build_base_model
from opsdc_megatron.toy.task import toy_prompts
from tests.launch import hangups_not_ignored, run_opsdc
from tests.tiny_models import save_tiny_model

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


def save_model_that_answers(folder: Path, answer: str) -> Path:
    """A real Qwen3 whose weights make it answer every prompt with `answer` at any temperature <= 1.

    Every decoder weight is zero, so each position's final hidden state is its token's embedding
    (one-hot, hidden size >= vocabulary) through the final norm; the untied output layer maps the
    embedding of token a to a large logit of the token after a in the chain <|assistant|> (the
    prompt's last token) -> the answer's tokens -> <eos>.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opsdc_megatron.toy.tokenizer import build_toy_tokenizer

    tokenizer = build_toy_tokenizer()
    vocab = len(tokenizer)
    config = Qwen3Config(vocab_size=vocab, hidden_size=vocab + 3, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, head_dim=8, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    model = Qwen3ForCausalLM(config)
    chain = [tokenizer.convert_tokens_to_ids("<|assistant|>"), *tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        for norm in (model.model.norm, model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        for before, after in zip(chain, chain[1:]):
            model.lm_head.weight[after, before] = 10.0  # logit 10 * sqrt(hidden) ~ 133 over 0 for every other token
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_scores_the_answers_the_model_gives(tmp_path):
    """Every response is 'Answer : 7': correct exactly for the prompts whose gold answer is 7, on the
    answer-line path only (the toy models of the other tests never answer right, so they cannot tell)."""
    model = save_model_that_answers(tmp_path / "model", "Answer : 7")
    records = toy_prompts(3, 40, "heldout")
    golds = ["7" if index % 3 == 0 else "8" for index in range(len(records))]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": record.prompt, "answer": gold}) + "\n" for record, gold in zip(records, golds)))
    run_eval(model, data, tmp_path / "out", "--samples", "2")
    summary, responses = read(tmp_path / "out", "none")
    result = summary["result"]
    assert {r["text"] for r in responses} == {"Answer : 7"} and {r["response_tokens"] for r in responses} == {4}
    expected = golds.count("7") / len(golds)
    assert 0 < expected < 1 and result["accuracy"] == pytest.approx(expected) and result["accuracy_answer_line"] == pytest.approx(expected)
    assert result["accuracy_boxed"] == 0 and result["truncated"] == 0
    assert [r["correct"] for r in responses] == [golds[r["prompt_index"]] == "7" for r in responses]


def test_sample_s_is_drawn_with_seed_plus_s(evaluated):
    """mean@2 at seed 5 holds, as its sample 1, exactly the single-sample evaluation at seed 6."""
    _, two = read(evaluated / "k2", "none")
    _, one = read(evaluated / "k1", "none")

    def texts(rows, sample):
        return [r["text"] for r in sorted(rows, key=lambda r: r["prompt_index"]) if r["sample_index"] == sample]

    assert texts(two, 1) == texts(one, 0)
    assert texts(two, 0) != texts(two, 1)


def expect_input_error(capsys, argv: list[str], message: str) -> None:
    status, _, error = run_opsdc(capsys, *argv)
    assert status == 2
    assert message in error


def test_input_errors(toy, tmp_path, capsys):
    model, data = toy
    run = tmp_path / "run"
    (run / "best_hf").mkdir(parents=True)
    (run / "config.yaml").write_text("out_dir: x\n")
    expect_input_error(capsys, ["eval", "--model", str(run), "--data", str(data)], "this is a training run folder; expected a Hugging Face folder")
    # only what the run folder holds (it named a final_hf/ and checkpoints/ it lacked)
    expect_input_error(capsys, ["eval", "--model", str(run), "--data", str(data)], f"pass {run / 'best_hf'}\n")
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_10").mkdir(parents=True)
    expect_input_error(capsys, ["eval", "--model", str(checkpoints), "--data", str(data)], "a checkpoints folder without a 'latest' marker; pass one of its step_N folders")
    (checkpoints / "latest").write_text("step_10")
    expect_input_error(capsys, ["eval", "--model", str(checkpoints), "--data", str(data)], "step_10, which is not a complete checkpoint")
    (checkpoints / "step_10" / ".metadata").write_bytes(b"")
    expect_input_error(capsys, ["eval", "--model", str(checkpoints / "step_10"), "--data", str(data)], "no metadata.json (expected a megatron dist checkpoint)")
    (tmp_path / "empty").mkdir()
    expect_input_error(capsys, ["eval", "--model", str(tmp_path / "empty"), "--data", str(data)], "missing config.json, *.safetensors")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(tmp_path / "none.jsonl")], "data file not found")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--samples", "0"], "--samples must be >= 1, got 0")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--limit", "0"], "--limit must be >= 1, got 0")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--temperature", "-0.5"],
                       "--temperature must be >= 0, --top-p in (0, 1] and --top-k >= 0, got -0.5, 0.95, 20")
    no_template = tmp_path / "no_template"
    shutil.copytree(model, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((no_template / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    expect_input_error(capsys, ["eval", "--model", str(no_template), "--data", str(data)], f"{no_template}: the tokenizer has no chat template")
    # A half-downloaded folder or another model's config.json: named before anything loads (was a traceback about a "weight push")
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    expect_input_error(capsys, ["eval", "--model", str(broken), "--data", str(data)], f"--model {weights}: not a readable safetensors file")
    shutil.copy(next(model.glob("*.safetensors")), weights)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    expect_input_error(capsys, ["eval", "--model", str(broken), "--data", str(data)], f"--model {broken}: config.json does not match the weights")
    (broken / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"],\n}')
    expect_input_error(capsys, ["eval", "--model", str(broken), "--data", str(data)], f"--model {broken / 'config.json'}: Expecting property name")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--layout", "math500"], "line 1: missing field 'problem'")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--prompt-template", "Solve:"], "--prompt-template must contain {problem}")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--instruction", "concise", "--instruction-text", " "],
                       "--instruction concise needs an instruction, but --instruction-text is empty")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--hf-config", str(model)], "--hf-config is for a megatron checkpoint")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--engine", "sglang", "--sglang-python", str(tmp_path / "no" / "python")],
                       f"--engine sglang: SGLang interpreter {tmp_path / 'no' / 'python'} not found")
    expect_input_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--out", str(data)], f"--out: {data} exists and is not a folder")


def test_an_interrupted_eval_keeps_its_finished_passes_and_samples_and_resumes(toy, tmp_path, monkeypatch, capsys):
    """mean@2 on plain and instructed prompts, interrupted while drawing the instructed pass's second sample:
    the plain pass's files are written, the instructed pass's first sample is kept, and the rerun draws only
    the missing sample and gives exactly the uninterrupted run's results."""
    import opsdc_megatron.eval.evaluate as evaluate_module

    model, data = toy
    flags = ("--instruction", "both", "--limit", "3", "--samples", "2", "--seed", "4")
    run_eval(model, data, tmp_path / "whole", *flags)
    real_generate = evaluate_module.generate_across_ranks
    calls = []

    def generate(*args, **kwargs):
        calls.append(args[3])  # the sample's seed
        if len(calls) == 4 and fail:
            raise RuntimeError("node lost")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate_across_ranks", generate)
    fail = True
    with pytest.raises(RuntimeError, match="node lost"):
        run_eval(model, data, tmp_path / "out", *flags)
    assert read(tmp_path / "out", "none") == read(tmp_path / "whole", "none")
    assert not list((tmp_path / "out").glob("*.concise.json")) and len(list((tmp_path / "out").glob("*.partial.jsonl"))) == 2
    partials = {path: path.read_bytes() for path in (tmp_path / "out").glob("*.partial.jsonl")}
    with pytest.raises(SystemExit):  # the unfinished pass at another token budget: its samples were started over, silently
        run_eval(model, data, tmp_path / "out", "--instruction", "concise", *flags[2:], "--max-tokens", "7")
    assert "concise.partial.jsonl holds the unfinished evaluation of" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in partials} == partials
    twin = tmp_path / "twin" / model.name  # another model in a folder of the same name (two runs' step_000100): its files differ
    shutil.copytree(model, twin, copy_function=shutil.copy)  # new mtimes: files of another model
    with pytest.raises(SystemExit):  # it was taken for this model rewritten, and the unfinished samples were started over
        run_eval(twin, data, tmp_path / "out", "--instruction", "concise", *flags[2:])
    assert f"concise.partial.jsonl holds the unfinished evaluation of {model.resolve()}" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in partials} == partials
    for path in partials:  # scores as an older scorer gave them: the kept samples are scored again on resume
        key, *entries = [json.loads(line) for line in path.read_text().splitlines()]
        for response in (response for entry in entries for response in entry["responses"]):
            response.update({field: not response[field] for field in ("correct", "answer_line_correct", "boxed_correct")})
        path.write_text("".join(json.dumps(line) + "\n" for line in [key, *entries]))
    fail, calls[:] = False, []
    run_eval(model, data, tmp_path / "out", *flags)
    assert calls == [5], "only the instructed pass's second sample is drawn again"
    assert read(tmp_path / "out", "concise") == read(tmp_path / "whole", "concise")
    assert not list((tmp_path / "out").glob("*.partial.jsonl"))

    other = tmp_path / "other" / data.name  # another benchmark file of the same name
    other.parent.mkdir()
    other.write_text(data.read_text().splitlines()[0] + "\n")
    with pytest.raises(SystemExit):
        run_eval(model, other, tmp_path / "out", *flags)
    assert f"holds the evaluation of {model.resolve()} on {data.resolve()} with other data, prompts_sha256, which this one" in capsys.readouterr().err
    # The same model and data at another token budget (or template, seed, dtype, samples) is another evaluation, not a replacement.
    with pytest.raises(SystemExit):
        run_eval(model, data, tmp_path / "out", *flags, "--max-tokens", "7")
    assert f"holds the evaluation of {model.resolve()} on {data.resolve()} with other sampling, which this one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_eval(model, data, tmp_path / "out", *flags, "--samples", "3")
    assert "with other samples, which this one" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # samples are drawn per block of prompts with one seed
        run_eval(model, data, tmp_path / "out", *flags, "--batch-prompts", "2")
    assert "with other batch_prompts, which this one" in capsys.readouterr().err
    summary = next((tmp_path / "out").glob("*.none.json"))
    summary.write_text('{"benchmark": "cut sh')
    with pytest.raises(SystemExit):
        run_eval(model, data, tmp_path / "out", *flags)
    assert f"{summary}: not an evaluation result file" in capsys.readouterr().err
    summary.write_text("[]")
    with pytest.raises(SystemExit):
        run_eval(model, data, tmp_path / "out", *flags)
    assert "not an evaluation result file (a JSON list, not an object)" in capsys.readouterr().err
    older = {key: value for key, value in read(tmp_path / "whole", "none")[0].items() if key != "prompts_sha256"}
    summary.write_text(json.dumps(older))  # written before prompts were recorded by digest: the count still tells
    with pytest.raises(SystemExit):
        run_eval(model, data, tmp_path / "out", *flags[:2], "--limit", "2", *flags[4:])
    assert "with other prompt count, which this one" in capsys.readouterr().err


def test_unfinished_samples_are_neither_dropped_nor_kept_for_a_changed_model(toy, tmp_path, monkeypatch, capsys):
    """Interrupted after 2 of 3 samples: a rerun with --samples 1 used sample 0 and deleted the partial file with
    sample 1 (the interrupted evaluation could not finish in that folder any more); it is refused. Once the
    model's files change, those samples are of no model left: a rerun with other settings starts over."""
    import shutil

    import opsdc_megatron.eval.evaluate as evaluate_module

    model, data = toy
    model = Path(shutil.copytree(model, tmp_path / "model"))
    flags = ("--instruction", "none", "--limit", "3", "--seed", "4")
    real_generate, calls = evaluate_module.generate_across_ranks, []

    def generate(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 3:
            raise RuntimeError("node lost")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate_across_ranks", generate)
    with pytest.raises(RuntimeError, match="node lost"):
        run_eval(model, data, tmp_path / "out", *flags, "--samples", "3")
    [partial] = (tmp_path / "out").glob("*.partial.jsonl")
    kept = partial.read_bytes()
    with pytest.raises(SystemExit):
        run_eval(model, data, tmp_path / "out", *flags, "--samples", "1")
    assert "holds samples [0, 1] of this evaluation, unfinished; --samples 1 would keep only those below 1" in capsys.readouterr().err
    assert partial.read_bytes() == kept
    os.utime(model / "model.safetensors")  # the model changed (a run replaced its best_hf)
    calls[:] = []
    run_eval(model, data, tmp_path / "out", *flags, "--samples", "1", "--max-tokens", "7")
    assert calls == [4] and not partial.exists()


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """A 1-step `opsdc train` run (TP=1) from the toy model: checkpoints/step_000001 and `latest`. The model
    path is given relative to the working directory: the run records it so that it is found from any other."""
    model, _ = toy
    root = tmp_path_factory.mktemp("trained")
    write_prompts(root / "train.jsonl", toy_prompts(0, 4, "train"))
    overrides = [
        f"out_dir={root / 'run'}", f"model.hf_path={os.path.relpath(model)}", f"data.train_prompts={root / 'train.jsonl'}", "parallel.tensor_parallel_size=1",
        "train.steps=1", "train.lr=1e-3", "train.global_batch_prompts=4", "rollout.max_response_tokens=16", "rollout.generation_batch_prompts=4",
        "eval.every_steps=0",
    ]
    proc = subprocess.run([sys.executable, "-m", "opsdc_megatron.cli", "train", "recipes/toy_cpu.yaml", *overrides], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root / "run"


def test_megatron_checkpoint_evaluates_as_its_exported_folder(toy, trained, tmp_path, capsys, monkeypatch):
    """`--model RUN/checkpoints` (the step `latest` names) gives exactly what the converter's export of it gives."""
    _, data = toy
    step = trained / "checkpoints" / "step_000001"
    monkeypatch.chdir(tmp_path)  # not where the run was started: its config.yaml holds the start model's absolute path
    assert main_status(["convert", "megatron-to-hf", "--ckpt", str(step), "--out", str(tmp_path / "exported")]) == 0
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))  # where eval's temporary export goes
    run_eval(trained / "checkpoints", data, tmp_path / "from_checkpoint", "--samples", "2", "--seed", "3")
    assert "exporting" in capsys.readouterr().out
    assert not list(temporary.iterdir()), "the temporary export was not removed"
    run_eval(tmp_path / "exported", data, tmp_path / "from_folder", "--samples", "2", "--seed", "3")
    from_checkpoint, responses = read(tmp_path / "from_checkpoint", "none")
    from_folder, folder_responses = read(tmp_path / "from_folder", "none")
    assert from_checkpoint["model"] == str(step.resolve())
    assert from_checkpoint["result"] == from_folder["result"]
    assert [(r["text"], r["response_tokens"]) for r in responses] == [(r["text"], r["response_tokens"]) for r in folder_responses]
    # the student after the step was evaluated: the run's own export of it (final_hf) samples the same
    run_eval(trained / "final_hf", data, tmp_path / "final", "--samples", "2", "--seed", "3")
    assert read(tmp_path / "final", "none")[0]["result"] == from_checkpoint["result"]

    # a checkpoint whose config cannot be found, or whose --hf-config describes another model
    lonely = tmp_path / "lonely" / "step_000001"
    shutil.copytree(step, lonely)
    expect_input_error(capsys, ["eval", "--model", str(lonely), "--data", str(data)], "pass --hf-config with the Hugging Face folder")
    other = save_tiny_model("qwen2", tmp_path / "qwen2")
    expect_input_error(capsys, ["eval", "--model", str(lonely), "--data", str(data), "--hf-config", str(other)], f"--model {lonely}: {lonely} does not match")
    assert not list(temporary.iterdir())


def test_dtype_auto_reads_a_checkpoint_s_own_dtype(toy, trained, tmp_path):
    """`--dtype auto` samples in bf16 (on a GPU) when the weights are stored in bf16. A checkpoint's export keeps its
    own tensors' dtype, fp32 here (recipes/toy_cpu.yaml), whatever its base model's config.json says (bf16 below):
    sampling an fp32-trained checkpoint in bf16 would round away updates of lr 1e-6."""
    from opsdc_megatron.eval.command import _stored_in_bf16

    model, _ = toy
    base = tmp_path / "bf16_base"
    shutil.copytree(model, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert _stored_in_bf16(base, None)
    assert not _stored_in_bf16(base, trained / "checkpoints" / "step_000001")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_termination_signal_ends_an_eval_through_its_cleanup(toy, trained, tmp_path, signum):
    """kill, or a closed ssh session, ended `opsdc eval` outright: the SGLang servers it started (in sessions
    of their own) kept their GPUs and ports, and a checkpoint's temporary export stayed in $TMPDIR. Now the
    signal ends it as Ctrl-C does; the temporary export stands for both (the same `finally`s remove them)."""
    _, data = toy
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    sampling_forever = (  # the export is done and the evaluation is sampling when the signal comes
        "import sys, time\nimport opsdc_megatron.eval.evaluate as evaluate\n"
        "def sample(*args, **kwargs):\n    print('sampling', flush=True)\n    time.sleep(600)\n"
        "evaluate.generate_across_ranks = sample\nfrom opsdc_megatron.cli import main\nmain(sys.argv[1:])\n"
    )
    command = [sys.executable, "-c", sampling_forever, "eval", "--model", str(trained / "checkpoints"), "--data", str(data), "--out", str(tmp_path / "out")]
    with subprocess.Popen(command, env=dict(os.environ, TMPDIR=str(temporary)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=hangups_not_ignored) as proc:
        output = []
        for line in proc.stdout:
            output.append(line)
            if line.strip() == "sampling":
                break
        assert list(temporary.glob("opsdc-eval-*")), "".join(output)[-3000:]
        proc.send_signal(signum)
        output.append(proc.communicate(timeout=120)[0])
    assert proc.returncode == 128 + signum, "".join(output)[-3000:]
    assert not list(temporary.iterdir()), "the temporary export was left"


def main_status(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_sample_store_drops_a_line_cut_by_a_crash_and_appends_after_it(tmp_path):
    from opsdc_megatron.eval.evaluate import ScoredResponse
    from opsdc_megatron.eval.results import SampleStore

    key = {"model": "m", "files": [("a", 1, 2)]}
    response = ScoredResponse(0, 0, 3, False, True, True, False, "Answer: 1")
    store = SampleStore(tmp_path / "x.partial.jsonl", key)
    assert store.finished() == {}
    store.save(0, [response])
    with store.path.open("a") as file:
        file.write('{"sample": 1, "respon')  # the crash
    assert SampleStore(store.path, key).finished() == {0: [response]}
    store.save(2, [response])
    assert SampleStore(store.path, key).finished() == {0: [response], 2: [response]}
    assert SampleStore(store.path, {**key, "model": "other"}).finished() == {}, "another evaluation's samples"
    assert store.path.read_text() == json.dumps({"model": "other", "files": [["a", 1, 2]]}) + "\n"


def test_sglang_servers_take_the_tensor_parallel_size_and_memory_share(tmp_path, monkeypatch):
    """A 32B model fits no GPU alone, and a 30K-token budget needs the KV cache SGLang's default share leaves
    too small: --sglang-tp and --sglang-mem-fraction reach the servers' settings."""
    import argparse

    import opsdc_megatron.rollout.sglang.start as start
    from opsdc_megatron.eval.command import add_parser, sglang_server_options

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    flags = ["eval", "--model", "m", "--data", "d", "--engine", "sglang", "--sglang-python", sys.executable, "--out", str(tmp_path)]
    args = parser.parse_args([*flags, "--sglang-tp", "2", "--sglang-mem-fraction", "0.85"])
    assert args.dtype == "auto"
    started = []

    class Fleet:
        def __init__(self, settings, num_servers):
            started.append((settings, num_servers))

        def start(self):
            raise RuntimeError("no servers in this test")

    monkeypatch.setattr(start, "ServerFleet", Fleet)
    with pytest.raises(RuntimeError, match="no servers in this test"):
        start.serve_hf_folder(tmp_path, [2], 128, "bfloat16", **sglang_server_options(args))
    (settings, num_servers), = started
    assert (settings.tensor_parallel_size, settings.mem_fraction_static, num_servers) == (2, 0.85, 1)
    with pytest.raises(ValueError, match=r"--sglang-mem-fraction must be in \(0, 1\], got 1.5"):
        sglang_server_options(parser.parse_args([*flags, "--sglang-mem-fraction", "1.5"]))
    with pytest.raises(ValueError, match=r"--sglang-servers must be >= 1, got 0"):
        sglang_server_options(parser.parse_args([*flags, "--sglang-servers", "0"]))
    # given to the in-process engine, they were ignored without a word
    hf_flags = ["eval", "--model", "m", "--data", "d", "--out", str(tmp_path), "--sglang-tp", "2", "--sglang-servers", "4"]
    with pytest.raises(ValueError, match=r"^--sglang-servers, --sglang-tp: for --engine sglang, and this evaluation runs --engine hf$"):
        sglang_server_options(parser.parse_args(hf_flags))
    assert sglang_server_options(parser.parse_args(hf_flags[:7])) is None
