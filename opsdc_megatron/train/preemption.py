"""Stop cleanly when the scheduler asks: checkpoint the last finished optimizer step, exit with
PREEMPTED_EXIT_CODE. A step past its rollouts is finished first; its weight push and an eval due at
that step are left to the resumed run (the loop in train/loop.py): they need the rollout servers,
which got the same signal. Rollouts in progress end at once (`RolloutEngine.stop_requested`, asked
on each rank without a collective), as do a push or an eval that fail once a stop is in: their step
is redone, or its eval, by the resumed run, exactly (rollouts are seeded by step).

SLURM sends SIGTERM before killing a job (scancel, `scontrol requeue`, preemption) and, with
`#SBATCH --signal=B:USR1@300`, SIGUSR1 to the batch script some minutes before the time limit; the
sbatch scripts (slurm/opsdc_job.sh) forward it to the trainer step and also write it down in the file
named by $OPSDC_STOP_FILE: the trainer's processes start with SIGUSR1 ignored, so that one arriving
before this module's handler is in place does not kill them, and the file stands in for it. `opsdc
train` run without a launcher at world size > 1 writes the same file for the processes it starts
(torchrun puts them in sessions of their own, out of reach of a signal to it). The handler only records the
signal; the loop asks once per step (and when rollouts, a push or an eval fail, which every rank
learns of together), and the ranks agree through one all-reduce, so every rank stops after the same
step and the checkpoint stays collective. The exit status tells the batch
script to requeue the job, which then resumes from `checkpoints/latest`.

SIGTERM is followed by SIGKILL after the cluster's KillWait (often 30 s): a checkpoint on SIGTERM
is best effort, while SIGUSR1 before the time limit leaves the save the whole margin. Either way
the periodic checkpoints bound what is lost, and resume is exact. A stop during rollouts discards
that step's rollouts (their servers are fine after a SIGUSR1): a step's rollouts can take most of a
margin at long responses, and the step after them more.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

PREEMPTED_EXIT_CODE = 75
"""EX_TEMPFAIL from sysexits.h: stopped early on request, a checkpoint was saved, run again to resume."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP)
"""SIGHUP: a closed terminal or ssh session (`opsdc demo`, `opsdc train` run by hand) checkpoints too, unless
the process started with it ignored (`nohup`: meant to outlive the terminal)."""

STOP_FILE_ENV = "OPSDC_STOP_FILE"
"""Names a file whose existence asks the trainer to stop as SIGUSR1 does; it holds what asked (set by
slurm/opsdc_job.sh, and by `opsdc train` for the processes it starts)."""


STOPPED_LINE = "opsdc train: stopping"
"""How the line rank 0 prints when it stops on request begins; slurm/opsdc_job.sh requeues a job after
SIGUSR1 only when its trainer log has it (a trainer that crashed instead is reported, not requeued)."""


class PreemptionWatch:
    """Records SIGUSR1/SIGTERM/SIGHUP; `requested()` is collective and true on every rank once any rank got one.

    Made first thing in the trainer process (cli.py, before torch is imported), so that a signal
    during start-up (imports, model build, server start) is recorded instead of killing the process:
    the loop then checkpoints and stops at its first check.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.stop_file = os.environ.get(STOP_FILE_ENV) or None
        self.forward_file: Path | None = None
        self._terminal_fds = [fd for fd in (1, 2) if os.isatty(fd)]
        for stop_signal in STOP_SIGNALS:
            if stop_signal == signal.SIGHUP and signal.getsignal(stop_signal) == signal.SIG_IGN:
                continue  # nohup (an ignored SIGUSR1 is the job script's, for the start-up: taken over here)
            signal.signal(stop_signal, self._record)

    def _record(self, number: int, _frame) -> None:
        self.received = signal.Signals(number).name
        self._leave_a_hung_up_terminal()
        self._forward()

    def _leave_a_hung_up_terminal(self) -> None:
        """stdout/stderr on a terminal that hung up (a closed ssh session): every write fails (EIO), the step's
        log line before the checkpoint too. What went there goes to /dev/null from now on."""
        for fd in [fd for fd in self._terminal_fds if not os.isatty(fd)]:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
            self._terminal_fds.remove(fd)

    def forward_to(self, stop_file: Path) -> None:
        """From now on (and for a signal already received) a stop signal is written to `stop_file`, for
        processes that read it as their $OPSDC_STOP_FILE."""
        self.forward_file = stop_file
        self._forward()

    def _forward(self) -> None:
        """Written whole, then renamed (a rank that read the file half written named no signal), from a file of
        its own: a second signal can run this handler again inside the first."""
        if self.forward_file is not None and self.received:
            fd, partial = tempfile.mkstemp(dir=self.forward_file.parent, prefix=".stop-")
            with os.fdopen(fd, "w") as file:
                file.write(f"{self.received} to opsdc train\n")
            os.replace(partial, self.forward_file)

    def _read_stop_file(self) -> None:
        if not self.received and self.stop_file:
            try:
                self.received = Path(self.stop_file).read_text(encoding="utf-8").strip() or f"a stop request ({self.stop_file})"
            except FileNotFoundError:
                pass

    def seen_here(self) -> bool:
        """Whether this rank got a stop signal or finds the stop file: no collective, for code whose ranks
        cannot all ask at once (each rank's rollouts, `RolloutEngine.stop_requested`)."""
        self._read_stop_file()
        return self.received is not None

    def requested(self) -> bool:
        import torch  # here, not at the top: the watch is made before the ~2 s torch import
        import torch.distributed as dist

        self._leave_a_hung_up_terminal()  # ranks of `opsdc train`: the hangup came to it, their stop through the file
        self._read_stop_file()
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self._read_stop_file()  # another rank found it after this one looked: name what it says
        return bool(flag.item())

    def exit_after_checkpoint(self, step: int) -> NoReturn:
        """Called after the checkpoint of `step` is complete on every rank; step 0 (a fresh run stopped
        before its first step) has none: a new start gives the same run."""
        import torch.distributed as dist

        if dist.get_rank() == 0:
            done = f"after step {step}" if step else "before step 1"
            saved = "checkpoint saved" if step else "nothing to checkpoint"
            print(f"{STOPPED_LINE} {done} on {self.received or 'a signal to another rank'}; {saved}, exit {PREEMPTED_EXIT_CODE} "
                  f"(run again to resume)", file=sys.stderr, flush=True)
        raise SystemExit(PREEMPTED_EXIT_CODE)
