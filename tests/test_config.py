"""Recipes: precedence, unknown keys, malformed YAML, layout checks -- and the CLI's one-line errors."""

import subprocess
import sys

import pytest

from opsdc_megatron.config import ConfigError, load_config

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
        ("out_dir: x\n", ["distill.teacher_offload=true", "model.fp8.format=hybrid", "model.fp8.param_gather=true"],
         "distill.teacher_offload does not support model.fp8.param_gather"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(write(tmp_path, text), overrides)


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
