"""Stop cleanly when the scheduler asks: finish the current optimizer step, checkpoint, exit with
PREEMPTED_EXIT_CODE. The weight push and an eval due at that step are left to the resumed run (the
loop in train/loop.py): they need the rollout servers, which got the same signal.

SLURM sends SIGTERM before killing a job (scancel, `scontrol requeue`, preemption) and, with
`#SBATCH --signal=B:USR1@300`, SIGUSR1 to the batch script some minutes before the time limit; the
sbatch scripts (slurm/opsdc_job.sh) forward it to the trainer step. The handler only records the
signal; the loop asks once per step, and the ranks agree through one all-reduce, so every rank
stops after the same step and the checkpoint stays collective. The exit status tells the batch
script to requeue the job, which then resumes from `checkpoints/latest`.

SIGTERM is followed by SIGKILL after the cluster's KillWait (often 30 s): a checkpoint on SIGTERM
is best effort, while SIGUSR1 before the time limit leaves the step and the save the whole margin.
Either way the periodic checkpoints bound what is lost, and resume is exact.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75
"""EX_TEMPFAIL from sysexits.h: stopped early on request, a checkpoint was saved, run again to resume."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionWatch:
    """Records SIGUSR1/SIGTERM; `requested()` is collective and true on every rank once any rank got one."""

    def __init__(self) -> None:
        self.received: str | None = None
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, self._record)

    def _record(self, number: int, _frame) -> None:
        self.received = signal.Signals(number).name

    @contextmanager
    def shielding_helper_processes(self) -> Iterator[None]:
        """Blocks the stop signals in this thread while checkpoint writers start.

        SLURM signals every process of a job step, so the helper processes dist_checkpointing starts
        during a save (a multiprocessing Manager and writers) would die of the same SIGTERM/SIGUSR1
        mid-save. Processes started here inherit the blocked mask and ignore them; this process still
        records the signal (another thread takes it, or it is delivered when the mask is restored).
        """
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def requested(self) -> bool:
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit_after_checkpoint(self, step: int) -> None:
        """Called after the checkpoint of `step` is complete on every rank."""
        if dist.get_rank() == 0:
            print(f"opsdc train: stopping after step {step} on {self.received or 'a signal to another rank'}; "
                  f"checkpoint saved, exit {PREEMPTED_EXIT_CODE} (run again to resume)", file=sys.stderr, flush=True)
        raise SystemExit(PREEMPTED_EXIT_CODE)
