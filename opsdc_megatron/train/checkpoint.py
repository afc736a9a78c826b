"""Checkpoints: megatron dist_checkpointing (torch_dist) of student, optimizer and teacher snapshot.

Layout: <out_dir>/checkpoints/step_000050/ (sharded tensors + trainer_state.json) and a `latest`
file naming the newest complete one. A checkpoint is written to `step_N.tmp/` and renamed when
every rank has finished, so a crash mid-save never leaves a checkpoint that looks complete.
Resume is exact without saved RNG state: every random draw (prompt order, rollout sampling) is
seeded from (train.seed, step), and the teacher's age comes back with the trainer state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from opsdc_megatron.distill.teacher import TeacherSnapshot
from opsdc_megatron.files import write_text_atomic

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


TEACHER_PREFIX = "teacher."
"""Keeps the teacher's tensors apart from the student's in one checkpoint."""


def _sharded_state_dict(ddps: list, optimizer, teacher: TeacherSnapshot, is_loading: bool) -> dict:
    """One entry per model chunk; the tensors' keys carry global layer numbers, so a checkpoint
    saved at one tensor/pipeline/virtual-pipeline layout loads at any other."""
    state = {
        "model": [ddp.module.sharded_state_dict() for ddp in ddps],
        "teacher": [chunk.sharded_state_dict(prefix=TEACHER_PREFIX) for chunk in teacher.model],
    }
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading)
    return state


def save_checkpoint(root: Path, step: int, ddps: list, optimizer, teacher: TeacherSnapshot, trainer_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    `ddps`: this rank's DDP-wrapped student chunks; `teacher.model`: the matching teacher chunks."""
    rank0 = dist.get_rank() == 0
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(ddps, optimizer, teacher, is_loading=False), str(tmp))
    dist.barrier()
    if rank0:
        write_text_atomic(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        write_text_atomic(root / LATEST, final.name)
        complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def latest_checkpoint(root: Path) -> Path | None:
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text(encoding="utf-8").strip()
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"{marker} names {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: Path, ddps: list, optimizer, teacher: TeacherSnapshot) -> dict:
    """Collective: restores student, optimizer and teacher in place; returns the trainer state."""
    loaded = dist_checkpointing.load(_sharded_state_dict(ddps, optimizer, teacher, is_loading=True), str(path))
    for ddp, state in zip(ddps, loaded["model"]):
        ddp.module.load_state_dict(state)
    for chunk, state in zip(teacher.model, loaded["teacher"]):
        chunk.load_state_dict({k.removeprefix(TEACHER_PREFIX): v for k, v in state.items()})
    optimizer.load_state_dict(loaded["optimizer"])
    trainer_state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    teacher.age_steps = trainer_state["teacher_age_steps"]
    return trainer_state
