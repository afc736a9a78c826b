"""Runs a server in this process group and stops the group when the process that started it is gone.

`launcher.ManagedProcess` starts every server and router through this guard, in a session of their own,
with the read end of a pipe as the guard's stdin; only the starting process holds the write end. When
that process ends in any way (SIGKILL, the OOM killer, a crash in C++, torchrun killing a hung rank),
the pipe reads end-of-file and the guard stops the whole group as `ManagedProcess.stop` would: SIGTERM,
then SIGKILL after the grace period. Without it the servers outlived the trainer, holding their GPUs'
memory and their ports (the next run's start then stopped at "port ... already in use").

Otherwise the guard is transparent: the group's SIGTERM is for the server (the guard waits for it), and
the guard exits with the server's status (128 + N for a server ended by signal N). Standard library
only, run by path: it must not pay for importing the package.

    python orphan_guard.py GRACE_S COMMAND...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading


def _stop_group_when_orphaned(server: subprocess.Popen, grace_s: float, orphaned: threading.Event) -> None:
    while os.read(0, 4096):  # nothing is ever written: this returns b"" once the starter's end is closed
        pass
    orphaned.set()
    os.killpg(0, signal.SIGTERM)
    try:
        server.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(0, signal.SIGKILL)  # the server too, and this guard


def main() -> int:
    grace_s, command = float(sys.argv[1]), sys.argv[2:]
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # after the start: an ignored signal stays ignored across exec
    orphaned = threading.Event()
    threading.Thread(target=_stop_group_when_orphaned, args=(server, grace_s, orphaned), daemon=True).start()
    status = server.wait()
    if orphaned.is_set():  # what outlived the SIGTERM (a worker that ignores it), and this guard, as stop() ends a group
        os.killpg(0, signal.SIGKILL)
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
