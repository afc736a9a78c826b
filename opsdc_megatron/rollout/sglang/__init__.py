"""SGLang rollout backend: servers (launcher), their HTTP API (client), and the RolloutEngine on them (engine).

The servers run from their own environment, .venv-sglang (tools/setup_sglang.sh); the weight
transports that keep them in step with the trainer are in opsdc_megatron/weight_push/.
"""
