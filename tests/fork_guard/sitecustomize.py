"""Records every os.fork of a process started with this folder on PYTHONPATH (tests only).

A fork from the multi-threaded trainer can deadlock the child (a lock another thread held is
never released there), so the trainer must not fork at all: each fork leaves a file with its stack
in $OPSDC_TEST_FORK_LOG. Processes started through subprocess (torchrun's workers, SGLang servers,
"spawn" multiprocessing) do not fork in Python and leave nothing.
"""

import os
import traceback

_FORK_LOG = os.environ.get("OPSDC_TEST_FORK_LOG")


def _record_fork() -> None:
    path = os.path.join(_FORK_LOG, f"fork_from_{os.getpid()}_{len(os.listdir(_FORK_LOG))}.txt")
    with open(path, "w", encoding="utf-8") as log:
        log.write("".join(traceback.format_stack()))


if _FORK_LOG:
    os.register_at_fork(before=_record_fork)
    open(os.path.join(_FORK_LOG, f"guarded_{os.getpid()}"), "w").close()  # the guard ran: no fork record means no fork
