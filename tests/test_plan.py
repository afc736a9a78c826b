"""`opsdc plan`: layouts for the shipped Qwen3 configs (recipes/models/), the memory model's parts,
and named errors. The estimate itself is a model; these tests pin its rules, not GPU truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsdc_megatron.plan import GIB, H100_80GB_GIB, ModelShape, Workload, choose, estimate
from tests.launch import run_opsdc

pytestmark = pytest.mark.plan

MODELS = Path(__file__).resolve().parents[1] / "recipes" / "models"


def test_parameter_counts_match_the_published_sizes() -> None:
    counts = {name: ModelShape.from_hf_config(MODELS / f"qwen3-{name}.json").params / 1e9 for name in ("8b", "14b", "32b")}
    assert counts["8b"] == pytest.approx(8.19, abs=0.01)
    assert counts["14b"] == pytest.approx(14.77, abs=0.01)
    assert counts["32b"] == pytest.approx(32.76, abs=0.01)


def test_memory_model_rules() -> None:
    model = ModelShape.from_hf_config(MODELS / "qwen3-8b.json")
    work = Workload(seq_tokens=9216)
    one, two = estimate(model, work, tp=4, pp=1, dp=2), estimate(model, work, tp=4, pp=1, dp=4)
    assert two.memory_gib["optimizer"] == pytest.approx(one.memory_gib["optimizer"] / 2)  # distributed optimizer
    assert two.memory_gib["weights"] == one.memory_gib["weights"] == one.memory_gib["teacher"]
    offloaded = estimate(model, Workload(9216, teacher_offload=True), tp=4, pp=1, dp=2)
    vocab_unit_gib = model.vocab * model.hidden / 4 / GIB  # embedding shard, larger than a layer's at TP=4
    assert offloaded.memory_gib["teacher"] == pytest.approx(2 * 2 * vocab_unit_gib)  # two bf16 units on the GPU
    unfused = estimate(model, Workload(9216, fused_output_layer=False), tp=4, pp=1, dp=2)
    assert unfused.memory_gib["logits"] > 5 * one.memory_gib["logits"]
    recomputed = estimate(model, Workload(9216, recompute=True), tp=4, pp=1, dp=2)
    assert recomputed.memory_gib["activations"] < one.memory_gib["activations"] / 4
    # Sequence parallelism splits the 10 s b H outside the tensor-parallel matmuls too: (10 + 24) / 4 for 10 + 24 / 4
    unsplit = estimate(model, Workload(9216, sequence_parallel=False), tp=4, pp=1, dp=2)
    assert one.memory_gib["activations"] == pytest.approx(unsplit.memory_gib["activations"] * 8.5 / 16)
    assert estimate(model, Workload(9216, sequence_parallel=False), tp=1, pp=1, dp=8) == estimate(model, work, tp=1, pp=1, dp=8)


def test_pipeline_stage_rules() -> None:
    """1F1B keeps min(PP, micro-batches) micro-batches in flight on a stage of layers / PP layers; the
    first stage holds the embedding only (the output layer is on the last), and a stage's parameters
    are its share of the layers."""
    model = ModelShape.from_hf_config(MODELS / "qwen3-8b.json")
    work = Workload(seq_tokens=9216)
    flat, piped = estimate(model, work, tp=1, pp=1, dp=8), estimate(model, work, tp=1, pp=4, dp=2)
    per_layer = flat.memory_gib["activations"] / model.layers  # PP = 1: one micro-batch of every layer in flight
    assert piped.micro_batches_per_rank == 8
    assert piped.memory_gib["activations"] == pytest.approx(per_layer * model.layers / 4 * 4)
    embedding_gib = model.vocab * model.hidden / GIB
    layers_gib = model.layers * model.layer_params / GIB
    assert piped.memory_gib["weights"] == pytest.approx(2 * (layers_gib / 4 + embedding_gib))
    assert flat.memory_gib["weights"] == pytest.approx(2 * (layers_gib + 2 * embedding_gib))  # untied: both ends on the one stage


def test_teacher_offload_lets_a_smaller_layout_fit() -> None:
    """Qwen3-14B on 8 GPUs: with a resident teacher only TP=8 fits without recompute; streamed, TP=4 x DP=2 does.
    (Without sequence parallelism: TP=4 x DP=2 and TP=2 x DP=4, both with recompute.)"""
    model = ModelShape.from_hf_config(MODELS / "qwen3-14b.json")
    resident, _ = choose(model, Workload(9216), 8, 8, H100_80GB_GIB)
    streamed, _ = choose(model, Workload(9216, teacher_offload=True), 8, 8, H100_80GB_GIB)
    assert (resident.tp, resident.dp, resident.recompute) == (8, 1, False) and (streamed.tp, streamed.pp, streamed.dp, streamed.recompute) == (4, 1, 2, False)
    assert streamed.memory_gib["teacher"] < resident.memory_gib["teacher"] / 4


def test_choices_for_the_recipes_models() -> None:
    """Smallest model-parallel group that fits an H100 80GB; full recompute only when needed."""
    chosen = {}
    for name, gpus in (("8b", 16), ("14b", 16), ("32b", 16)):
        plan, _ = choose(ModelShape.from_hf_config(MODELS / f"qwen3-{name}.json"), Workload(9216), gpus, 8, H100_80GB_GIB)
        assert plan.total_gib <= H100_80GB_GIB
        chosen[name] = (plan.tp, plan.pp, plan.dp, plan.recompute)
    assert chosen == {"8b": (4, 1, 4, False), "14b": (4, 1, 4, False), "32b": (8, 2, 1, False)}


def test_cli_prints_the_table_and_the_recipe_line(capsys: pytest.CaptureFixture) -> None:
    status, out, err = run_opsdc(capsys, "plan", "--model", str(MODELS / "qwen3-8b.json"), "--gpus", "16", "--seq", "9216")
    assert status == 0, err
    assert "**chosen**" in out
    assert ("recipe: parallel.tensor_parallel_size=4 parallel.pipeline_parallel_size=1 parallel.data_parallel_size=4 "
            "parallel.distributed_optimizer=true parallel.sequence_parallel=true model.activation_recompute=none distill.fused_output_layer=true "
            "distill.teacher_offload=false train.global_batch_prompts=32 train.micro_batch_prompts=2") in out
    status, out, err = run_opsdc(capsys, "plan", "--model", str(MODELS / "qwen3-14b.json"), "--gpus", "16", "--seq", "9216", "--no-sequence-parallel")
    assert status == 0, err
    assert ("recipe: parallel.tensor_parallel_size=8 parallel.pipeline_parallel_size=1 parallel.data_parallel_size=2 "
            "parallel.distributed_optimizer=true parallel.sequence_parallel=false model.activation_recompute=none") in out


def test_tensor_parallel_groups_stay_within_a_node() -> None:
    """12 GPUs on nodes of 6: TP=4 would put ranks 4-7 on two nodes (launch/plan.py refuses that layout)."""
    _, plans = choose(ModelShape.from_hf_config(MODELS / "qwen3-8b.json"), Workload(4096, global_batch_prompts=24), 12, 6, 1000)
    assert {plan.tp for plan in plans} == {1, 2}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "qwen3-32b.json", "--gpus", "8", "--seq", "9216"], "no layout fits 79.6 GiB per GPU"),
        (["--model", "qwen3-8b.json", "--gpus", "12", "--seq", "4096"], "is not a whole number of nodes"),
        (["--model", "missing.json", "--gpus", "8", "--seq", "4096"], "is not a config.json"),
        (["--model", "qwen3-8b.json", "--gpus", "8", "--seq", "4096", "--global-batch-prompts", "3"], "no layout of 8 GPUs divides"),
        (["--model", "qwen3-8b.json", "--gpus", "8", "--seq", "4096", "--micro-batch-prompts", "0"], "--micro-batch-prompts must be >= 1, got 0"),
        (["--model", "qwen3-8b.json", "--gpus", "8", "--seq", "-100"], "--seq must be >= 1, got -100"),
        (["--model", "moe.json", "--gpus", "8", "--seq", "4096"], "moe.json: architectures: expected one of"),
    ],
)
def test_refusals_are_named(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    moe = json.loads((MODELS / "qwen3-8b.json").read_text()) | {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}
    (tmp_path / "moe.json").write_text(json.dumps(moe))
    args = [str(tmp_path / a) if a == "moe.json" else str(MODELS / a) if a.endswith(".json") else a for a in args]
    status, _, err = run_opsdc(capsys, "plan", *args)
    assert status == 2 and message in err, err
