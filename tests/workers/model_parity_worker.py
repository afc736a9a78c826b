"""Qwen3 on megatron-core vs transformers, at TP=1 and TP=2, in one 2-process launch.

Usage: torchrun --nproc-per-node=2 model_parity_worker.py OUT_DIR

Checks, for tied and untied embeddings:
  1. logits equal the transformers model's (max abs diff <= 1e-5), vocabulary padding excluded;
  2. export_hf_state_dict returns the original HF tensors bit for bit;
  3. one optimizer step (megatron DDP + get_megatron_optimizer AdamW, clip 1.0, through
     get_forward_backward_func) gives the same weights at TP=2 as at TP=1 (within 1e-5);
and, at TP=2, a dist_checkpointing save -> load round trip of model + optimizer, and the
error load_hf_weights gives for a broken state dict.
TP=1 runs with DP=2 on the same batch, so its averaged gradients equal a single rank's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

VOCAB = 101  # odd: padded to 102 at TP=2
BATCH, SEQ = 2, 9
TIES = (True, False)
TOL = 1e-5


def make_hf_models(out: Path) -> None:
    """Tiny random fp32 Qwen3 checkpoints, one per embedding-tie setting."""
    for tied in TIES:
        torch.manual_seed(1234)
        config = Qwen3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=tied,
        )
        model = Qwen3ForCausalLM(config).float()
        # transformers initialises norms to 1; randomise them so that the mapping of every tensor matters
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
        model.save_pretrained(out / hf_dir_name(tied))


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def hf_dir_name(tied: bool) -> str:
    return "tied" if tied else "untied"


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def gather_vocab(local: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from this TP rank's shard, padding stripped."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)[..., :VOCAB]


def positions() -> torch.Tensor:
    return torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)


def check_logits(model: torch.nn.Module, tokens: torch.Tensor, reference: torch.Tensor, tag: str) -> None:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        local = model(tokens, positions(), None)
    assert local.shape == (BATCH, SEQ, padded_vocab_size(VOCAB, tp) // tp), f"{tag}: logits shape {tuple(local.shape)}"
    padding = local[..., padding_vocab_slice(VOCAB)]
    assert torch.all(padding == 0), f"{tag}: padding columns should come from zero rows"
    diff = (gather_vocab(local) - reference).abs().max().item()
    assert diff <= TOL, f"{tag}: logits differ from transformers by {diff:.3e}"
    log(f"[{tag}] logits max abs diff {diff:.2e}")


def check_export(model: torch.nn.Module, original: dict[str, torch.Tensor], tag: str) -> None:
    exported = export_hf_state_dict(model)
    assert exported.keys() == original.keys(), f"{tag}: names {sorted(exported.keys() ^ original.keys())}"
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), f"{tag}: {name} does not round-trip"


def check_load_errors(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> None:
    """A broken HF state dict is rejected with every missing, mis-shaped and unexpected name."""
    broken = dict(original)
    del broken["model.norm.weight"]
    broken["model.layers.0.self_attn.k_proj.weight"] = broken["model.layers.0.self_attn.q_proj.weight"]
    broken["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    try:
        load_hf_weights(model, broken)
    except ValueError as error:
        message = str(error)
    else:
        raise AssertionError("load_hf_weights accepted a broken state dict")
    for expected in (
        "missing: ['model.norm.weight']",
        "model.layers.0.self_attn.k_proj.weight: expected (32, 64), got (64, 64)",
        "unexpected: ['model.layers.9.mlp.up_proj.weight']",
    ):
        assert expected in message, f"load error message lacks {expected!r}:\n{message}"


def loss_func(loss_per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = loss_per_token.mean()
    return loss, {"lm loss": loss.detach()}


def forward_step(data_iterator: Iterator[torch.Tensor], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    """Next-token cross-entropy over the real vocabulary.

    Not GPTModel's own `labels=` loss: that softmax includes the vocabulary padding columns
    (logit 0), so its loss and gradients would depend on the TP size.
    """
    tokens = next(data_iterator)
    labels = torch.roll(tokens, shifts=-1, dims=1)
    logits = model(tokens, positions(), None)
    padding = torch.zeros(logits.shape[-1], dtype=torch.bool)
    padding[padding_vocab_slice(VOCAB)] = True
    logits = logits.masked_fill(padding, float("-inf"))
    return vocab_parallel_cross_entropy(logits, labels), loss_func


def build_trainable(folder: Path, tp: int) -> tuple[DistributedDataParallel, MegatronOptimizer]:
    model = build_gpt_model(folder, tp)
    load_hf_weights(model, folder)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    # A first Adam step moves each weight by lr * g / (|g| + eps): for gradients near 0 that
    # amplifies fp32 reduction-order noise by up to lr / eps. eps = 1e-6 (not 1e-8) keeps that gain
    # at 1e3 so the TP=1 vs TP=2 comparison measures the sharding, not the noise.
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-3, weight_decay=0.01, adam_eps=1e-6, clip_grad=1.0, params_dtype=torch.float32
        ),
        [ddp],
    )
    return ddp, optimizer


def train_one_step(ddp: DistributedDataParallel, optimizer: MegatronOptimizer, tokens: torch.Tensor) -> float:
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=[ddp],
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    assert update_successful
    return grad_norm


def check_checkpoint_round_trip(
    folder: Path, ddp: DistributedDataParallel, optimizer: MegatronOptimizer, ckpt: Path
) -> None:
    """Save model + optimizer with dist_checkpointing, load into fresh objects, compare bitwise."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if dist.get_rank() == 0:
        ckpt.mkdir()
    dist.barrier()
    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}, str(ckpt))

    fresh_ddp, fresh_optimizer = build_trainable(folder, tp)
    fresh_sd = fresh_ddp.module.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": fresh_sd, "optimizer": fresh_optimizer.sharded_state_dict(fresh_sd, is_loading=True)}, str(ckpt)
    )
    fresh_ddp.module.load_state_dict(loaded["model"])
    fresh_optimizer.load_state_dict(loaded["optimizer"])

    for (name, saved), (_, restored) in zip(ddp.module.named_parameters(), fresh_ddp.module.named_parameters()):
        assert torch.equal(saved, restored), f"checkpoint: parameter {name} differs after load"
    saved_state, restored_state = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert saved_state.keys() == restored_state.keys()
    for index, values in saved_state.items():
        for key, value in values.items():
            restored = restored_state[index][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored)), f"checkpoint: optimizer {index}.{key}"


def main(out: Path) -> None:
    torch.set_num_threads(1)
    init_distributed(tensor_parallel_size=1)
    if dist.get_rank() == 0:
        make_hf_models(out)
    dist.barrier()

    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    folders = {tied: out / hf_dir_name(tied) for tied in TIES}
    references = {tied: hf_logits(folders[tied], tokens) for tied in TIES}
    originals = {tied: load_file(folders[tied] / "model.safetensors") for tied in TIES}
    assert ("lm_head.weight" in originals[False]) and ("lm_head.weight" not in originals[True])

    stepped: dict[tuple[int, bool], dict[str, torch.Tensor]] = {}
    for tp in (1, 2):
        if tp == 2:
            parallel_state.destroy_model_parallel()
            init_distributed(tensor_parallel_size=2)
        for tied in TIES:
            tag = f"tp={tp} {hf_dir_name(tied)}"
            ddp, optimizer = build_trainable(folders[tied], tp)
            check_logits(ddp.module, tokens, references[tied], tag)
            check_export(ddp.module, originals[tied], tag)
            grad_norm = train_one_step(ddp, optimizer, tokens)
            stepped[(tp, tied)] = export_hf_state_dict(ddp)
            log(f"[{tag}] grad norm {grad_norm:.6f}")
            if tp == 2 and not tied:
                check_checkpoint_round_trip(folders[tied], ddp, optimizer, out / "ckpt")
                log(f"[{tag}] dist_checkpointing round trip ok")
                check_load_errors(ddp.module, originals[tied])

    for tied in TIES:
        before, tp1, tp2 = originals[tied], stepped[(1, tied)], stepped[(2, tied)]
        moved = max((tp1[n] - before[n]).abs().max().item() for n in before)
        assert moved > 1e-4, f"{hf_dir_name(tied)}: the optimizer step did not change the weights"
        diff = max((tp1[n] - tp2[n]).abs().max().item() for n in before)
        assert diff <= TOL, f"{hf_dir_name(tied)}: TP=2 weights after one step differ from TP=1 by {diff:.3e}"
        log(f"[{hf_dir_name(tied)}] step TP=1 vs TP=2 max abs diff {diff:.2e} (moved {moved:.2e})")
    log("PARITY OK")
    destroy_distributed()


if __name__ == "__main__":
    # Third-party imports live here, not at the top: dist_checkpointing.save starts a "spawn"
    # multiprocessing Manager, which re-runs this file's top level as __mp_main__; with megatron
    # and transformers imported there, the first save took ~11 s longer on 2 cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opsdc_megatron.models.qwen3.model import build_gpt_model, padded_vocab_size, padding_vocab_slice
    from opsdc_megatron.models.qwen3.state_dict_adapter import export_hf_state_dict, load_hf_weights
    from opsdc_megatron.parallel import destroy_distributed, init_distributed

    main(Path(sys.argv[1]))
