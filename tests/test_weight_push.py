"""What the tensor transport hands each receiving server rank, read by SGLang's own deserializer.

The transports against real SGLang servers are tested in tests/test_sglang.py (two servers at TP=1);
the case here needs three receiving ranks, so each is SGLang's deserialization code in a process of
its own (.venv-sglang), as in a server's TP rank, without starting servers.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from opsdc_megatron.rollout.sglang.launcher import CPU_STUB_DIR, DEFAULT_SGLANG_PYTHON
from opsdc_megatron.weight_push import sglang_transports
from opsdc_megatron.weight_push.sglang_transports import TensorTransport

pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(not DEFAULT_SGLANG_PYTHON.exists(), reason="needs .venv-sglang: run `make env-sglang`"),
]

RECEIVER = """
import sys
from sglang.srt.utils.common import MultiprocessingSerializer
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata
bucket = MultiprocessingSerializer.deserialize(open(sys.argv[1]).read())
metadata = [FlattenedTensorMetadata(**vars(m)) for m in bucket["metadata"]]
tensors = FlattenedTensorBucket(flattened_tensor=bucket["flattened_tensor"], metadata=metadata).reconstruct_tensors()
print(sum(float(t.sum()) for _, t in tensors))
del bucket, metadata, tensors  # a server rank frees the bucket once loaded (its process lives on)
"""


def test_every_receiving_rank_gets_its_own_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With torch's file_system sharing each pickling adds a reference to the bucket's shared-memory
    file and each unpickling drops one, unlinking the file at zero. One pickle sent to three ranks (two
    servers, one at TP=2) left the third without a file, and SGLang's scheduler quits on that. Each
    rank here unpickles in a process of its own, as a server's TP rank does (SGLang's serializer is
    base64 of torch's ForkingPickler)."""
    received: list[str] = []

    def fake_post(url: str, payload: dict | None, timeout_s: float) -> dict:
        if url.endswith("/update_weights_from_tensor"):
            for index, serialized in enumerate(payload["serialized_named_tensors"]):
                file = tmp_path / f"{len(received)}-{index}.txt"
                file.write_text(serialized)
                rank = subprocess.run([str(DEFAULT_SGLANG_PYTHON), "-c", RECEIVER, str(file)], capture_output=True, text=True, timeout=300,
                                      env={**os.environ, "PYTHONPATH": str(CPU_STUB_DIR)})
                received.append(rank.stdout.strip() or rank.stderr.strip().splitlines()[-1])
        return {"success": True}

    monkeypatch.setattr(sglang_transports, "post_json", fake_post)
    state = {"model.embed_tokens.weight": torch.ones(8, 4, dtype=torch.bfloat16), "model.norm.weight": torch.ones(4, dtype=torch.bfloat16)}
    TensorTransport().push({"http://a:1": 1, "http://b:1": 2}, state, "1")
    assert received == ["36.0"] * 3, received


def test_the_weight_update_group_joins_over_ipv6() -> None:
    """An IPv6 MASTER_ADDR (SLURM may give one) went into tcp://fd00::1:port unbracketed and failed;
    SGLang brackets the address on its side."""
    import torch.distributed as dist

    from opsdc_megatron.rollout.sglang.client import free_port
    from opsdc_megatron.weight_push.sglang_transports import join_weight_update_group

    group = join_weight_update_group("gloo", "::1", free_port("::1"), 1, "opsdc-ipv6-test", 30.0)
    try:
        dist.broadcast(torch.arange(4.0), src=0, group=group)  # a collective over the group works (a group of one: no data moves)
        assert group.size() == 1
    finally:
        dist.destroy_process_group(group)
