"""megatron-core's torch_dist checkpoint format, written in the calling process.

megatron's own writer (`FileSystemWriterAsync`) forks worker processes even for a synchronous
save. The trainer forks them from a process with threads running (megatron's queue feeder, started
just before the fork; tqdm's monitor; TensorBoard's writer), and a child that inherits a lock one of
them held never starts: that rank waits for it forever, and the others in the next barrier (seen in
test_slurm's requeue test). This strategy keeps megatron's translation of the state dict, its
planner and its metadata, so the files are the same and `dist_checkpointing.load` reads them; only
the writer is torch's `FileSystemWriter`, which writes from threads of this process.
"""

from __future__ import annotations

from pathlib import Path

from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan


class InProcessTorchDistSave(TorchDistSaveShardedStrategy):
    """megatron's torch_dist save, synchronous, without forking; pass it as `sharded_strategy`.

    `_replace_state_dict_keys_with_sharded_keys` is private in megatron-core 0.16 and 0.19 alike.
    Subclasses change the writer or the planner (the converter streams tensors from HF files).
    """

    def __init__(self) -> None:
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict: dict, checkpoint_dir: Path) -> None:
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        dcp.save(mcore_to_pyt_state_dict(by_key, is_loading=False), storage_writer=self.writer(checkpoint_dir), planner=self.planner())

    def writer(self, checkpoint_dir: Path) -> dcp.FileSystemWriter:
        return dcp.FileSystemWriter(checkpoint_dir, sync_files=True)

    def planner(self) -> MCoreSavePlanner:
        return PlansInMetadataPlanner()


class PlansInMetadataPlanner(MCoreSavePlanner):
    """megatron's save planner, keeping the ranks' plans in the metadata as megatron's save does
    (its metadata reuse reads them)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False)  # as megatron's strategy

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        plans, metadata = super().create_global_plan(all_plans)
        metadata.all_local_plans = all_plans
        return plans, metadata
