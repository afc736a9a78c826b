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


def test_a_resumed_run_takes_the_recipes_optimizer_settings_over_what_a_checkpoint_restores(one_rank, tmp_path: Path) -> None:
    """Loading an optimizer state restores each group's saved learning rate, betas, eps and decay: a run
    resumed with a lower `train.lr` kept training at the old one while its config.yaml said the new one,
    and checkpoints written before wd_mult was applied hold 0.1 for the norms too. (The loop calls
    apply_optimizer_settings again after load_checkpoint.)"""
    from opsdc_megatron.train.step import apply_optimizer_settings

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    first = TrainConfig(lr=1e-3, adam_beta2=0.999, adam_eps=1e-8, weight_decay=0.1)
    model = build_training_model(config, str(tmp_path), ParallelConfig(), torch.float32, first, teacher_refresh_every=0)
    for group in model.optimizer.param_groups:  # as an older run saved them
        group["weight_decay"] = 0.1
    saved = model.optimizer.state_dict()
    resumed = TrainConfig(lr=1e-5, adam_beta2=0.95, adam_eps=1e-6, weight_decay=0.05)
    apply_optimizer_settings(model.optimizer, resumed)
    model.optimizer.load_state_dict(saved)  # megatron-core 0.19 finds the saved groups by max_lr/min_lr: kept as built
    assert {(g["lr"], g["betas"][1], g["weight_decay"]) for g in model.optimizer.param_groups} == {(1e-3, 0.999, 0.1)}
    apply_optimizer_settings(model.optimizer, resumed)
    settings = {(g["wd_mult"], g["weight_decay"], g["lr"], g["betas"], g["eps"]) for g in model.optimizer.param_groups}
    assert settings == {(1.0, 0.05, 1e-5, (0.9, 0.95), 1e-6), (0.0, 0.0, 1e-5, (0.9, 0.95), 1e-6)}


@pytest.mark.parametrize(("params_dtype", "distributed_optimizer"), [(torch.float32, False), (torch.bfloat16, True)])
def test_nan_gradients_stop_the_step_before_the_update(one_rank, tmp_path: Path, params_dtype: torch.dtype, distributed_optimizer: bool) -> None:
    """megatron's optimizer skips non-finite gradients only under a loss scaler; without one the nan
    reached the weights, which the run then pushed, saved and exported."""
    from opsdc_megatron.distill.batch import ScoredSequence, micro_batches_for_rank
    from opsdc_megatron.distill.forward import make_forward_step
    from opsdc_megatron.train.step import optimizer_step

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    model = build_training_model(config, str(tmp_path), ParallelConfig(distributed_optimizer=distributed_optimizer), params_dtype,
                                 TrainConfig(), teacher_refresh_every=0)
    forward_step = make_forward_step("reverse_kl")

    def nan_loss(data_iterator, stage):
        output, loss = forward_step(data_iterator, stage)
        return output, lambda per_token: loss(per_token * float("nan"))

    micro_batches = micro_batches_for_rank([ScoredSequence([1, 2, 3], [1, 4, 2, 3], [5, 6, 7])] * 2, 0, 1, 2, 0, 0)
    before = {name: param.detach().clone() for name, param in model.student[0].named_parameters()}
    with pytest.raises(FloatingPointError, match="non-finite gradients"):
        optimizer_step(model.stages, model.optimizer, nan_loss, micro_batches)
    assert all(torch.equal(param, before[name]) for name, param in model.student[0].named_parameters())
    result = optimizer_step(model.stages, model.optimizer, forward_step, micro_batches)  # a finite step still trains
    assert result.response_tokens == 6 and any(not torch.equal(p, before[n]) for n, p in model.student[0].named_parameters())


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_the_step_trains_the_divergence_it_is_given(one_rank, tmp_path: Path, divergence: str) -> None:
    """distill.divergence picks what the forward step returns (recipes/toy_cpu_forward_kl.yaml is the
    forward-KL ablation): the per-token values equal the float64 reference of that direction on the
    stage's own logits, and not the other direction's."""
    from opsdc_megatron.distill.batch import ScoredSequence, micro_batches_for_rank
    from opsdc_megatron.distill.forward import make_forward_step
    from tests.workers.kl_worker import reference_kl, rel_err

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    model = build_training_model(config, str(tmp_path), ParallelConfig(), torch.float32, TrainConfig(), teacher_refresh_every=0)
    stage = model.stages[0]
    with torch.no_grad():  # a teacher unlike the student, so the two directions differ
        for param in stage.teacher.parameters():
            param.add_(0.5 * torch.randn_like(param))
    (batch,) = micro_batches_for_rank([ScoredSequence([1, 2, 3], [1, 4, 2, 3], [5, 6, 7, 8])], 0, 1, 1, 0, 0)
    with torch.no_grad():
        student_logits, teacher_logits = stage(batch)
        per_token, _ = make_forward_step(divergence)(iter([batch]), stage)
    flat = [logits.reshape(-1, logits.shape[-1]) for logits in (student_logits, teacher_logits)]
    mask = batch.response_mask.reshape(-1).bool()
    got = per_token.reshape(-1)[mask]
    direction, other = ("forward", "reverse") if divergence == "forward_kl" else ("reverse", "forward")
    want = reference_kl(*flat, direction)[0][mask]
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, reference_kl(*flat, other)[0][mask]) > 1e-2


def test_the_finite_check_of_the_gradients_never_copies_a_whole_buffer() -> None:
    """`grads.sum(dtype=torch.float64)` converted the whole fp32 buffer first: a 27 GiB fp64 copy per step on a
    Qwen3-14B rank at TP=4. Measured with torch's memory profiler on a 128 MiB buffer (the largest allocation of
    any op), and a nan or inf in any chunk still shows."""
    from torch.profiler import ProfilerActivity, profile

    from opsdc_megatron.train.step import FINITE_CHECK_CHUNK_ELEMENTS, finite_check_sum

    grads = torch.randn(2 * FINITE_CHECK_CHUNK_ELEMENTS + 5)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as whole:
        grads.sum(dtype=torch.float64)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as chunked:
        total = finite_check_sum(grads)
    largest = lambda prof: max(event.cpu_memory_usage for event in prof.events())  # noqa: E731
    assert largest(whole) >= 8 * grads.numel(), "the measurement sees the copy it guards against"
    assert largest(chunked) <= 8 * FINITE_CHECK_CHUNK_ELEMENTS
    assert total.item() == pytest.approx(grads.double().sum().item(), rel=1e-9)
    for index, bad in ((3, float("nan")), (grads.numel() - 1, float("inf"))):
        broken = grads.clone()
        broken[index] = bad
        assert not torch.isfinite(finite_check_sum(broken))
