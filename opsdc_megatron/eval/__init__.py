"""Evaluation: dual-path answer scoring (math-verify equivalence), benchmark loaders, mean@k accuracy and response length."""

from opsdc_megatron.eval.scoring import score

__all__ = ["score"]
