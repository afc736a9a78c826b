"""`opsdc plan`: layouts that divide the model and the GPUs, a memory estimate, refusals that say why."""

from pathlib import Path

import pytest

from opsdc_megatron.cli import main
from opsdc_megatron.plan import Layout, ModelShape, candidate_layouts, estimate

pytestmark = pytest.mark.plan

QWEN3_8B = "recipes/models/qwen3_8b_config.json"


def plan(*args):
    main(["plan", "--model", QWEN3_8B, *args])


def test_parameter_count_of_qwen3_8b():
    assert ModelShape.from_hf(Path(QWEN3_8B)).parameters == pytest.approx(8.19e9, rel=0.01)


def test_layouts_divide_heads_layers_and_gpus():
    model = ModelShape.from_hf(Path(QWEN3_8B))
    layouts = candidate_layouts(model, gpus=16, gpus_per_node=8, global_batch_sequences=32)
    assert layouts and all(l.tp * l.pp * l.dp == 16 and l.tp <= 8 and 36 % l.pp == 0 and 8 % l.tp == 0 for l in layouts)
    assert not any(l.pp == 16 for l in layouts), "36 layers do not split over 16 stages"


def test_memory_estimate_scales_with_the_layout():
    model = ModelShape.from_hf(Path(QWEN3_8B))
    one = estimate(model, Layout(1, 1, 8, 1), 4096, fused_attention=True, distributed_optimizer=False, reserve=0)
    tp2 = estimate(model, Layout(2, 1, 4, 1), 4096, fused_attention=True, distributed_optimizer=False, reserve=0)
    assert one.weights == one.teacher == pytest.approx(2 * model.parameters, rel=0.01)
    assert tp2.weights == pytest.approx(one.weights / 2, rel=0.01) and tp2.logits == pytest.approx(one.logits / 2, rel=0.01)
    sharded = estimate(model, Layout(1, 1, 8, 1), 4096, fused_attention=True, distributed_optimizer=True, reserve=0)
    assert sharded.optimizer == pytest.approx(one.optimizer / 8, rel=0.01)


def test_recipe_layout_is_the_plans_choice(capsys):
    plan("--gpus", "8", "--seq", "5120")
    chosen = capsys.readouterr().out.splitlines()[-1]
    assert "parallel.tensor_parallel_size=8 parallel.pipeline_parallel_size=1 parallel.data_parallel_size=1" in chosen
    assert "train.micro_batch_prompts=1" in chosen
    recipe = open("recipes/qwen3_8b_h100x8.yaml").read()
    for line in ("tensor_parallel_size: 8", "pipeline_parallel_size: 1", "micro_batch_prompts: 1"):
        assert line in recipe


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "8", "--seq", "9216"], "no layout fits 80 GiB per GPU"),
        (["--gpus", "12", "--gpus-per-node", "8", "--seq", "1024"], "--gpus 12 is not a whole number of nodes"),
        (["--gpus", "7", "--seq", "1024"], "no TP x PP x DP divides"),
    ],
)
def test_refusals_say_why(args, message):
    with pytest.raises(SystemExit) as exit_info:
        plan(*args)
    assert message in str(exit_info.value.code), exit_info.value.code
