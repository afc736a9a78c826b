"""Recipes: precedence, unknown keys, malformed YAML, layout checks -- and the CLI's one-line errors."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opsdc_megatron.config import ConfigError, load_config, read_saved_config, to_yaml
from tests.launch import run_opsdc

RECIPE = "recipes/toy_cpu.yaml"


def write(tmp_path, text):
    """A recipe with the mandatory keys filled, then `text`."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  hf_path: m\ndata:\n  train_prompts: p\n" + text)
    return path


def test_overrides_beat_recipe_beat_defaults(tmp_path):
    path = write(tmp_path, "out_dir: x\ntrain:\n  steps: 7\n  lr: 0.5\n")
    config = load_config(path, ["train.lr=0.25", "distill.teacher_refresh_every=0"])
    assert config.train.steps == 7 and config.train.lr == 0.25
    assert config.distill.teacher_refresh_every == 0
    assert config.train.global_batch_prompts == 32 and config.train.micro_batch_prompts == 2  # paper defaults


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("out_dir: x\ntrain:\n  stepz: 3\n", [], "train.stepz"),
        ("out_dir: x\n", ["rollout.temprature=0.5"], "rollout.temprature"),
        ("out_dir: x\ntrain:\n  steps: three\n", [], "train.steps"),
        ("out_dir: x\ntrain: [1, 2\n", [], "recipe.yaml:7:1: malformed YAML"),
        ("out_dir: x\n", ["train.steps"], "expected key=value"),
        ("out_dir: x\ntrain:\n  global_batch_prompts: 32\n  micro_batch_prompts: 5\n", [], "train.micro_batch_prompts"),
        ("out_dir: x\nparallel:\n  data_parallel_size: 3\n", [], "parallel.data_parallel_size"),
        ("out_dir: x\ndistill:\n  divergence: jsd\n", [], "distill.divergence"),
        ("out_dir: x\n", ["parallel.virtual_pipeline_chunks=2"], "needs parallel.pipeline_parallel_size > 1"),
        ("out_dir: x\n", ["parallel.pipeline_parallel_size=3", "parallel.virtual_pipeline_chunks=2"],
         "micro-batches per data-parallel rank \\(16\\) must be a multiple of parallel.pipeline_parallel_size \\(3\\)"),
        ("out_dir: x\ntrain:\n  global_batch_prompts: 8\n  micro_batch_prompts: 4\n",
         ["parallel.pipeline_parallel_size=2", "parallel.virtual_pipeline_chunks=2"],
         "micro-batches per data-parallel rank \\(2\\) must be a multiple of parallel.pipeline_parallel_size \\(2\\) and at least twice it"),
        ("out_dir: x\n", ["train.micro_batch_tokens=100"], "must be 0 or hold the longest sequence"),
        ("out_dir: x\n", ["train.micro_batch_tokens=20000", "parallel.pipeline_parallel_size=2", "parallel.virtual_pipeline_chunks=2"],
         "model.attention_backend must be te or sdpa, got 'auto'"),
        ("out_dir: x\n", ["rollout.sglang.server_urls=[http://a:1,http://b:1]"], "server_urls lists 2 servers, rollout.sglang.num_servers is 1"),
        ("out_dir: x\n", ["rollout.sglang.server_urls=[a:1]"], "server_urls: expected http://HOST:PORT, got 'a:1'"),
        ("out_dir: x\n", ["distill.teacher_offload=true", "model.fp8.format=hybrid", "model.fp8.param_gather=true", "parallel.distributed_optimizer=true"],
         "distill.teacher_offload does not support model.fp8.param_gather"),
        ("out_dir: x\n", ["model.fp8.format=hybrid", "model.fp8.param_gather=true"],
         "model.fp8.param_gather needs parallel.distributed_optimizer=true"),
        ("out_dir: x\n", ["parallel.sequence_parallel=true", "parallel.tensor_parallel_size=1"],
         "parallel.sequence_parallel splits the sequence over tensor-parallel ranks: it needs parallel.tensor_parallel_size > 1, got 1"),
        # each stream padded to a multiple of TP = 2 under sequence parallelism: 2 x round_up(11 + 10, 2)
        ("out_dir: x\n", ["parallel.sequence_parallel=true", "parallel.tensor_parallel_size=2", "data.max_prompt_tokens=11",
                          "rollout.max_response_tokens=10", "train.micro_batch_tokens=42"],
         "train.micro_batch_tokens \\(42\\) must hold the longest sequence with each stream's tokens in multiples of 2 .* = 44"),
        # megatron ignores the bucket size without overlap: one bucket
        ("out_dir: x\n", ["parallel.grad_reduce_bucket_elements=1000"],
         "parallel.grad_reduce_bucket_elements must be null or >= 1 with parallel.overlap_grad_reduce=true .* got 1000 with overlap_grad_reduce=False"),
        ("out_dir: x\n", ["parallel.overlap_grad_reduce=true", "parallel.grad_reduce_bucket_elements=0"],
         "parallel.grad_reduce_bucket_elements must be null or >= 1 .* got 0 with overlap_grad_reduce=True"),
        ("out_dir: x\n", ["rollout.generation_batch_prompts=0"], "rollout.generation_batch_prompts must be >= 1, got 0"),
        ("out_dir: x\n", ["eval.max_prompts=0"], "eval.max_prompts must be >= 1, got 0"),
        ("out_dir: x\n", ["checkpoint.keep_last=-1"], "checkpoint.keep_last must be >= 1, got -1"),
        ("out_dir: x\n", ["checkpoint.save_every_steps=-5"], "checkpoint.save_every_steps must be >= 0, got -5"),
        ("out_dir: x\n", ["train.micro_batch_tokens=-1"], "train.micro_batch_tokens must be >= 0, got -1"),
        ("out_dir: x\n", ["eval.top_p=0"], "eval: temperature must be >= 0, top_p in \\(0, 1\\] and top_k >= 0 \\(0 = off\\), got temperature=0.6, top_p=0.0"),
        ("out_dir: x\n", ["rollout.temperature=-0.5"], "rollout: temperature must be >= 0"),
        ("out_dir: x\n", ["train.seed=18446744073709551619"], "train.seed must be < 2\\*\\*32"),
        ("out_dir: x\n", ["train.seed=4294967296"], "train.seed must be < 2\\*\\*32, got 4294967296"),
        ("out_dir: x\n", ["train.clip_grad=0"], "train.clip_grad must be > 0 \\(a large value never clips\\), got 0"),
        ("out_dir: x\n", ["rollout.sglang.router_port=30001", "rollout.sglang.num_servers=4"],
         "rollout.sglang.router_port must be 0 \\(no router\\) or a port \\(1-65535\\) outside the servers' 30000..30003, got 30001"),
        ("out_dir: x\n", ["rollout.sglang.base_port=65535", "rollout.sglang.num_servers=2"], "which must be ports \\(1-65535\\), got 65535..65536"),
        ("out_dir: x\ntrain:\n  steps: 3\nlog:\n  tensorboard: false\ntrain:\n  lr: 1.0\n", [], "recipe.yaml:10:1: malformed YAML: key 'train' appears twice"),
        ("out_dir: x\n", ["rollout.sglang.server_urls=[http://a:1"], "override 'rollout.sglang.server_urls=[http://a:1': malformed YAML value"),
        # Each passed validation and failed after the model load (torch's AdamW), or never (TE's FusedAdam, SGLang's argparse)
        ("out_dir: x\n", ["train.lr=-1e-6"], "train.lr must be >= 0, got -1e-06"),
        ("out_dir: x\n", ["train.lr=nan"], "train.lr must be >= 0, got nan"),
        ("out_dir: x\n", ["train.adam_beta2=1.5"], "train.adam_beta2 must be in .0, 1., got 1.5"),
        ("out_dir: x\n", ["train.adam_eps=0"], "train.adam_eps must be > 0, got 0"),
        ("out_dir: x\n", ["train.weight_decay=-1"], "train.weight_decay must be >= 0, got -1"),
        ("out_dir: x\n", ["rollout.temperature=nan"], "rollout: temperature must be >= 0"),
        ("out_dir: x\n", ["rollout.sglang.dtype=bf16"], "rollout.sglang.dtype must be one of SGLang's --dtype choices auto, half, float16, bfloat16, float, float32, got 'bf16'"),
        ("out_dir: x\n", ["rollout.sglang.mem_fraction_static=1.5"], "rollout.sglang.mem_fraction_static must be in .0, 1. or null, got 1.5"),
        ("out_dir: x\n", ["rollout.sglang.max_total_tokens=0"], "rollout.sglang.max_total_tokens must be >= 1 or null, got 0"),
        # the longest requests would not fit the servers' KV cache, mid-run (defaults: 1024 + 8192 tokens)
        ("out_dir: x\n", ["rollout.engine=sglang", "rollout.sglang.max_total_tokens=9000"],
         "rollout.sglang.max_total_tokens \\(9000, the servers' KV cache\\) must hold the longest request: data.max_prompt_tokens "
         "\\+ the longest of rollout.max_response_tokens and eval.max_response_tokens = 9216"),
        ("out_dir: x\n", ["distill.loss_normalization=tokens"], "distill.loss_normalization must be one of step_tokens, micro_batch, got 'tokens'"),
        ("out_dir: x\n", ["rollout.sglang.startup_timeout_s=0"], "rollout.sglang.startup_timeout_s must be > 0 and at most 1e\\+09 s, got 0"),
        ("out_dir: x\n", ["rollout.sglang.request_timeout_s=0"], "rollout.sglang.request_timeout_s must be > 0"),
        # inf passed, and every rollout then raised OverflowError from the socket, after the servers' start
        ("out_dir: x\n", ["rollout.sglang.request_timeout_s=inf"], "rollout.sglang.request_timeout_s must be > 0 and at most 1e\\+09 s, got inf"),
        # the teacher read the student's prompt: a KL of 0 and a run that learned nothing
        ("out_dir: x\n", ["distill.instruction= "], "distill.instruction is empty"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(write(tmp_path, text), overrides)


def test_yaml_merge_keys_are_no_duplicates(tmp_path):
    """`<<: *anchor` (sampling settings shared between sections) was refused as malformed YAML."""
    text = "out_dir: x\neval: &sampling\n  temperature: 0.6\n  top_p: 0.95\nrollout:\n  <<: *sampling\n  top_p: 0.9\n"
    config = load_config(write(tmp_path, text), [])
    assert (config.rollout.temperature, config.rollout.top_p, config.eval.top_p) == (0.6, 0.9, 0.95)

    nested = ("out_dir: x\nrollout:\n  <<: &eval_sampling\n    <<: {temperature: 0.6, top_p: 0.95}\n    top_p: 0.9\n"
              "  max_response_tokens: 64\neval: *eval_sampling\n")  # the anchored mapping overrides a key it merges
    config = load_config(write(tmp_path, nested), [])
    assert (config.rollout.top_p, config.eval.top_p, config.eval.temperature) == (0.9, 0.9, 0.6)
    with pytest.raises(ConfigError, match="recipe.yaml:10:5: malformed YAML: key 'top_p' appears twice"):
        load_config(write(tmp_path, nested.replace("    top_p: 0.9\n", "    top_p: 0.9\n    top_p: 0.8\n")), [])


@pytest.mark.parametrize("section, key, value, message", [
    ("log", "wandb_run_name", "off", "the boolean False"),
    ("model", "hf_path", "1.10", "the float 1.1"),
    ("data", "train_prompts", "0123", "the int 83"),
])
def test_text_fields_given_other_yaml_types_are_refused(tmp_path, section, key, value, message):
    """YAML 1.1 reads `off`, `1.10` and `0123` as False, 1.1 and 83: OmegaConf stored 'False', '1.1', '83'."""
    recipe = tmp_path / "recipe.yaml"
    settings = {"model": {"hf_path": "m"}, "data": {"train_prompts": "p"}, "out_dir": "x"}
    settings[section] = {**settings.get(section, {}), key: "VALUE"}
    recipe.write_text(yaml.safe_dump(settings).replace("VALUE", value))
    expected = f"recipe.yaml: {section}.{key}: expected text, YAML reads the value as {message}; put it in quotes"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(recipe, [])
    recipe.write_text(yaml.safe_dump(settings).replace("VALUE", f"'{value}'"))
    assert getattr(getattr(load_config(recipe, []), section), key) == value


@pytest.mark.parametrize("override, message", [
    ("distill={instruction: off}", "override 'distill={instruction: off}': distill.instruction: expected text, YAML reads the value as the boolean False"),
    ("rollout.sglang={python: 1.10}", "rollout.sglang.python: expected text, YAML reads the value as the float 1.1"),
    ("train={steps: 1, steps: 2}", "override 'train={steps: 1, steps: 2}': malformed YAML value: key 'steps' appears twice in one mapping"),
])
def test_a_section_given_as_a_mapping_is_checked_as_a_recipe_is(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, ""), ["out_dir=x", override])
    assert load_config(write(tmp_path, ""), ["out_dir=x", "distill={instruction: 'off'}"]).distill.instruction == "off"


def test_override_values_are_taken_as_written(tmp_path):
    """A scalar override is its text, converted to the field's type: YAML would cut a string at '#',
    fail on ': ' and turn 1:30 into 90 (the paper's instruction holds 'Answer: $Answer')."""
    config = load_config(write(tmp_path, ""), [
        "out_dir=runs/exp #2", "distill.instruction=Be brief. Last line: Answer: $Answer", "log.wandb_run_name=1:30",
        "train.steps=017", "train.lr=1e-5", "log.tensorboard=false", "model.megatron_checkpoint=null",
        "rollout.sglang.max_total_tokens=", 'data.eval_prompts="x.jsonl"',
    ])
    assert (config.rollout.sglang.max_total_tokens, config.data.eval_prompts) == (None, "x.jsonl")  # empty: None; quoted: YAML
    quoted = load_config(write(tmp_path, ""), ["out_dir=x", 'distill.instruction="Be brief.\\nAnswer: $Answer"', "log.wandb_run_name='a: b'"])
    assert (quoted.distill.instruction, quoted.log.wandb_run_name) == ("Be brief.\nAnswer: $Answer", "a: b")
    assert (config.out_dir, config.distill.instruction) == ("runs/exp #2", "Be brief. Last line: Answer: $Answer")
    assert (config.log.wandb_run_name, config.train.steps, config.train.lr) == ("1:30", 17, 1e-5)
    assert config.log.tensorboard is False and config.model.megatron_checkpoint is None
    braces = load_config(write(tmp_path, ""), ["out_dir=x", "distill.instruction=Use ${x}, not $y"])
    assert braces.distill.instruction == "Use ${x}, not $y"  # not an OmegaConf interpolation
    yaml_braces = load_config(write(tmp_path, ""), [
        "out_dir=x", "distill.instruction='Use ${out_dir}'", "rollout.sglang.server_urls=['http://h:1/${out_dir}']",
    ])  # quoted and list values are YAML, and their `${` is text too
    assert (yaml_braces.distill.instruction, yaml_braces.rollout.sglang.server_urls) == ("Use ${out_dir}", ["http://h:1/${out_dir}"])
    backslashed = load_config(write(tmp_path, ""), ["out_dir=x", "distill.instruction=Cost: \\${out_dir} or \\\\${x}", "log.wandb_run_name='a\\${x}'"])
    assert (backslashed.distill.instruction, backslashed.log.wandb_run_name) == ("Cost: \\${out_dir} or \\\\${x}", "a\\${x}")
    (tmp_path / "backslashed.yaml").write_text(to_yaml(backslashed))
    assert load_config(tmp_path / "backslashed.yaml", []) == backslashed
    unbalanced = load_config(write(tmp_path, ""), ["out_dir=x", "distill.instruction='Pay ${5 now'", "rollout.sglang.server_urls=['http://a:1/${x']"])
    assert (unbalanced.distill.instruction, unbalanced.rollout.sglang.server_urls) == ("Pay ${5 now", ["http://a:1/${x"])
    assert load_config(write(tmp_path, ""), ["out_dir=x", "train.lr=0"]).train.lr == 0  # frozen weights: a check that the start model is right
    (tmp_path / "kept.yaml").write_text(to_yaml(braces))
    assert load_config(tmp_path / "kept.yaml", []) == braces  # the recipe the launcher and the run folder keep
    assert read_saved_config(tmp_path / "kept.yaml")["distill"]["instruction"] == "Use ${x}, not $y"  # how the run folder's is read


def test_shipped_recipes_load():
    for recipe in ("recipes/toy_cpu.yaml", "recipes/toy_cpu_live_teacher.yaml", "recipes/toy_cpu_forward_kl.yaml",
                   "recipes/qwen3_8b.yaml", "recipes/qwen3_14b.yaml", "recipes/qwen3_32b.yaml"):
        load_config(recipe, ["out_dir=x", "model.hf_path=y", "data.train_prompts=z", "data.eval_prompts=w"])


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_config(path)


def test_missing_mandatory_key_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("out_dir: x\n")
    with pytest.raises(ConfigError, match="model.hf_path"):
        load_config(path)


def test_cli_reports_bad_recipe_in_one_line_and_writes_nothing(tmp_path):
    recipe = write(tmp_path, "out_dir: %s\ntrain:\n  stepz: 3\n" % (tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-m", "opsdc_megatron.cli", "train", str(recipe)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.stepz" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("break_model", "message"),
    [
        (lambda model: next(model.glob("*.safetensors")).unlink(), "model.hf_path: .*: no model.safetensors or model.safetensors.index.json"),
        (lambda model: (model / "config.json").write_text("{not json"), "model.hf_path: .*config.json: "),
        # another model's config: every rank failed with a traceback after torchrun had started
        (lambda model: (model / "config.json").write_text(json.dumps({**json.loads((model / "config.json").read_text()), "hidden_size": 32})),
         r"model.hf_path: .*: config.json does not match the weights:\n  mis-shaped: \['model.embed_tokens.weight: config implies \(\d+, 32\), file has \(\d+, 64\)"),
        # transformers 5 made an empty tokenizer from config.json: the error blamed a missing chat template
        (lambda model: [path.unlink() for path in model.glob("tokenizer*")], r".*/model: no tokenizer \(tokenizer.json, tokenizer_config.json"),
    ],
    ids=["no-weights", "malformed-config", "another-models-config", "no-tokenizer"],
)
def test_cli_names_a_broken_model_folder_before_starting(tmp_path, capsys, refused_before_start, break_model, message):
    from tests.tiny_models import save_toy_qwen3

    root = save_toy_qwen3(tmp_path)
    break_model(root / "model")
    overrides = [f"out_dir={tmp_path / 'run'}", f"model.hf_path={root / 'model'}", f"data.train_prompts={root / 'train.jsonl'}", "eval.every_steps=0"]
    status, _, error = run_opsdc(capsys, "train", RECIPE, *overrides)
    assert status == 2 and re.search("opsdc train: error: " + message, error), error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("checked_by_the_launcher", [False, True])
def test_each_rank_under_a_launcher_of_the_users_checks_the_inputs(tmp_path, capsys, refused_before_start, monkeypatch, checked_by_the_launcher):
    """Under a torchrun or srun of the user's every rank skipped the checks: a wrong model.hf_path became a traceback
    from each rank (transformers looking for the name on the Hub). The launchers that checked first say so."""
    from tests.tiny_models import save_toy_qwen3

    root = save_toy_qwen3(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    if checked_by_the_launcher:
        monkeypatch.setenv("OPSDC_INPUTS_CHECKED", "1")
    else:
        monkeypatch.delenv("OPSDC_INPUTS_CHECKED", raising=False)
    args = ("train", RECIPE, f"out_dir={tmp_path / 'run'}", f"model.hf_path={tmp_path / 'nope'}", f"data.train_prompts={root / 'train.jsonl'}",
            "eval.every_steps=0")
    if checked_by_the_launcher:
        with pytest.raises(AssertionError, match="it started training"):
            run_opsdc(capsys, *args)
    else:
        status, _, error = run_opsdc(capsys, *args)
        assert status == 2 and f"opsdc train: error: model.hf_path: {tmp_path / 'nope'} has no config.json" in error, error


def test_cli_refuses_an_out_dir_that_is_a_file_before_starting(tmp_path, capsys, refused_before_start):
    from tests.tiny_models import save_toy_qwen3

    root = save_toy_qwen3(tmp_path)
    (tmp_path / "run").write_text("a file")
    status, _, error = run_opsdc(capsys, "train", RECIPE, f"out_dir={tmp_path / 'run'}", f"model.hf_path={root / 'model'}",
                                 f"data.train_prompts={root / 'train.jsonl'}", "eval.every_steps=0")
    assert status == 2 and f"opsdc train: error: out_dir: {tmp_path / 'run'} exists and is not a folder" in error, error


def test_cli_checks_the_sglang_environment_it_would_start_before_starting(tmp_path, capsys, refused_before_start):
    """rollout.engine=sglang without server_urls: rank 0 starts the servers, whose interpreter must exist (rank 0
    failed with a traceback once the process group was up)."""
    from tests.tiny_models import save_toy_qwen3

    root = save_toy_qwen3(tmp_path)
    status, _, error = run_opsdc(capsys, "train", RECIPE, f"out_dir={tmp_path / 'run'}", f"model.hf_path={root / 'model'}",
                                 f"data.train_prompts={root / 'train.jsonl'}", "eval.every_steps=0", "rollout.engine=sglang",
                                 "rollout.sglang.python=/nonexistent/python")
    assert status == 2 and "opsdc train: error: rollout.sglang.python: SGLang interpreter /nonexistent/python not found" in error, error
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_refuses_another_runs_checkpoints(tmp_path, capsys, refused_before_start):
    """Saving step 10 among another run's step 100 would prune its own checkpoint (names sort by step)."""
    from tests.tiny_models import save_toy_qwen3

    root = save_toy_qwen3(tmp_path)
    earlier = tmp_path / "run" / "checkpoints" / "step_000100"
    earlier.mkdir(parents=True)
    (earlier / "trainer_state.json").write_text('{"step": 100}')
    (tmp_path / "run" / "checkpoints" / "step_000200.tmp").mkdir()  # an unfinished save is not a checkpoint
    args = ["train", RECIPE, f"out_dir={tmp_path / 'run'}", f"model.hf_path={root / 'model'}", f"data.train_prompts={root / 'train.jsonl'}",
            "eval.every_steps=0"]

    def refusal(*overrides: str) -> str:
        status, _, error = run_opsdc(capsys, *args, *overrides)
        assert status == 2 and "Traceback" not in error, error[-3000:]
        return error

    error = refusal("checkpoint.resume=false")
    assert re.search(r"checkpoints holds checkpoints of another run \(step_000100\), and this run starts from step 0 \(checkpoint.resume is false\)", error)
    assert earlier.is_dir() and not (tmp_path / "run" / "metrics.jsonl").exists()

    # A resume past train.steps (lowered to end a run early): it trained nothing and exported the step-100 weights
    # as final_hf of a run whose config.yaml said 3 steps
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000100")
    error = refusal("train.steps=3")
    assert re.search(r"checkpoints/step_000100 is past train.steps = 3: raise train.steps, or give another out_dir", error), error

    # A marker naming no complete checkpoint: refused before torchrun starts (every rank raised it)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000200")
    error = refusal()
    assert re.search(r"checkpoints/latest names .*checkpoints/step_000200, which is not a complete checkpoint", error), error

    # Another run's exports and no checkpoint to resume from: its best_hf would stay beside this run's metrics
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "best_hf").mkdir()
    error = refusal()
    assert "run holds best_hf of another run and no checkpoint to resume from: give another out_dir, or remove them" in error, error


def test_best_hf_is_the_export_of_the_best_eval_a_checkpoint_recorded(tmp_path):
    """An eval's new best waits as best_hf.step_N until a checkpoint records it: a run killed between the
    eval and its next checkpoint, resumed from the one before, redoes that eval and may score it lower; best_hf
    then held weights of an attempt the metrics no longer describe, and the recorded best's were lost."""
    from opsdc_megatron.train.checkpoint import best_candidate, settle_best_export

    out = tmp_path / "run"
    for step in (2, 3):
        best_candidate(out, step).mkdir(parents=True)
        (best_candidate(out, step) / "model.safetensors").write_text(f"step {step}")
    (out / "best_hf.step_000004.tmp").mkdir()  # an export killed mid-write
    (out / "best_hf.step_40_before_lr_change").mkdir()  # the user's own copy: not a candidate
    settle_best_export(out, {"step": 2})  # the checkpoint records step 2 as the best: step 3's eval is not in it
    assert sorted(p.name for p in out.iterdir()) == ["best_hf", "best_hf.step_40_before_lr_change"]
    assert (out / "best_hf" / "model.safetensors").read_text() == "step 2"
    settle_best_export(out, {"step": 2})  # nothing waiting: best_hf stays
    assert (out / "best_hf" / "model.safetensors").read_text() == "step 2"


def test_without_the_latest_marker_the_newest_complete_checkpoint_resumes(tmp_path, monkeypatch):
    """A save stopped between its folder's rename and the marker's write (SIGKILL after SIGTERM)."""
    import torch.distributed as dist

    from opsdc_megatron.train.run_folder import LATEST, latest_checkpoint

    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) is None
    for step in (9, 10, 100000):
        (root / f"step_{step:06d}").mkdir(parents=True)
    for step in (9, 10):
        (root / f"step_{step:06d}" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(root) == root / "step_000010", "step_100000 has no trainer state: its save never finished"
    (root / LATEST).write_text("step_000009")
    assert latest_checkpoint(root) == root / "step_000009"


def test_metrics_log_drops_a_cut_last_line_and_names_a_bad_one(tmp_path):
    from opsdc_megatron.train.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kind": "train"}\n{"step": 2, "kin')
    assert read_metrics(path) == [{"step": 1, "kind": "train"}]
    path.write_text('{"step": 1, "kind": "train"}\n{"step": 2, "kin\n{"step": 3, "kind": "train"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(path)


def test_metrics_of_a_resume_that_redoes_a_deferred_eval(tmp_path):
    """Preempted at step 2 (its eval deferred), resumed, evaluated step 2 and crashed at step 4 before a
    save: the next resume starts at step 2 again and redoes that eval, which must not be logged twice."""
    from opsdc_megatron.config import LogConfig
    from opsdc_megatron.train.metrics import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    records = [(0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "eval")]
    path.write_text("".join(json.dumps({"step": step, "kind": kind}) + "\n" for step, kind in records))
    MetricsLog(path, enabled=True, keep_through_step=2, log=LogConfig(tensorboard=False), run_config={}, redo_eval_step=2).close()
    assert [(r["step"], r["kind"]) for r in read_metrics(path)] == [(0, "eval"), (1, "train"), (2, "train")]


def test_a_launcher_of_the_users_must_start_the_recipes_process_count(tmp_path):
    """torchrun --nproc-per-node 2 for a one-process layout: each rank would train on half the step's rollouts."""
    from tests.tiny_models import save_toy_qwen3

    root = save_toy_qwen3(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "opsdc_megatron.cli", "train",
         "recipes/toy_cpu.yaml", f"out_dir={tmp_path / 'run'}", f"model.hf_path={root / 'model'}", f"data.train_prompts={root / 'train.jsonl'}",
         "eval.every_steps=0", "parallel.tensor_parallel_size=1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    assert "2 processes, but the recipe's layout needs 1 = parallel.tensor_parallel_size x pipeline_parallel_size x data_parallel_size (1 x 1 x 1)" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_token_budget_with_fp8_holds_the_longest_sequence_rounded_up_to_fp8_gemm_sizes(tmp_path, monkeypatch):
    """Each stream of a micro-batch is padded to a multiple of 16 for FP8: a budget of exactly 2 x (P + R) can
    still refuse a sequence at some step, on the one data-parallel rank that drew it."""
    import opsdc_megatron.models.transformer_engine as te

    monkeypatch.setattr(te, "guard_broken_transformer_engine", lambda: te.TransformerEngineStatus(True, ""))  # FP8 needs TE, absent here
    fp8 = ["model.fp8.format=hybrid", "data.max_prompt_tokens=100", "rollout.max_response_tokens=1001"]
    with pytest.raises(ConfigError, match=r"train.micro_batch_tokens \(2202\) must hold the longest sequence with each stream's tokens in multiples of 16 .* = 2208"):
        load_config(write(tmp_path, "out_dir: x\n"), [*fp8, "train.micro_batch_tokens=2202"])
    assert load_config(write(tmp_path, "out_dir: x\n"), [*fp8, "train.micro_batch_tokens=2208"]).train.micro_batch_tokens == 2208


def test_pruning_keeps_the_checkpoint_just_saved(tmp_path, monkeypatch):
    """Resumed from step 10 with a complete step 20 left by a save stopped before its marker: saving
    step 15 with keep_last=1 pruned step 15 itself (it kept the highest numbers) and every later
    resume failed. Older checkpoints only are pruned; step 20 is replaced when the run reaches it.
    A save's unfinished folders (`.tmp`) go at the next save."""
    import torch
    import torch.distributed as dist

    from opsdc_megatron.distill.teacher import TeacherSnapshot
    from opsdc_megatron.train import checkpoint
    from opsdc_megatron.train.run_folder import LATEST, complete_checkpoints, latest_checkpoint

    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(checkpoint, "_sharded_state_dict", lambda *args, **kwargs: {})
    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", lambda state, path, sharded_strategy: None)
    teacher = TeacherSnapshot(torch.nn.ModuleList(), refresh_every=0)
    teacher.saved_as = "teacher_step_000000_saved_000005"  # saved: no teacher folder is written here
    root = tmp_path / "checkpoints"
    for step in (5, 10, 20):
        (root / f"step_{step:06d}").mkdir(parents=True)
        (root / f"step_{step:06d}" / "trainer_state.json").write_text("{}")
    (root / LATEST).write_text("step_000010")
    (root / "step_000013.tmp").mkdir()  # a save killed before its rename: nothing else would ever remove it
    (root / "step_000013.tmp" / "0_0.distcp").write_text("half")
    checkpoint.save_checkpoint(root, 15, [], None, teacher, {"step": 15}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000010", "step_000015", "step_000020"]
    checkpoint.save_checkpoint(root, 16, [], None, teacher, {"step": 16}, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000016", "step_000020"]
    assert latest_checkpoint(root) == root / "step_000016"

    # A deletion of an old checkpoint cut short (killed, or a file it cannot remove): what it leaves is no
    # step folder, which would look complete (trainer state inside) with shards missing, and goes at a later save.
    real_rmtree = checkpoint.shutil.rmtree

    def cut_short(path, ignore_errors=False):
        if Path(path).name not in ("step_000016", "step_000016.old"):
            return real_rmtree(path, ignore_errors=ignore_errors)
        (Path(path) / "0_0.distcp").unlink()
        if not ignore_errors:
            raise OSError("Device or resource busy: .nfs0001")

    (root / "step_000016" / "0_0.distcp").write_text("shard")
    monkeypatch.setattr(checkpoint.shutil, "rmtree", cut_short)
    checkpoint.save_checkpoint(root, 17, [], None, teacher, {"step": 17}, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000016.old", "step_000017", "step_000020"]
    assert [p.name for p in complete_checkpoints(root)] == ["step_000017", "step_000020"]
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    checkpoint.save_checkpoint(root, 18, [], None, teacher, {"step": 18}, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000018", "step_000020"]


def test_hf_folder_config_names_the_dtype_of_its_weights(tmp_path):
    """final_hf/best_hf of an fp32 run from a bf16 checkpoint: config.json kept bfloat16, so transformers
    loaded the trained weights in bf16 by default (rounding away updates of lr 1e-6)."""
    import json

    import torch
    from transformers import AutoConfig

    from opsdc_megatron.models.hf_folder import save_hf_folder

    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "qwen3", "dtype": "bfloat16"}')
    save_hf_folder({"w": torch.zeros(2, dtype=torch.float32)}, source, tmp_path / "final_hf")
    assert json.loads((tmp_path / "final_hf" / "config.json").read_text())["dtype"] == "float32"
    assert AutoConfig.from_pretrained(tmp_path / "final_hf").dtype == torch.float32
    save_hf_folder({"w": torch.zeros(2, dtype=torch.bfloat16)}, source, tmp_path / "bf16_hf")  # already right: the source's bytes
    assert (tmp_path / "bf16_hf" / "config.json").read_bytes() == (source / "config.json").read_bytes()


def test_hf_folder_replaces_one_left_by_a_crash(tmp_path):
    """A crash between a replacement's rename and its clean-up leaves best_hf.old: every later save of
    best_hf (and final_hf at the end) failed on it ('Directory not empty')."""
    import torch
    from safetensors.torch import load_file

    from opsdc_megatron.models.hf_folder import save_hf_folder

    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    save_hf_folder({"w": torch.zeros(2)}, source, tmp_path / "best_hf")
    (tmp_path / "best_hf.old").mkdir()
    (tmp_path / "best_hf.old" / "model.safetensors").write_text("stale")
    for value in (1.0, 2.0):
        save_hf_folder({"w": torch.full((2,), value)}, source, tmp_path / "best_hf")
        assert torch.equal(load_file(tmp_path / "best_hf" / "model.safetensors")["w"], torch.full((2,), value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_hf", "source"]
    # A crash between the two renames leaves only best_hf.old, the complete folder: it is best_hf again before
    # anything else happens, so a second crash (here: a save that fails) cannot leave no folder at all.
    (tmp_path / "best_hf").rename(tmp_path / "best_hf.old")
    with pytest.raises(AttributeError, match="'str' object has no attribute 'detach'"):
        save_hf_folder({"w": "not a tensor"}, source, tmp_path / "best_hf")
    assert torch.equal(load_file(tmp_path / "best_hf" / "model.safetensors")["w"], torch.full((2,), 2.0))


def test_the_eval_defaults_are_opsdc_evals():
    """The best checkpoint is chosen under the sampling it is finally evaluated with: the paper's (0.6, 0.95, 20)."""
    import argparse

    from opsdc_megatron.eval.command import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    flags = parser.parse_args(["eval", "--model", "m", "--data", "d"])
    config = load_config(None, ["out_dir=x", "model.hf_path=m", "data.train_prompts=p"])
    assert (config.eval.temperature, config.eval.top_p, config.eval.top_k) == (flags.temperature, flags.top_p, flags.top_k) == (0.6, 0.95, 20)


def test_every_unset_mandatory_key_is_named_at_once(tmp_path):
    """OmegaConf named one missing key a run ("Structured config of type 'RunConfig' has missing mandatory value: out_dir"),
    so a user went round three times."""
    with pytest.raises(ConfigError, match=r"^recipes/toy_cpu.yaml: data.train_prompts, model.hf_path, out_dir must be set, in the recipe or as key=value$"):
        load_config(RECIPE)
    with pytest.raises(ConfigError, match=r"with overrides: data.train_prompts must be set"):
        load_config(RECIPE, ["out_dir=x", "model.hf_path=m"])


def test_a_recipe_extends_another_and_bad_chains_are_named(tmp_path):
    (tmp_path / "base.yaml").write_text("out_dir: x\nmodel:\n  hf_path: m\ndata:\n  train_prompts: t\ntrain:\n  steps: 7\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  lr: 0.25\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.train.steps, config.train.lr, config.out_dir) == (7, 0.25, "x")
    for text, message in [
        ("base: nothere.yaml\n", rf"{tmp_path / 'bad.yaml'}: base: {tmp_path / 'nothere.yaml'} not found \(a base recipe's path is relative to the recipe\)"),
        ("base: [base.yaml]\n", r"bad.yaml: base: expected the file name of one recipe, got \['base.yaml'\]"),
        ("base: bad.yaml\n", r"bad.yaml: 'base' recipes form a cycle"),
        ("base: base.yaml\ntrain: 5\n", r"bad.yaml: train: expected a section of settings \(key: value lines below it\), got 5"),
    ]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / "bad.yaml")
