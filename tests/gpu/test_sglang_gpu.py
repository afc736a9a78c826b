"""Weight pushes to a real SGLang server on a CUDA GPU: shared memory, an NCCL broadcast group, disk.

The CPU suite (tests/test_sglang.py) covers the same transports with gloo; what only a GPU shows is
the NCCL group SGLang's `/init_weights_update_group` builds with the trainer and a server that loads
pushed weights into CUDA memory. One server shares the GPU with this process (mem_fraction_static
0.25), fp32 with torch-native attention so that its logprobs can be compared with transformers' on
the pushed weights at 1e-3.

Needs a full (CUDA) SGLang 0.5.23 install: set OPSDC_SGLANG_PYTHON to its interpreter, or have it at
.venv-sglang (the CPU-only one made by tools/setup_sglang.sh is detected and skipped). CI has no GPU
and deselects these (`-m "not gpu"`); run them on a cluster node with
`OPSDC_SGLANG_PYTHON=/path/to/python python -m pytest -m gpu tests/gpu/test_sglang_gpu.py`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.rollout.engine import SamplingParams
from opsdc_megatron.rollout.sglang.engine import SGLangRolloutEngine
from opsdc_megatron.rollout.sglang.launcher import DEFAULT_SGLANG_PYTHON, ServerFleet, ServerSettings
from opsdc_megatron.weight_push.sglang_transports import DiskTransport, DistributedTransport, TensorTransport
from tests.launch import free_port

SGLANG_PYTHON = os.environ.get("OPSDC_SGLANG_PYTHON", str(DEFAULT_SGLANG_PYTHON))
VOCAB, EOS = 1024, 1
PROMPTS = [[5, 17, 42, 9], [3, 4], [100, 101, 102, 103, 104, 105], [7]]
LOGPROB_TOL = 1e-3


def _sglang_sees_cuda() -> bool:
    if not Path(SGLANG_PYTHON).exists():
        return False
    probe = subprocess.run([SGLANG_PYTHON, "-c", "import sglang, torch; assert torch.cuda.is_available()"], capture_output=True)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.sglang,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and not _sglang_sees_cuda(),
                       reason=f"needs a CUDA build of SGLang at OPSDC_SGLANG_PYTHON ({SGLANG_PYTHON})"),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sglang_gpu") / "tiny_qwen3"
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=EOS, bos_token_id=0, pad_token_id=0,
    )
    Qwen3ForCausalLM(config).float().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServerSettings(
        model_path=str(tiny_model), dtype="float32", mem_fraction_static=0.25, base_port=free_port(), python=SGLANG_PYTHON,
        log_dir=str(tmp_path_factory.mktemp("sglang_gpu_logs")), on_cpu=False,
        extra_args=("--attention-backend", "torch_native", "--disable-cuda-graph"),
    )
    with ServerFleet(settings, num_servers=1) as running:
        yield running


def shifted_model(folder: Path, seed: int) -> Qwen3ForCausalLM:
    """The launch weights moved visibly, on the GPU: what a training step would push."""
    model = Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").cuda().eval()
    generator = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, device="cuda"))
    return model


def reference_logprobs(model: Qwen3ForCausalLM, prompt: list[int], response: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response], device="cuda")).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(response, device="cuda")[:, None])[:, 0].cpu()


@pytest.mark.parametrize("transport", ["tensor", "distributed", "disk"])
def test_pushed_weights_are_served_exactly(fleet: ServerFleet, tiny_model: Path, tmp_path: Path, transport: str) -> None:
    if transport != "distributed":
        _push_and_check(fleet, tiny_model, tmp_path, transport)
    elif torch.cuda.device_count() < 2:
        pytest.skip("the NCCL push needs this process on another GPU than the server's (GPU 0): NCCL refuses two ranks on one GPU")
    else:
        with torch.cuda.device(torch.cuda.device_count() - 1):
            _push_and_check(fleet, tiny_model, tmp_path, transport)


def _push_and_check(fleet: ServerFleet, tiny_model: Path, tmp_path: Path, transport: str) -> None:
    version = {"tensor": 1, "distributed": 2, "disk": 3}[transport]
    weights = {
        "tensor": lambda: TensorTransport(bucket_bytes=1 << 20),
        "distributed": lambda: DistributedTransport(bucket_bytes=1 << 20),  # NCCL: this process's GPU
        "disk": lambda: DiskTransport(tmp_path / "pushed", tiny_model),
    }[transport]()
    if transport == "distributed":
        assert weights.backend == "nccl"
    engine = SGLangRolloutEngine(fleet, weights, [EOS], VOCAB)
    try:
        model = shifted_model(tiny_model, seed=version)
        engine.update_weights(dict(model.state_dict()), version=version)
        results = engine.sample(PROMPTS, SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16), seed=11)
        worst = 0.0
        for prompt, result in zip(PROMPTS, results):
            assert result.weight_version == str(version)
            reference = reference_logprobs(model, prompt, result.output_ids)
            worst = max(worst, (torch.tensor(result.logprobs) - reference).abs().max().item())
        assert worst <= LOGPROB_TOL, f"{transport}: served logprobs differ from the pushed weights' by {worst:.2e}"
    finally:
        weights.close()
