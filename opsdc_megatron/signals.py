"""Signal handlers installed for a block of code and restored after it."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def signals_handled(signums: tuple[signal.Signals, ...], handler: Callable[[int, object], None]) -> Iterator[None]:
    """`handler` for each of `signums` inside the block; the previous handlers after it, however it ends. A
    signal the process ignores stays ignored (`nohup`'s SIGHUP: the command is meant to outlive the terminal)."""
    previous = {signum: signal.signal(signum, handler) for signum in signums if signal.getsignal(signum) != signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
