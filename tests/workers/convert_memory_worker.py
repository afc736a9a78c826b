"""Peak memory of `save_megatron_checkpoint` at TP=1, PP=1 in a fresh one-rank process.

Usage: MALLOC_MMAP_THRESHOLD_=65536 python convert_memory_worker.py HF_DIR OUT_DIR

Prints ``PEAK GROWTH <bytes>``: the kernel's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs just before the save, so imports and process set-up do not count) minus the
resident set before the save. The small mmap threshold makes freed tensors leave the resident set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from opsdc_megatron.convert.hf_to_megatron import save_megatron_checkpoint  # noqa: E402
from opsdc_megatron.parallel import destroy_distributed, init_distributed  # noqa: E402


def status_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024  # reported in kB


def main(hf_dir: Path, out: Path) -> None:
    init_distributed(1, 1)
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the high-water mark to the current resident set
    before = status_bytes("VmRSS")
    save_megatron_checkpoint(hf_dir, out, torch.float32)
    print(f"PEAK GROWTH {status_bytes('VmHWM') - before}", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
