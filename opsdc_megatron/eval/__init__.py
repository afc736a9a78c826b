"""Evaluation: dual-path answer scoring, accuracy and response length."""

from opsdc_megatron.eval.scoring import score

__all__ = ["score"]
