"""The optimizer megatron-core builds for the student: which parameters decay."""

from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.config import ParallelConfig, TrainConfig
from opsdc_megatron.train.build import build_training_model


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_norms_do_not_decay_and_matrices_do(one_rank, tmp_path: Path, distributed_optimizer: bool) -> None:
    """megatron groups norms and biases with wd_mult 0, which only its learning-rate scheduler applied."""
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    model = build_training_model(config, str(tmp_path), ParallelConfig(distributed_optimizer=distributed_optimizer), torch.float32,
                                 TrainConfig(weight_decay=0.1), teacher_refresh_every=0)
    groups = model.optimizer.param_groups  # the distributed optimizer's hold flat fp32 shards of its groups
    assert {(g["wd_mult"], g["weight_decay"]) for g in groups} == {(1.0, 0.1), (0.0, 0.0)}
    if not distributed_optimizer:
        decay = {(param.dim(), group["weight_decay"]) for group in groups for param in group["params"]}
        assert decay == {(1, 0.0), (2, 0.1)}, decay  # 1-D: RMSNorm and QK-norm weights; 2-D: every matrix


def test_a_resumed_run_applies_the_decay_again_over_what_a_checkpoint_restores(one_rank, tmp_path: Path) -> None:
    """Loading an optimizer state restores each group's saved decay; checkpoints written before wd_mult was
    applied hold 0.1 for the norms too. (The loop calls apply_weight_decay again after load_checkpoint.)"""
    from opsdc_megatron.train.step import apply_weight_decay

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    model = build_training_model(config, str(tmp_path), ParallelConfig(), torch.float32, TrainConfig(weight_decay=0.1), teacher_refresh_every=0)
    for group in model.optimizer.param_groups:  # as an older run saved them
        group["weight_decay"] = 0.1
    saved = model.optimizer.state_dict()
    apply_weight_decay(model.optimizer, 0.1)
    model.optimizer.load_state_dict(saved)
    assert {g["weight_decay"] for g in model.optimizer.param_groups} == {0.1}
    apply_weight_decay(model.optimizer, 0.1)
    assert {(g["wd_mult"], g["weight_decay"]) for g in model.optimizer.param_groups} == {(1.0, 0.1), (0.0, 0.0)}
