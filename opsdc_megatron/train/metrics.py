"""Per-step metrics: one JSON line per record in <out_dir>/metrics.jsonl, a line on the console, and
the same numbers in TensorBoard (<out_dir>/tensorboard/) and, when configured, Weights & Biases.

On resume, records after the checkpoint's step are dropped first (and TensorBoard's events after it
purged), so the logs always describe one consistent run. Names in TensorBoard and W&B are
`<kind>/<key>` (train/loss, eval/accuracy, eval/per_level/3/accuracy).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from rich.console import Console

from opsdc_megatron.config import LogConfig
from opsdc_megatron.files import write_text_atomic

SHOWN = ("loss", "grad_norm", "mean_response_tokens", "rollout_accuracy", "accuracy", "mean_tokens", "step_s")
WANDB_ID_FILE = "wandb_run_id.txt"
"""Keeps the W&B run id in the run folder, so a resumed run continues the same W&B run."""


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a record under `<kind>/<key>` names; nested mappings become path-like names."""
    flat: dict[str, float] = {}

    def visit(prefix: str, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                visit(f"{prefix}/{key}", value)
            elif isinstance(value, (bool, int, float)):
                flat[f"{prefix}/{key}"] = float(value)

    visit(record["kind"], {k: v for k, v in record.items() if k not in ("step", "kind")})
    return flat


class MetricsLog:
    def __init__(
        self, path: Path, enabled: bool, keep_through_step: int, log: LogConfig, run_config: dict, redo_eval_step: int | None = None
    ) -> None:
        """``redo_eval_step``: the resumed run evaluates that step again (an eval a stop deferred), so an
        eval record of it from an earlier attempt that crashed before the next save is dropped."""
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=True)
        self.file = self.tensorboard = self.wandb_run = None
        if not enabled:
            return
        kept = [
            (line, record) for line, record in (_records(path) if path.exists() else [])
            if record["step"] <= keep_through_step and not (record["kind"] == "eval" and record["step"] == redo_eval_step)
        ]
        write_text_atomic(path, "".join(line + "\n" for line, _ in kept))
        self.file = path.open("a", encoding="utf-8")
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard purges every tag from a step on: from the redone eval's step, whose kept
            # records (that step's train record) are written again.
            purge_step = keep_through_step + 1 if redo_eval_step is None else redo_eval_step
            self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"), purge_step=purge_step)
            for _, record in kept:
                if record["step"] >= purge_step:
                    self._to_tensorboard(record)
        if log.wandb_project:
            self.wandb_run = _start_wandb(path.parent, log, run_config, resumed=keep_through_step >= 0)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())  # before the step's checkpoint: a resume never rewrites lines up to its step
        numbers = scalars(record)
        if self.tensorboard is not None:
            self._to_tensorboard(record)
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=record["step"])
        shown = "  ".join(f"{k} {record[k]:.4g}" for k in SHOWN if k in record)
        try:
            self.console.print(f"[bold]{record['kind']:>5} step {record['step']:>4}[/bold]  {shown}")
        except OSError as error:
            # A terminal that hung up after this step's stop check (a closed ssh session): the record is in the file
            # above, and the SIGHUP is recorded; the next check sends the output elsewhere (train/preemption.py).
            if error.errno != errno.EIO:
                raise

    def _to_tensorboard(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.tensorboard.add_scalar(name, value, record["step"])
        self.tensorboard.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(out_dir: Path, log: LogConfig, run_config: dict, resumed: bool):
    """A W&B run that a resumed training run continues (its id is kept in the run folder); a fresh start,
    also in a folder whose earlier attempt stopped before its first checkpoint, is a W&B run of its own.

    W&B ignores a step below the run's last one: the steps a resume redoes (those after its checkpoint)
    keep the values the earlier attempt logged there, in W&B only (metrics.jsonl and TensorBoard are cut back)."""
    try:
        import wandb
    except ImportError as error:
        raise RuntimeError(f"log.wandb_project is set but wandb cannot be imported ({error}); pip install wandb") from error
    id_file = out_dir / WANDB_ID_FILE
    if not resumed or not id_file.exists():
        write_text_atomic(id_file, wandb.util.generate_id())
    run_id = id_file.read_text(encoding="utf-8").strip()
    return wandb.init(project=log.wandb_project, name=log.wandb_run_name, id=run_id, resume="allow", dir=str(out_dir), config=run_config)


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each line; a last line cut short (a crash or a full disk mid-write) is dropped."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON record ({error})") from None
    return records


def read_metrics(path: Path) -> list[dict]:
    return [record for _, record in _records(path)]
