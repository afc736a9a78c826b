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

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.utils import get_attr_wrapped_model
from torch.autograd.function import once_differentiable

from opsdc_megatron.distill.batch import MicroBatch
from opsdc_megatron.distill.teacher_offload import TeacherWeightStream
from opsdc_megatron.models.qwen3.model import output_weight, padding_vocab_slice


def _stream_inputs(batch: MicroBatch, side: str) -> dict:
    """GPTModel.forward's inputs for the "student" or "teacher" stream (with the packed sequences'
    boundaries when packed)."""
    return dict(input_ids=getattr(batch, f"{side}_tokens"), position_ids=getattr(batch, f"{side}_positions"),
                attention_mask=None, packed_seq_params=getattr(batch, f"{side}_packing"))


@contextmanager
def _output_layer_replaced(gpt: GPTModel, forward: Callable) -> Iterator[None]:
    """Within the block, GPTModel.forward calls `forward` (hidden [s, b, H], weight=..., ...) ->
    (output, bias) in place of its output layer's."""
    gpt.output_layer.forward = forward
    try:
        yield
    finally:
        del gpt.output_layer.forward


def _whole_sequence(hidden: torch.Tensor, config) -> torch.Tensor:
    """The final hidden states ``[s, b, H]`` of the whole sequence: under sequence parallelism each
    tensor-parallel rank holds a slice of it, gathered here. Backward gives each rank its slice of the
    gradient, which the caller must have summed over the tensor-parallel ranks (each output layer shard
    contributes to it: `copy_to_tensor_model_parallel_region`, as ColumnParallelLinear does)."""
    return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False) if config.sequence_parallel else hidden


def _bypass_for(gpt: GPTModel) -> Callable:
    """An output layer that returns its input (of the whole sequence): GPTModel.forward then returns the
    final hidden states."""

    def bypass(hidden: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return _whole_sequence(hidden, gpt.config), None

    return bypass


def response_logits(model: torch.nn.Module, inputs: dict, logit_index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[sequences, response tokens, V/TP]``: `model` (a GPTModel, possibly wrapped) on `inputs`, its
    output layer applied only at the positions that predict response tokens.

    `logit_index` is [sequences, response tokens]; with one packed row, every sequence reads it.
    Prompt positions never get logits, and no full ``[b, s, V/TP]`` tensor exists to be gathered
    from (nor, in backward, a zero-filled one to scatter into). The vocabulary padding columns are
    set to -inf so they carry no probability mass.
    """
    gpt = get_attr_wrapped_model(model, "output_layer", return_model_obj=True)
    output_forward = gpt.output_layer.forward
    padding = padding_vocab_slice(vocab_size)

    def output_layer_at_responses(hidden: torch.Tensor, *args, **kwargs):
        hidden = _whole_sequence(hidden, gpt.config)
        rows = torch.arange(hidden.shape[1], device=hidden.device)[:, None]
        # As [sequences x response tokens, 1, H]: GPTModel's [s, b] -> [b, s] transpose of the
        # logits (and its backward) is then free, not a copy of them.
        picked = hidden[logit_index, rows].flatten(0, 1).unsqueeze(1)
        # The picked rows are whole already: under sequence parallelism the layer must not gather them
        # again, and then it all-reduces their gradient over the tensor-parallel ranks itself.
        with _sequence_parallel_off(gpt.output_layer):
            logits, bias = output_forward(picked, *args, **kwargs)
        if padding.start < padding.stop:  # this rank's shard has padding columns
            logits = _VocabPaddingToMinusInf.apply(logits, padding)
        return logits, bias

    with _output_layer_replaced(gpt, output_layer_at_responses):
        return model(**inputs).view(*logit_index.shape, -1)


@contextmanager
def _sequence_parallel_off(layer: torch.nn.Module) -> Iterator[None]:
    """megatron's ColumnParallelLinear with sequence parallelism off for one call: its input is not
    gathered along the sequence, and (allreduce_dgrad being off under sequence parallelism) its forward
    passes it through copy_to_tensor_model_parallel_region, whose backward all-reduces the gradient."""
    sequence_parallel = layer.sequence_parallel
    layer.sequence_parallel = False
    try:
        yield
    finally:
        layer.sequence_parallel = sequence_parallel


class _VocabPaddingToMinusInf(torch.autograd.Function):
    """The output layer's own logits with their vocabulary-padding columns set to -inf, in place.

    Not ``logits[..., padding] = -inf`` on what GPTModel returns: that is a view of the output layer's
    result, and for an in-place write on a view autograd's backward clones the whole gradient
    (CopySlices): 0.3-0.4 s added to a 1.1 s backward for fp32 logits [4096, 16384] on one CPU thread
    (bench/RESULTS.md). Here backward zeroes the padding columns of the incoming gradient in place when
    it is the logits' own storage (the KL's ``grad_in_place``: nothing else holds it), else of a copy.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, padding: slice) -> torch.Tensor:
        logits[..., padding] = float("-inf")
        ctx.mark_dirty(logits)
        ctx.padding, ctx.storage = padding, logits.data_ptr()
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if grad.data_ptr() != ctx.storage:  # another node's gradient, maybe held elsewhere or expanded
            grad = grad.clone(memory_format=torch.contiguous_format)
        grad[..., ctx.padding] = 0
        return grad, None


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
        # Under sequence parallelism each rank's stream holds its slice of each half's tokens.
        self.sequence_shards = teacher.config.tensor_model_parallel_size if teacher.config.sequence_parallel else 1
        self._received: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | list[torch.Tensor | None] | None) -> None:
        self._received = tensor[0] if isinstance(tensor, list) else tensor

    def set_is_first_microbatch(self) -> None:
        """Called by megatron's schedules at each step's first micro-batch (they look for it on the
        chunk they are given): with FP8, Transformer Engine layers then re-quantize their weights,
        the student's after the optimizer step and the teacher's after a refresh, instead of
        reusing the FP8 copies cached at the first forward ever."""
        get_attr_wrapped_model(self.module, "set_is_first_microbatch")()
        self.teacher.set_is_first_microbatch()

    def forward(self, batch: MicroBatch) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self._received is not None:  # not the first stage: split the stream back into its halves
            student_length = batch.student_tokens.shape[1] // self.sequence_shards
            get_attr_wrapped_model(self.module, "set_input_tensor")(self._received[:student_length])
            self.teacher.set_input_tensor(self._received[student_length:].detach())
        if self.is_last_stage and self.fused_output_layer:
            return self._fused_outputs(batch)
        if self.is_last_stage:
            with torch.no_grad():
                teacher_logits = response_logits(self.teacher, _stream_inputs(batch, "teacher"), batch.teacher_logit_index, self.vocab_size)
            student_logits = response_logits(self.module, _stream_inputs(batch, "student"), batch.student_logit_index, self.vocab_size)
            return student_logits, teacher_logits
        with torch.no_grad():
            teacher_out = self.teacher(**_stream_inputs(batch, "teacher"))
        student_out = self.module(**_stream_inputs(batch, "student"))
        return torch.cat([student_out, teacher_out], dim=0)

    def _fused_outputs(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        student_gpt = get_attr_wrapped_model(self.module, "output_layer", return_model_obj=True)
        with torch.no_grad(), _output_layer_replaced(self.teacher, _bypass_for(self.teacher)):
            teacher_hidden = self.teacher(**_stream_inputs(batch, "teacher"))
        with _output_layer_replaced(student_gpt, _bypass_for(student_gpt)):
            student_hidden = self.module(**_stream_inputs(batch, "student"))
        teacher_weight = output_weight(self.teacher)
        if self.teacher_stream is not None:
            teacher_weight = self.teacher_stream.on_device(teacher_weight)
        return (
            pick_response_hidden(student_hidden, batch.student_logit_index), output_weight(student_gpt),
            pick_response_hidden(teacher_hidden, batch.teacher_logit_index), teacher_weight,
        )
