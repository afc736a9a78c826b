"""The teacher's weights in CPU memory, streamed to the device one unit at a time (`distill.teacher_offload`).

For models where student and teacher do not both fit on the GPU (`opsdc plan --teacher-offload`).
Every tensor of a teacher chunk lives in (pinned) host memory. The chunk is cut into *units* in
forward order: the embedding, each transformer layer, the final norm and the output layer. A
forward pre-hook copies a unit's weights to the device just before it runs and starts copying the
next unit's on a side CUDA stream, so the copy overlaps the current unit's compute; a forward hook
drops the device copy as soon as the unit has run. At most two units' weights are on the device at
once. Each rank streams its own tensor/pipeline shards; nothing is communicated.

The swap is ``tensor.data = copy``: outside a teacher forward every parameter IS its host tensor,
so the refresh from the student (`TeacherSnapshot.copy_from`, a device-to-host copy), the
checkpoint's sharded state dict and ``load_state_dict`` read and write host memory unchanged.

With the fused output layer the loss applies the teacher's output weight itself
(`DistillStage`); the output layer is then not a unit and `on_device` hands the loss a copy that
autograd keeps until that micro-batch's backward.

Without a GPU the compute device is the CPU: a fetch is then a host-to-host copy that runs the same
bookkeeping (tests/test_teacher_offload.py). The CUDA path (side stream, pinned memory, the memory
saving) is tested in tests/gpu/test_teacher_offload_gpu.py and measured by bench/teacher_offload.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel

from opsdc_megatron.models.qwen3.model import output_weight


@dataclass
class _Unit:
    name: str
    tensors: list[torch.Tensor]
    """The unit's parameters and buffers; their ``.data`` is the host tensor or a device copy."""
    host: list[torch.Tensor]
    """The host tensors, in the same order."""
    resident: bool = False
    copied: torch.cuda.Event | None = None
    """Recorded on the copy stream after the unit's host-to-device copies were queued."""


class TeacherWeightStream:
    """Streams one teacher `GPTModel` chunk's weights from host memory to the current device, a unit ahead.

    `stream_output_layer`: false when the loss applies the output layer itself (the fused output
    layer); the output weight is then fetched with `on_device`.
    """

    def __init__(self, model: GPTModel, stream_output_layer: bool = True) -> None:
        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._host: dict[int, torch.Tensor] = {}
        for tensor in [*model.parameters(), *model.buffers()]:
            host = tensor.data.to("cpu")
            tensor.data = host.pin_memory() if on_gpu else host
            self._host[id(tensor)] = tensor.data

        modules: list[tuple[str, torch.nn.Module]] = []
        if model.pre_process:
            modules.append(("embedding", model.embedding))
        modules += [(f"decoder.layers.{index}", layer) for index, layer in enumerate(model.decoder.layers)]
        if model.decoder.final_layernorm is not None:
            modules.append(("decoder.final_layernorm", model.decoder.final_layernorm))
        if model.post_process and stream_output_layer:
            modules.append(("output_layer", model.output_layer))
        self.units: list[_Unit] = []
        for index, (name, module) in enumerate(modules):
            tensors = [*module.parameters(), *module.buffers()]
            if name == "output_layer" and model.share_embeddings_and_output_weights:
                shared = model.shared_embedding_or_output_weight()  # GPTModel passes it to output_layer
                if not any(shared is t for t in tensors):
                    tensors.append(shared)
            self.units.append(_Unit(name, tensors, [self._host[id(t)] for t in tensors]))
            module.register_forward_pre_hook(lambda _module, _args, index=index: self._before(index))
            module.register_forward_hook(lambda _module, _args, _out, index=index: self._release(self.units[index]), always_call=True)
        model.register_forward_hook(lambda *_: self.release_all(), always_call=True)

        streamed = {id(t) for unit in self.units for t in unit.tensors}
        unstreamed_output = output_weight(model) if model.post_process and not stream_output_layer else None
        missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in streamed and t is not unstreamed_output]
        if missing:
            raise ValueError(f"teacher offload: tensors outside the streamed units (embedding, layers, final norm, output layer): {missing}")

    def _before(self, index: int) -> None:
        """Pre-hook of unit `index`: its weights on the device, the next unit's on their way."""
        unit = self.units[index]
        self._fetch(unit)
        if unit.copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(unit.copied)
            for tensor in unit.tensors:  # allocated on the copy stream, freed after compute's use
                tensor.data.record_stream(compute)
            unit.copied = None
        if index + 1 < len(self.units):
            self._fetch(self.units[index + 1])

    def _fetch(self, unit: _Unit) -> None:
        if unit.resident:
            return
        if self._copy_stream is None:
            copies = [host.to(self.device, copy=True) for host in unit.host]
        else:
            with torch.cuda.stream(self._copy_stream):
                copies = [host.to(self.device, non_blocking=True) for host in unit.host]
                unit.copied = torch.cuda.Event()
                unit.copied.record(self._copy_stream)
        for tensor, copy in zip(unit.tensors, copies):
            tensor.data = copy
        unit.resident = True

    def _release(self, unit: _Unit) -> None:
        for tensor, host in zip(unit.tensors, unit.host):
            tensor.data = host
        unit.resident = False
        unit.copied = None

    def release_all(self) -> None:
        """Every tensor back to its host copy (after each chunk forward, also one that raised)."""
        if self._copy_stream is not None:  # a prefetch that no unit consumed must finish reading its host tensor
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        for unit in self.units:
            if unit.resident:
                self._release(unit)

    def on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A device copy of one of the chunk's tensors, for use outside its unit (the fused loss's
        output weight); freed when the caller drops it."""
        return self._host[id(tensor)].to(self.device, non_blocking=True, copy=True)
