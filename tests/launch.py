"""Run `opsdc` or a worker script from a test: every multi-process test goes through `torchrun` here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

WORKERS = Path(__file__).parent / "workers"


def hangups_not_ignored() -> None:
    """A suite run under nohup starts with SIGHUP ignored, and every process it starts inherits that: a hangup
    sent by a test would be lost (the commands keep an ignored SIGHUP ignored, train/preemption.py)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_base_port(offsets: Sequence[int]) -> int:
    """A base port with base + offset free for every offset (a server fleet's ports, a job's port shifts)."""
    for _ in range(100):
        base = free_port()
        if base + max(offsets) <= 65535 and all(_port_is_free(base + offset) for offset in offsets):
            return base
    raise AssertionError(f"no free base port with all of base + {offsets} free")


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_opsdc(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """`opsdc ARGV` in this process: (exit status, stdout, stderr). A subprocess spends ~10 s importing
    megatron-core; a `train` that must be refused before it starts takes the `refused_before_start` fixture."""
    from opsdc_megatron.cli import main

    try:
        main(list(argv))
        status = 0
    except SystemExit as exit_:
        status = exit_.code or 0
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def torchrun(worker: str, nproc: int, *args: str, timeout_s: float = 600) -> str:
    """Launch tests/workers/<worker> on `nproc` local CPU processes; returns combined output.

    Fails the test with the workers' output when any rank exits non-zero or the run times out.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        str(WORKERS / worker), *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{worker} failed (exit {proc.returncode}):\n{output[-6000:]}"
    return output
