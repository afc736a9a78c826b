"""Hugging Face <-> Megatron checkpoint conversion (`opsdc convert`).

* `hf_to_megatron`: a HF folder -> a megatron-core ``torch_dist`` checkpoint of the model alone,
  written by megatron's own `dist_checkpointing.save` from TP x PP ranks, so its keys are exactly
  what `GPTModel.sharded_state_dict()` expects (`opsdc train` starts from it: ``model.megatron_checkpoint``);
  each tensor is read from the HF files only when it is written, never the whole model in memory.
* `megatron_to_hf`: any such checkpoint (or a training checkpoint) -> sharded safetensors, read
  tensor by tensor with torch.distributed.checkpoint, never the whole model in memory.
* `verify`: the largest logit difference between a HF folder and a megatron checkpoint.

The ``torch_dist`` format stores global shapes (layers stacked on a leading axis, vocabulary rows
padded for the TP size it was written at, which megatron tolerates on load), so a checkpoint
written at one TP/PP layout loads at any other. Names and layouts come from the one map per
architecture in `opsdc_megatron.models` (the same one the weight push uses).
"""
