"""Per-step metrics: one JSON line per record in <out_dir>/metrics.jsonl, and a line on the console.

On resume, records after the checkpoint's step are dropped first, so the file always describes one
consistent run.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from opsdc_megatron.files import write_text_atomic

SHOWN = ("loss", "grad_norm", "mean_response_tokens", "rollout_accuracy", "accuracy", "mean_tokens", "step_s")


class MetricsLog:
    def __init__(self, path: Path, enabled: bool, keep_through_step: int) -> None:
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=True)
        self.file = None
        if not enabled:
            return
        kept = []
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= keep_through_step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        shown = "  ".join(f"{k} {record[k]:.4g}" for k in SHOWN if k in record)
        self.console.print(f"[bold]{record['kind']:>5} step {record['step']:>4}[/bold]  {shown}")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
