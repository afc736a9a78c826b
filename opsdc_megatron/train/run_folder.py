"""A run's out_dir as the trainer leaves it: step checkpoints (complete once their trainer state is in), the
`latest` marker naming the newest, the best and final exports; and which checkpoint a run resumes from.

Without megatron-core: `opsdc train` and the SLURM job script check an out_dir before any trainer process
starts (`cli.preflight`), and importing megatron-core for that took seconds of every launch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from opsdc_megatron.config import ConfigError

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
BEST_EXPORT, FINAL_EXPORT = "best_hf", "final_hf"


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def complete_checkpoints(root: Path) -> list[Path]:
    """The step folders a save finished (renamed from `.tmp`, trainer state inside), oldest first."""
    found = [p for p in root.glob("step_*") if p.name.removeprefix("step_").isdigit() and (p / TRAINER_STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=step_of)


def resume_point(out: Path, resume: bool, steps: int) -> Path | None:
    """The checkpoint a run in `out` resumes from (None: it starts at step 0), once what would mix two
    runs is refused. A run told not to resume refuses checkpoints already there: saving and pruning among
    another run's (a later step sorts last) would delete its own, and a later resume would take the other's.
    A run that resumes nothing refuses another run's best_hf/final_hf, which would stay beside its metrics.
    A resume from past `steps` (train.steps lowered) is refused: it would train nothing and export the
    checkpoint's later weights as final_hf of a run whose config.yaml says fewer steps."""
    earlier = complete_checkpoints(out / "checkpoints")
    if not resume and earlier:
        raise ConfigError(
            f"{out / 'checkpoints'} holds checkpoints of another run ({', '.join(p.name for p in earlier)}), and this run starts "
            f"from step 0 (checkpoint.resume is false): give another out_dir, or remove them"
        )
    exports = [name for name in (BEST_EXPORT, FINAL_EXPORT) if (out / name).exists()]
    if exports and not earlier:
        raise ConfigError(
            f"{out} holds {' and '.join(exports)} of another run and no checkpoint to resume from: give another out_dir, or remove them"
        )
    resumed = latest_checkpoint(out / "checkpoints") if resume else None
    if resumed is not None and resumed.name.removeprefix("step_").isdigit() and step_of(resumed) > steps:
        raise ConfigError(f"{resumed} is past train.steps = {steps}: raise train.steps, or give another out_dir")
    return resumed


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names; without the marker, the newest complete one (a save stopped
    between its folder's rename and the marker's write, e.g. by SIGKILL after SIGTERM)."""
    marker = root / LATEST
    if not marker.exists():
        complete = complete_checkpoints(root)
        if complete and dist.is_initialized() and dist.get_rank() == 0:  # not the launcher's preflight: rank 0 says it
            print(f"opsdc train: {marker} is missing; resuming from the newest complete checkpoint, {complete[-1]}", file=sys.stderr, flush=True)
        return complete[-1] if complete else None
    path = root / marker.read_text(encoding="utf-8").strip()
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"{marker} names {path}, which is not a complete checkpoint")
    return path


TRAJECTORY_SECTIONS = ("model", "rollout", "distill", "train")
"""What the run's trajectory depends on; of these, what a resume may change without changing it (the layout's
keys, the servers', the step count) or what another note covers (train.seed: the prompt stream's) is left out."""
_LAYOUT_KEYS = frozenset({
    "model.megatron_checkpoint", "model.attention_backend", "model.activation_recompute", "rollout.engine",
    "train.steps", "train.seed", "train.micro_batch_tokens",
})


def trajectory_changes(saved: dict, current: dict) -> list[str]:
    """The settings of the run's last attempt (its config.yaml, as plain data) that `current` (`asdict` of the
    RunConfig) changes, as `key (was X, now Y)`: a resume goes on under them, which a reader of the run should know."""

    def flat(values: dict, prefix: str = "") -> dict:
        out: dict = {}
        for key, value in values.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                if name != "rollout.sglang":
                    out.update(flat(value, f"{name}."))
            elif name not in _LAYOUT_KEYS:
                out[name] = value
        return out

    before = flat({section: saved.get(section, {}) for section in TRAJECTORY_SECTIONS})
    after = flat(json.loads(json.dumps({section: current[section] for section in TRAJECTORY_SECTIONS})))  # tuples as YAML reads them: lists

    def shown(value: object) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{key} (was {shown(before[key])}, now {shown(value)})" for key, value in after.items() if key in before and before[key] != value]
