"""The teacher: a snapshot of the student, sharded like it, hard-copied every M optimizer steps.

M = `distill.teacher_refresh_every` (paper default 50; 0 = frozen at the initial weights). M = 1 is
the live teacher that collapses in the paper. Copies are local: teacher and student parameters are
the same shards on the same rank, so a refresh needs no communication. With `offload` the teacher's
weights live in host memory and are streamed to the device layer by layer (`teacher_offload.py`);
a refresh is then a device-to-host copy.
"""

from __future__ import annotations

import torch

from opsdc_megatron.distill.teacher_offload import TeacherWeightStream

TEACHER_PREFIX = "teacher."
"""Keeps the teacher's tensors apart from the student's in one training checkpoint."""


class TeacherSnapshot:
    """`model`: a ModuleList of this rank's teacher chunks (GPTModels). `offload`: keep their weights
    in host memory, one `TeacherWeightStream` per chunk in `streams`; `stream_output_layer` false when
    the loss applies the output layer itself (distill.fused_output_layer)."""

    def __init__(self, model: torch.nn.ModuleList, refresh_every: int, offload: bool = False, stream_output_layer: bool = True) -> None:
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.streams: list[TeacherWeightStream | None] = [
            TeacherWeightStream(chunk, stream_output_layer) if offload else None for chunk in self.model
        ]
        self.refresh_every = refresh_every
        self.age_steps = 0
        """Optimizer steps since the last copy (saved in checkpoints so resume keeps the cadence)."""
        self.saved_as: str | None = None
        """The checkpoint folder holding this snapshot since its last copy (train/checkpoint.py), if one does."""

    @torch.no_grad()
    def copy_from(self, student: torch.nn.Module) -> None:
        teacher_params = dict(self.model.named_parameters())
        student_params = dict(student.named_parameters())
        if teacher_params.keys() != student_params.keys():
            raise ValueError("teacher and student are not the same architecture")
        for name, parameter in teacher_params.items():
            parameter.copy_(student_params[name])
        for teacher_chunk, student_chunk in zip(self.model, student):
            # Rotary frequencies are computed where a model is built; a teacher built in host memory
            # (offload) would rotate by CPU-rounded ones. Not parameters, never changed: share them.
            # (A GPTModel has `rotary_pos_emb` only with RoPE position embeddings.)
            if hasattr(teacher_chunk, "rotary_pos_emb"):
                teacher_chunk.rotary_pos_emb.inv_freq = student_chunk.rotary_pos_emb.inv_freq
        self.age_steps, self.saved_as = 0, None

    def after_optimizer_step(self, student: torch.nn.Module) -> bool:
        """Ages the snapshot by one step and refreshes it when due; returns whether it did."""
        self.age_steps += 1
        if self.refresh_every and self.age_steps >= self.refresh_every:
            self.copy_from(student)
            return True
        return False
