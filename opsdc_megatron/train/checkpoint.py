"""Checkpoints: megatron dist_checkpointing (torch_dist) of student, optimizer and teacher snapshot.

Layout: <out_dir>/checkpoints/step_000050/ (sharded tensors + trainer_state.json) and a `latest`
file naming the newest complete one. A checkpoint is written to `step_N.tmp/` and renamed when
every rank has finished, so a crash mid-save never leaves a checkpoint that looks complete.
The teacher changes only every M steps (distill.teacher_refresh_every), so it has folders of its
own, `teacher_step_<refreshed>_saved_<step>/`, written by the first save after each refresh and
named in the trainer state of every checkpoint that uses it (the paper's M = 50 with a save every
10 steps writes it once in five saves: an eighth of a bf16 checkpoint with fp32 Adam state each
time); a teacher folder no complete checkpoint names goes at the next save. Checkpoints from before
this layout hold the teacher themselves and still load.
Resume is exact without saved RNG state: every random draw (prompt order, rollout sampling) is
seeded from (train.seed, step), and the teacher's age comes back with the trainer state.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from opsdc_megatron.convert.megatron_to_hf import TRAINING_STATE_PREFIXES, check_vocabulary_padding, read_failure
from opsdc_megatron.distill.teacher import TEACHER_PREFIX, TeacherSnapshot
from opsdc_megatron.files import fsync_folder, write_text_atomic
from opsdc_megatron.models.hf_folder import replace_folder
from opsdc_megatron.models.transformer_engine import keep_as_fp8_initial_value
from opsdc_megatron.torch_dist_save import InProcessTorchDistSave
from opsdc_megatron.train.run_folder import BEST_EXPORT, LATEST, TRAINER_STATE, complete_checkpoints, step_of


TEACHER_CHECKPOINT = "teacher_checkpoint"
"""The trainer-state key naming the teacher folder of a checkpoint (beside it, in the same root)."""


def _teacher_sharded_state_dict(teacher: TeacherSnapshot) -> dict:
    return {"teacher": [chunk.sharded_state_dict(prefix=TEACHER_PREFIX) for chunk in teacher.model]}


def _sharded_state_dict(ddps: list, optimizer, is_loading: bool) -> dict:
    """One entry per model chunk; the tensors' keys carry global layer numbers, so a checkpoint
    saved at one tensor/pipeline/virtual-pipeline/data-parallel layout loads at any other.

    Except the distributed optimizer's state: its "dp_reshardable" format loads at another
    data-parallel size only. Its layout-free formats fail with
    torch's Adam (no apex or Transformer Engine) in megatron-core 0.16.1: "fully_reshardable" on the
    per-parameter "step", "fully_sharded_model_space" on flattened ranges.
    """
    state = {"model": [ddp.module.sharded_state_dict() for ddp in ddps]}
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
    )
    return state


def save_checkpoint(root: Path, step: int, ddps: list, optimizer, teacher: TeacherSnapshot, trainer_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    `ddps`: this rank's DDP-wrapped student chunks; `teacher.model`: the matching teacher chunks, written
    to a teacher folder of their own unless one saved since the last refresh holds them (`teacher.saved_as`)."""
    rank0 = dist.get_rank() == 0
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    teacher_folder = None
    if not teacher.saved_as:  # named by rank 0 for all: the ranks may see the file system at different moments
        name = [_new_teacher_name(root, step - teacher.age_steps, step) if rank0 else None]
        dist.broadcast_object_list(name, src=0)
        teacher_folder = root / name[0]
    if rank0:
        # This step's, those of saves killed before their rename (a stop's save, redone never), each a whole checkpoint,
        # teachers such saves left unfinished, and what a deletion of an old checkpoint killed midway left
        for unfinished in [*root.glob("step_*.tmp"), *root.glob("teacher_step_*.tmp"), *root.glob("step_*.old")]:
            shutil.rmtree(unfinished, ignore_errors=True)
        tmp.mkdir(parents=True)
        if teacher_folder is not None:
            _unfinished(teacher_folder).mkdir()
    dist.barrier()
    state = _sharded_state_dict(ddps, optimizer, is_loading=False)
    dist_checkpointing.save(state, str(tmp), sharded_strategy=InProcessTorchDistSave())  # megatron's own writer forks
    if teacher_folder is not None:
        dist_checkpointing.save(_teacher_sharded_state_dict(teacher), str(_unfinished(teacher_folder)), sharded_strategy=InProcessTorchDistSave())
    dist.barrier()
    if rank0:
        if teacher_folder is not None:
            fsync_folder(_unfinished(teacher_folder), files=True)
            _unfinished(teacher_folder).rename(teacher_folder)
        fsync_folder(tmp, files=True)  # megatron's common.pt and metadata.json are not synced: the marker below must not precede them
        record_trainer_state(tmp, {**trainer_state, TEACHER_CHECKPOINT: teacher_folder.name if teacher_folder else teacher.saved_as})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        write_text_atomic(root / LATEST, final.name)
        # Only checkpoints older than this one: a later step can be on disk when a save was stopped
        # before its marker and the run resumed from the one before (it is replaced when reached).
        older = [p for p in complete_checkpoints(root) if step_of(p) < step]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            # Renamed first: a deletion cut short leaves no step folder that looks complete but lacks shards.
            # What cannot be deleted now (a file an `opsdc eval` holds open on NFS) goes at a later save.
            gone = old.rename(old.with_name(old.name + ".old"))
            shutil.rmtree(gone, ignore_errors=True)
        _remove_unnamed_teachers(root)
    if teacher_folder is not None:
        teacher.saved_as = teacher_folder.name
    dist.barrier()
    return final


def _unfinished(folder: Path) -> Path:
    return folder.with_name(folder.name + ".tmp")


def _new_teacher_name(root: Path, refreshed_step: int, step: int) -> str:
    """A name no folder in `root` has: a save of the same step redone (a resume from an earlier checkpoint) writes
    another teacher beside the one a checkpoint of the abandoned run may still name."""
    base = name = f"teacher_step_{refreshed_step:06d}_saved_{step:06d}"
    attempt = 1
    while (root / name).exists():
        attempt += 1
        name = f"{base}_{attempt}"
    return name


def _remove_unnamed_teachers(root: Path) -> None:
    """Teacher folders that no complete checkpoint names (rank 0, after a save's pruning). A trainer state that cannot
    be read (edited by hand) could name any of them: then all stay, and this says why (an error here, on rank 0
    alone, would leave the other ranks waiting at the save's last barrier)."""
    named = set()
    for checkpoint in complete_checkpoints(root):
        try:
            named.add(json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8")).get(TEACHER_CHECKPOINT))
        except (OSError, ValueError, AttributeError) as error:
            print(f"opsdc train: {checkpoint / TRAINER_STATE}: {error}; no teacher folder is removed", file=sys.stderr, flush=True)
            return
    for folder in root.glob("teacher_step_*"):
        if folder.name not in named and not folder.name.endswith(".tmp"):
            shutil.rmtree(folder, ignore_errors=True)


def best_candidate(out: Path, step: int) -> Path:
    """Where the export of an eval's new best waits until a checkpoint records that eval (settle_best_export)."""
    return out / f"{BEST_EXPORT}.step_{step:06d}"


_CANDIDATE = re.compile(rf"{BEST_EXPORT}\.step_(\d{{6}})(\.tmp|\.old)?")
"""A candidate's folder as best_candidate names it, or its save's unfinished `.tmp` / `.old`: other names are the user's."""


def settle_best_export(out: Path, best: dict | None) -> None:
    """best_hf is the export of the best eval that a checkpoint recorded (trainer state `best`): that eval's
    candidate replaces it; the other candidates go, evals of steps no checkpoint recorded (a run that
    resumes from an earlier checkpoint redoes them, and may score them otherwise). `best` None: drop them all."""
    best_step = best["step"] if best else None
    for candidate in sorted(out.glob(f"{BEST_EXPORT}.step_*")):
        name = _CANDIDATE.fullmatch(candidate.name)
        if name is None or not candidate.exists():
            continue
        if name.group(2) is None and int(name.group(1)) == best_step:
            replace_folder(candidate, out / BEST_EXPORT)
        else:
            shutil.rmtree(candidate, ignore_errors=True)


def record_trainer_state(checkpoint: Path, trainer_state: dict) -> None:
    """Writes a checkpoint's trainer state (rank 0), the last file of a save; also rewritten after a resume when
    the eval a stop deferred, redone, belongs to that checkpoint's step and no later step saves one."""
    write_text_atomic(checkpoint / TRAINER_STATE, json.dumps(trainer_state, indent=2))


def _create_distributed_optimizer_state(optimizer) -> None:
    """A fresh DistributedOptimizer has no per-parameter state yet, and with torch's Adam (no apex
    or Transformer Engine) its state_dict() reads the step count from that state: megatron's own
    dummy-value initialisation (a zero-gradient step whose results the load overwrites) creates it."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """torch Adam's per-parameter step counts after megatron-core's distributed optimizer loaded them.

    Its `load_state_dict` sets every parameter's step to ONE tensor holding the checkpoint's count
    (saved in the param groups), then copies the "dp_reshardable" parameter state over it, step
    included, and that step is the placeholder state's (1, from the dummy step that created it): a
    resume after step N > 1 would continue with Adam's bias correction of step 2 (measured: a resume
    after step 2 ended 1.6e-4 away from the uninterrupted run). The param groups still hold the
    checkpoint's count; each parameter gets its own tensor of it (Adam increments steps in place, so
    a shared one would advance once per parameter)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer):
            for group in (g for g in inner.optimizer.param_groups if "step" in g):  # torch Adam's groups
                for param in group["params"]:
                    state = inner.optimizer.state.get(param)
                    if state and "step" in state:
                        state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype, device=state["step"].device)


def _saved_param_groups(saved_optimizer: dict) -> list[dict]:
    """The param groups of an optimizer's loaded state: torch's own, under megatron's wrappers'
    "optimizer" key, or of each optimizer of a megatron ChainedOptimizer, by index."""
    if "param_groups" in saved_optimizer:
        return saved_optimizer["param_groups"]
    if "optimizer" in saved_optimizer:
        return _saved_param_groups(saved_optimizer["optimizer"])
    return [group for index in sorted(saved_optimizer) for group in _saved_param_groups(saved_optimizer[index])]


def _take_saved_lr_bounds(path: Path, optimizer, saved_optimizer: dict) -> None:
    """megatron-core 0.19 finds the saved param groups by their max_lr/min_lr, so a run resumed with
    another train.lr (whose groups are built with other bounds) would be refused: the groups take the
    checkpoint's bounds, in order, before the load (the loop then applies the new rate to `lr`)."""
    saved_groups = _saved_param_groups(saved_optimizer)
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"{path}: the checkpoint's optimizer has {len(saved_groups)} param groups, this run's has {len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group["max_lr"], group["min_lr"] = saved["max_lr"], saved["min_lr"]


def load_checkpoint(path: Path, ddps: list, optimizer, teacher: TeacherSnapshot) -> dict:
    """Collective: restores student, optimizer and teacher in place; returns the trainer state."""
    _create_distributed_optimizer_state(optimizer)
    trainer_state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    teacher_folder = path.parent / trainer_state[TEACHER_CHECKPOINT] if trainer_state.get(TEACHER_CHECKPOINT) else path  # older: inside
    found = [(teacher_folder / "metadata.json").is_file()]
    dist.broadcast_object_list(found, src=0)  # rank 0's answer for all: a rank that alone raised would leave the others in the load
    if not found[0]:
        raise FileNotFoundError(f"{path}: its teacher's folder {teacher_folder} is missing or incomplete")
    try:
        loaded = dist_checkpointing.load(_sharded_state_dict(ddps, optimizer, is_loading=True), str(path))
        loaded_teacher = dist_checkpointing.load(_teacher_sharded_state_dict(teacher), str(teacher_folder))
    except (CheckpointingException, CheckpointException) as error:  # torch's wraps each rank's
        cause = read_failure(error)
        if "optimizer.distributed" in str(cause):
            raise ValueError(
                f"{path}: its distributed-optimizer state is stored gradient bucket by gradient bucket, and this run's "
                f"buckets differ: resume with the parallel.tensor_parallel_size, pipeline_parallel_size, "
                f"virtual_pipeline_chunks, overlap_grad_reduce and grad_reduce_bucket_elements it was saved with "
                f"(megatron: {str(cause)[:300]})"
            ) from None
        raise
    for ddp, state in zip(ddps, loaded["model"]):
        ddp.module.load_state_dict(state)
    for chunk, state in zip(teacher.model, loaded_teacher["teacher"]):
        chunk.load_state_dict({k.removeprefix(TEACHER_PREFIX): v for k, v in state.items()})
    _take_saved_lr_bounds(path, optimizer, loaded["optimizer"])
    with torch.no_grad():  # the distributed optimizer copies into views of fp32 parameters
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    teacher.age_steps = trainer_state["teacher_age_steps"]
    teacher.saved_as = trainer_state.get(TEACHER_CHECKPOINT)  # None (an older checkpoint): the next save writes it
    return trainer_state


def load_model_weights(path: Path, chunks: list) -> None:
    """Collective: this rank's model chunks' weights from a torch_dist checkpoint of any TP/PP layout,
    in place (all chunks in one load, so that every model tensor of the checkpoint is read by some chunk).

    The checkpoint may hold only the model (`opsdc convert hf-to-megatron`) or be a training
    checkpoint (its student is read; optimizer and teacher are ignored).

    Raises:
        ValueError: the checkpoint is of another model: it lacks a tensor the model has, holds a
            model tensor the model has no place for (an untied output layer for a tied config, QK-norms
            for a config without them), or a larger vocabulary (`check_vocabulary_padding`).
    """
    check_vocabulary_padding(path, chunks[0].hf_vocab_size)
    sharded = {f"chunk{index}": chunk.sharded_state_dict() for index, chunk in enumerate(chunks)}
    # RETURN_ALL: (state, checkpoint tensors no rank asked for, asked-for tensors the checkpoint lacks)
    try:
        loaded, not_read, absent = dist_checkpointing.load(sharded, str(path), strict=StrictHandling.RETURN_ALL)
    except (CheckpointingException, CheckpointException) as error:  # torch's (a BaseException) wraps each rank's
        cause = read_failure(error)
        if isinstance(cause, CheckpointingException):  # e.g. "Global shape mismatch": another model's tensor
            raise ValueError(f"{path}: not a checkpoint of this model config: {cause}") from None
        raise RuntimeError(f"{path}: reading the checkpoint failed: {cause}") from None
    # Layers' _extra_state (Transformer Engine's FP8 metadata) holds no weights; TE and local layers differ in it.
    not_read = {key for key in not_read if not key.startswith(TRAINING_STATE_PREFIXES) and "_extra_state" not in key}
    absent = {key for key in absent if "_extra_state" not in key}
    if not_read or absent:
        raise ValueError(
            f"{path}: not a checkpoint of this model config: "
            + "; ".join(f"{what}: {sorted(keys)}" for what, keys in (("missing", absent), ("no place for", not_read)) if keys)
        )
    for index, chunk in enumerate(chunks):
        state = loaded[f"chunk{index}"]
        # Not strict: a layer's _extra_state that the checkpoint lacks (made with local layers, loaded into
        # TE's) stays as built; every weight was checked above.
        chunk.load_state_dict(state, strict=False)
        with torch.no_grad():
            for name, param in chunk.named_parameters():
                keep_as_fp8_initial_value(param, state[name])
