"""In-process rollout engine on Hugging Face transformers' `generate`, fed with the trainer's weights.

The embedded default for CPU runs and tests: no server, the same sampling the paper uses
(temperature, top-p, top-k with no hidden defaults), left-padded batches. On a GPU machine it
generates on this rank's GPU (one more copy of the model there; large models want SGLang).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from opsdc_megatron.prompts import load_tokenizer, stop_token_ids
from opsdc_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class HFRolloutEngine(RolloutEngine):
    def __init__(
        self,
        hf_config: PretrainedConfig | str,
        stop_token_ids: list[int],
        pad_token_id: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """`device`: where the model lives and generates (default: this rank's GPU if there is one)."""
        config = AutoConfig.from_pretrained(hf_config) if isinstance(hf_config, str) else hf_config
        self.device = torch.device(device) if device is not None else _default_device()
        with self.device:  # built (and randomly initialised, until the first push) where it runs
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.stop_token_ids = list(stop_token_ids)
        self.pad_token_id = pad_token_id
        self._version = -1

    @classmethod
    def from_pretrained(cls, model_dir: str, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "HFRolloutEngine":
        """An engine serving the weights of a Hugging Face folder (version 0)."""
        tokenizer = load_tokenizer(model_dir)
        engine = cls(model_dir, stop_token_ids(model_dir, tokenizer), tokenizer.pad_token_id, dtype, device)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(Path(model_dir).glob("*.safetensors")):
            state.update(load_file(shard))
        engine.update_weights(state, version=0)
        return engine

    @property
    def weight_version(self) -> int:
        return self._version

    @torch.no_grad()
    def update_weights(self, hf_state_dict: dict[str, torch.Tensor], version: int) -> None:
        result = self.model.load_state_dict(hf_state_dict, strict=False)
        missing = set(result.missing_keys) - ({"lm_head.weight"} if self.tied else set())
        if missing or result.unexpected_keys:
            raise KeyError(f"weight push does not match the model: missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}")
        if self.tied:
            self.model.tie_weights()
        self._version = version

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int) -> list[Rollout]:
        """One left-padded batch: the caller bounds its size (generate_across_ranks' blocks)."""
        generation = GenerationConfig(
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            top_k=sampling.top_k if sampling.temperature > 0 else None,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
        )
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompt_ids], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=self.device)
        # The sampling seed in a forked generator state: the trainer's own random streams (dropout, if
        # ever enabled) are not reset to it by every rollout.
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if self.device.type == "cuda" else []):  # manual_seed seeds them all
            torch.manual_seed(seed % 2**63)  # derived seeds (engine.generate_across_ranks) outgrow int64 from train.seed ~1.8e7
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation)
        rollouts = []
        for row, tokens in enumerate(output[:, width:].tolist()):
            response, reason = [], "length"
            for token in tokens:
                response.append(token)
                if token in self.stop_token_ids:
                    reason = "stop"
                    break
            rollouts.append(Rollout(row, response, reason, self._version))
        return rollouts
