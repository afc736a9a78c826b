"""Teacher and student through one pipeline: a model chunk that runs both streams of a micro-batch.

With pipeline parallelism both forwards travel through megatron-core's schedules (1F1B and
interleaved) together. Each rank holds, per model chunk, the student's layers (wrapped in megatron
DDP, trained) and the teacher's copy of the same layers (no gradient). A micro-batch travels between
stages as ONE tensor, ``[student tokens + teacher tokens, rows, hidden]``: the student's hidden
states, then the teacher's, concatenated along the sequence axis (the teacher's prompt is longer by
the instruction, so the two streams differ in length; concatenating along the sequence instead of
the batch axis pads neither). Rows are the sequences when padded, or one row per stream when the
micro-batch is packed (distill/batch.py); each stage passes the micro-batch's `PackedSeqParams` to
its GPTModel chunks, which apply RoPE and attention per sequence. megatron's p2p sends one tensor
per micro-batch and, with ``variable_seq_lengths``, its shape first, so each micro-batch may have
its own lengths.

Memory and compute of the teacher half:

* it runs under ``torch.no_grad`` and is detached before the concatenation, so it keeps no
  activations, and the backward of a stage never enters it (the gradient received for the teacher
  half of the stream is zero and is dropped at the concatenation);
* on the last stage the teacher's logits at response positions exist from the forward of a
  micro-batch until its backward, which 1F1B (and PP=1) runs right after the forward on that stage:
  one micro-batch of teacher logits at a time, however many micro-batches a step has (measured in
  tests/test_pipeline.py). A design that scores the teacher for the whole step before the student
  would hold all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.utils import get_attr_wrapped_model

from opsdc_megatron.distill.batch import MicroBatch
from opsdc_megatron.distill.teacher_offload import TeacherWeightStream
from opsdc_megatron.models.qwen3.model import padding_vocab_slice


def _stream_inputs(batch: MicroBatch, side: str) -> dict:
    """GPTModel.forward's inputs for the "student" or "teacher" stream (with the packed sequences'
    boundaries when packed)."""
    return dict(input_ids=getattr(batch, f"{side}_tokens"), position_ids=getattr(batch, f"{side}_positions"),
                attention_mask=None, packed_seq_params=getattr(batch, f"{side}_packing"))


def pick_response_logits(logits: torch.Tensor, logit_index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """This rank's vocabulary shard of the logits that predict each response token.

    `logit_index` is [sequences, response tokens]; with one packed row, every sequence reads it.

    The vocabulary padding columns are set to -inf so they carry no probability mass.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    picked = logits[rows, logit_index]
    picked[..., padding_vocab_slice(vocab_size)] = float("-inf")
    return picked


@contextmanager
def _output_layer_bypassed(gpt: GPTModel) -> Iterator[None]:
    """Within the block, GPTModel.forward returns its final hidden states [b, s, H] as "logits"."""
    gpt.output_layer.forward = lambda hidden, weight=None, runtime_gather_output=None: (hidden, None)
    try:
        yield
    finally:
        del gpt.output_layer.forward


def _output_weight(gpt: GPTModel) -> torch.Tensor:
    """This rank's shard of the output weight (the embedding when tied)."""
    return gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else gpt.output_layer.weight


def pick_response_hidden(hidden: torch.Tensor, logit_index: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[sequences * response tokens, H]`` that predict each response token."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    picked = hidden[rows, logit_index]
    return picked.reshape(-1, picked.shape[-1])


class DistillStage(torch.nn.Module):
    """One model chunk of student and teacher, as megatron's schedules see a model chunk.

    The student chunk is ``module`` (megatron finds ``config``, ``model_type`` and the like by
    unwrapping ``.module``); `set_input_tensor` takes the received stream and `forward` returns the
    stream to send on, or, on the last stage, the (student, teacher) logits at response positions;
    with ``fused_output_layer`` instead (student hidden, student output weight, teacher hidden,
    teacher output weight) at response positions, for `loss.fused_output_reverse_kl`.
    `teacher_stream`: the teacher chunk's weights are streamed from host memory (distill.teacher_offload).
    """

    def __init__(
        self, student: torch.nn.Module, teacher: GPTModel, vocab_size: int, fused_output_layer: bool = False,
        teacher_stream: TeacherWeightStream | None = None,
    ) -> None:
        super().__init__()
        self.module = student
        self.teacher = teacher
        self.teacher_stream = teacher_stream
        self.vocab_size = vocab_size
        self.fused_output_layer = fused_output_layer
        self.is_last_stage: bool = get_attr_wrapped_model(student, "post_process")
        self._received: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | list[torch.Tensor | None] | None) -> None:
        self._received = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, batch: MicroBatch) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self._received is not None:  # not the first stage: split the stream back into its halves
            student_length = batch.student_tokens.shape[1]
            get_attr_wrapped_model(self.module, "set_input_tensor")(self._received[:student_length])
            self.teacher.set_input_tensor(self._received[student_length:].detach())
        if self.is_last_stage and self.fused_output_layer:
            return self._fused_outputs(batch)
        with torch.no_grad():
            teacher_out = self.teacher(**_stream_inputs(batch, "teacher"))
            if self.is_last_stage:
                teacher_out = pick_response_logits(teacher_out, batch.teacher_logit_index, self.vocab_size)
        student_out = self.module(**_stream_inputs(batch, "student"))
        if self.is_last_stage:
            return pick_response_logits(student_out, batch.student_logit_index, self.vocab_size), teacher_out
        return torch.cat([student_out, teacher_out], dim=0)

    def _fused_outputs(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        student_gpt = get_attr_wrapped_model(self.module, "output_layer", return_model_obj=True)
        with torch.no_grad(), _output_layer_bypassed(self.teacher):
            teacher_hidden = self.teacher(**_stream_inputs(batch, "teacher"))
        with _output_layer_bypassed(student_gpt):
            student_hidden = self.module(**_stream_inputs(batch, "student"))
        teacher_weight = _output_weight(self.teacher)
        if self.teacher_stream is not None:
            teacher_weight = self.teacher_stream.on_device(teacher_weight)
        return (
            pick_response_hidden(student_hidden, batch.student_logit_index), _output_weight(student_gpt),
            pick_response_hidden(teacher_hidden, batch.teacher_logit_index), teacher_weight,
        )
