"""Weight push: after every optimizer step, the trainer's weights go to the rollout servers.

buckets.py groups the Hugging Face state dict (models/qwen3/state_dict_adapter.export_hf_state_dict,
the one name map) into bounded buckets; sglang_transports.py carries them to SGLang servers by
shared memory, a broadcast group, or disk.
"""
