"""opsdc-megatron: On-Policy Self-Distillation for reasoning Compression on megatron-core."""

from opsdc_megatron.models.transformer_engine import guard_broken_transformer_engine

# Before anything imports megatron: a broken Transformer Engine would crash `import megatron.core`.
guard_broken_transformer_engine()
