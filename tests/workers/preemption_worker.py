"""Two ranks agree to stop on a stop file that only rank 1 found, for tests/test_opsdc_loop.py.

Usage: torchrun --nproc-per-node=2 preemption_worker.py FOLDER

Rank 0 looks for FOLDER/stop_requested (absent), then rank 1 finds it, written as `opsdc train`
writes it, and both call `requested()`: rank 0 learns of the stop through the all-reduce. It prints
`RANK0_RECEIVED=<what its watch names as the cause>`, the cause that `opsdc train`'s stop line names.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from opsdc_megatron.train.preemption import STOP_FILE_ENV, PreemptionWatch

folder = Path(sys.argv[1])
stop_file, rank0_looked = folder / "stop_requested", folder / "rank0_looked"
os.environ[STOP_FILE_ENV] = str(stop_file)
dist.init_process_group("gloo")
watch = PreemptionWatch()
if dist.get_rank() == 0:
    real_read_text = Path.read_text

    def read_text_then_mark(path: Path, *args, **kwargs) -> str:
        try:
            return real_read_text(path, *args, **kwargs)
        finally:
            if path == stop_file:
                rank0_looked.touch()

    Path.read_text = read_text_then_mark
else:
    deadline = time.monotonic() + 60
    while not rank0_looked.exists():
        assert time.monotonic() < deadline, "rank 0 never looked for the stop file"
        time.sleep(0.01)
    writer = PreemptionWatch()
    writer.received = "SIGUSR1"
    writer.forward_to(stop_file)
assert watch.requested()
if dist.get_rank() == 0:
    print(f"RANK0_RECEIVED={watch.received}", flush=True)
dist.destroy_process_group()
