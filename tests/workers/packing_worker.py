"""Packed (thd) against padded micro-batches with the sdpa attention backend, for tests/test_packing.py.

Usage: torchrun --nproc-per-node=2 packing_worker.py OUT

On 2 processes, three layouts in turn: TP2, TP1 x DP2, PP2 (1F1B). At each, the same 8 rollouts of
varied lengths (tests/workers/pipeline_worker.py's) are scored twice, from the same weights:
right-padded and packed into one row per stream. Written from global rank 0 to OUT/<layout>.pt:

* per_token: the reverse KL at every response token, for micro-batches of 3 sequences in both
  layouts (same groups, so token for token), before any step (PP=1 layouts);
* losses, grad norms and exported HF weights after STEPS optimizer steps on the micro-batches that
  `opsdc train` builds with a token budget: the padded and packed groupings differ (padding counts
  against the budget only when padded), which the per-token mean over the step must not notice.
  At TP2 also packed with `distill.fused_output_layer`, and padded and packed with every stream
  padded to a multiple of 16 tokens (what FP8 needs). PP2 interleaved, packed with a budget that
  makes 3 micro-batches, split to 4 for the schedule, is compared with PP2's padded steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from transformers import Qwen3Config

from opsdc_megatron.config import ParallelConfig
from opsdc_megatron.distill.batch import make_micro_batch, micro_batches_for_rank
from opsdc_megatron.distill.forward import make_forward_step
from opsdc_megatron.loss import vocab_parallel_reverse_kl
from opsdc_megatron.models.qwen3.state_dict_adapter import export_hf_state_dict
from opsdc_megatron.parallel import destroy_distributed, init_distributed
from opsdc_megatron.train.build import build_training_model
from opsdc_megatron.train.step import optimizer_step
from pipeline_worker import PAD, SEQUENCES, TRAIN, VOCAB, make_models, rollouts

STEPS = 2
MICRO_BATCH_TOKENS = 85  # these rollouts: 5 padded micro-batches (1 or 2 sequences), 4 packed (2 each)
INTERLEAVED_MICRO_BATCH_TOKENS = 120  # 3 packed micro-batches, one split in two for PP2: 4
PER_TOKEN_GROUP = 3  # sequences per micro-batch in the token-for-token comparison


def per_token_divergence(stage, sequences, packed: bool) -> torch.Tensor:
    """Reverse KL at each response token of `sequences`, in order, without a step."""
    values = []
    with torch.no_grad():
        for start in range(0, len(sequences), PER_TOKEN_GROUP):
            batch = make_micro_batch(sequences[start : start + PER_TOKEN_GROUP], PAD, packed=packed)
            student, teacher = stage(batch)
            per_token = vocab_parallel_reverse_kl(student, teacher, parallel_state.get_tensor_model_parallel_group())
            values.append(per_token[batch.response_mask.bool()])
    return torch.cat(values)


def run(
    out: Path, name: str, tp: int, pp: int, packed: bool, fused_output_layer: bool = False, vp: int = 1, token_multiple: int = 1,
    sequence_parallel: bool = False,
) -> dict:
    """Per-token divergences (PP=1), then STEPS optimizer steps, from the initial weights."""
    init_distributed(tp, pp, seed=0, virtual_pipeline_chunks=vp)
    try:
        dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        hf_dir = out / "tied"
        model = build_training_model(
            Qwen3Config.from_pretrained(hf_dir), str(hf_dir),
            ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, virtual_pipeline_chunks=vp, data_parallel_size=dp_size,
                           sequence_parallel=sequence_parallel),
            torch.float32, TRAIN, 0, model_options={"attention_backend": "sdpa"}, fused_output_layer=fused_output_layer,
        )
        sequences = rollouts(SEQUENCES, VOCAB, (3, 12), (1, 14), seed=5)
        result = {}
        if pp == 1 and not fused_output_layer and not sequence_parallel:
            result["per_token"] = per_token_divergence(model.stages[0], sequences, packed)
        interleaved_pipeline_size = pp if vp > 1 else 0
        budget = INTERLEAVED_MICRO_BATCH_TOKENS if interleaved_pipeline_size else MICRO_BATCH_TOKENS
        micro_batches = micro_batches_for_rank(
            sequences, dp_rank, dp_size, 1, budget, PAD, packed, interleaved_pipeline_size, token_multiple,
        )
        assert all((b.student_packing is not None) == packed for b in micro_batches)
        forward_step = make_forward_step("reverse_kl", fused_output_layer)
        steps = [optimizer_step(model.stages, model.optimizer, forward_step, micro_batches) for _ in range(STEPS)]
        result.update(
            losses=[s.loss for s in steps], grad_norms=[s.grad_norm for s in steps],
            micro_batches=len(micro_batches), weights=export_hf_state_dict(model.student),
        )
        if dist.get_rank() == 0:
            print(f"{name}: losses {result['losses']}, grad norms {result['grad_norms']}, "
                  f"{len(micro_batches)} micro-batches on rank 0", flush=True)
        return result
    finally:
        parallel_state.destroy_model_parallel()


def main() -> None:
    out = Path(sys.argv[1])
    init_distributed(1, 1, seed=0)  # the process group, for the barrier
    parallel_state.destroy_model_parallel()
    try:
        if dist.get_rank() == 0:
            make_models(out)
        dist.barrier()
        for layout, tp, pp in (("tp2", 2, 1), ("tp1_dp2", 1, 1), ("pp2", 1, 2)):
            results = {"padded": run(out, f"{layout} padded", tp, pp, packed=False),
                       "packed": run(out, f"{layout} packed", tp, pp, packed=True)}
            if layout == "tp2":
                results["packed_fused_output_layer"] = run(out, f"{layout} packed fused", tp, pp, True, fused_output_layer=True)
                for fused in (False, True):  # streams padded to a multiple of TP: each rank holds half of the tokens
                    results[f"packed{'_fused_output_layer' if fused else ''}_sequence_parallel"] = run(
                        out, f"{layout} packed{' fused' if fused else ''} sequence-parallel", tp, pp, True, fused_output_layer=fused,
                        token_multiple=tp, sequence_parallel=True,
                    )
                for packed in (False, True):
                    results[f"{'packed' if packed else 'padded'}_aligned"] = run(
                        out, f"{layout} {'packed' if packed else 'padded'} aligned to 16", tp, pp, packed, token_multiple=16,
                    )
            if layout == "pp2":
                interleaved = {"padded": results["padded"], "packed": run(out, "pp2 interleaved packed", tp, pp, True, vp=2)}
            if dist.get_rank() == 0:
                torch.save(results, out / f"{layout}.pt")
                if layout == "pp2":
                    torch.save(interleaved, out / "pp2_interleaved.pt")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
