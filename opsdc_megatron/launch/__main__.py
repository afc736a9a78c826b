"""`python -m opsdc_megatron.launch --recipe R --executor slurm|local [key=value ...]`: an OPSDC run through nemo-run.

The recipe is checked first, on the submitting machine (`launch/plan.py`: parallel plan, the recipe's
`slurm` section, model and prompt files), so a wrong job fails before it queues. Then:

- slurm: a nemo-run SlurmExecutor job of slurm.trainer_nodes nodes, one srun task per GPU (per process
  on CPU) running `opsdc train` with RANK/WORLD_SIZE/LOCAL_RANK from SLURM, MASTER_ADDR on the first
  node (SLURM_LAUNCH_NODE_IPADDR). `--signal-before-limit-s` asks SLURM for SIGUSR1 on every task before the time limit: the
  trainer checkpoints and exits 75, and nemo-run's batch script requeues the job (`--retries`), which
  resumes from OUT/checkpoints/latest. LocalTunnel submits on this machine (a login node).
- local: a nemo-run LocalExecutor running one `opsdc train`, which starts tensor x pipeline x data
  processes under torchrun itself (and forwards stop signals to them). nemo-run's own torchrun launcher is
  not used: nemo-run 0.11.1 hands it arguments with shell quotes in them, which break paths with spaces.

Both run the recipe as checked: the recipe with its overrides applied is written to
OUT/launcher/<recipe>.yaml and the tasks get that one file.

The SGLang rollout servers (rollout.engine=sglang) are started by slurm/opsdc_job.sh only; this
launcher refuses such recipes with a message saying so.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from opsdc_megatron.config import ConfigError, merge_config, to_yaml
from opsdc_megatron.files import write_text_atomic
from opsdc_megatron.launch.plan import JobPlan, PlanError, hf_rollout_memory_notes, plan_job, trainer_checks

# Each task: its rank from SLURM, the rendezvous on the address of the node srun was started from (the
# batch script's, the allocation's first node, which holds task 0; an address, so unresolvable node
# names do not matter, and no SLURM client tools are needed inside a container image), then the
# trainer, which sees LOCAL_RANK and runs in place.
SLURM_TASK = """\
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID OPSDC_INPUTS_CHECKED=1
export MASTER_ADDR=$SLURM_LAUNCH_NODE_IPADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 5000)) OMP_NUM_THREADS=${{OMP_NUM_THREADS:-1}}
export CUDA_DEVICE_MAX_CONNECTIONS=${{CUDA_DEVICE_MAX_CONNECTIONS:-1}} TORCH_NCCL_ASYNC_ERROR_HANDLING=${{TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}}
cd {home} || {{ echo "opsdc launch: no {home} on $(hostname): the checkout must be at the same path on every node and in the container" >&2; exit 2; }}
exec {python} -m opsdc_megatron.cli train {recipe}
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m opsdc_megatron.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="YAML recipe, e.g. recipes/qwen3_8b.yaml")
    parser.add_argument("--executor", choices=("slurm", "local"), required=True)
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", default="04:00:00", help="SLURM time limit (default 04:00:00)")
    parser.add_argument("--mem", help="SLURM --mem per node, e.g. 0 (all) or 8G; default: the cluster's")
    parser.add_argument("--container-image", help="pyxis/enroot image for the trainer tasks")
    parser.add_argument("--container-mounts", action="append", default=[], metavar="SRC:DST",
                        help="a container mount; repeat the flag for more (one flag took the overrides after it as mounts)")
    parser.add_argument("--python", help="interpreter on the nodes (default: this one; 'python' in a container)")
    parser.add_argument("--signal-before-limit-s", type=int, default=300, help="SIGUSR1 this many seconds before the time limit")
    parser.add_argument("--retries", type=int, default=3, help="requeues after a checkpoint-and-exit or a failure")
    parser.add_argument("--dryrun", action="store_true", help="write the nemo-run job (the sbatch script for slurm) without running it")
    parser.add_argument("--detach", action="store_true", help="slurm: return once submitted")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = str(Path(args.recipe).resolve())
    try:
        config = merge_config(recipe, args.overrides)
        plan = plan_job(config)
        if plan.rollout_engine != "hf":
            raise PlanError(f"rollout.engine={plan.rollout_engine}: the rollout server step is in slurm/opsdc_job.sh only; "
                            f"submit slurm/<recipe>.sbatch, or use rollout.engine=hf with this launcher")
        trainer_checks(config, strict=True)
    except (ConfigError, PlanError) as error:
        print(f"opsdc launch: error: {error}", file=sys.stderr)
        sys.exit(2)
    for note in hf_rollout_memory_notes(config):
        print(f"opsdc launch: note: {note}", file=sys.stderr)
    out_dir = Path(config.out_dir).resolve()
    # nemo-run reads NEMORUN_HOME when imported; its records of this run live beside the run. (nemo-run 0.11.1
    # doubles the job paths of a LocalTunnel when NEMORUN_HOME contains "nemo_run", hence the name.)
    os.environ.setdefault("NEMORUN_HOME", str(out_dir / "launcher"))
    if "nemo_run" in os.environ["NEMORUN_HOME"]:
        print(f"opsdc launch: error: NEMORUN_HOME ({os.environ['NEMORUN_HOME']}) contains 'nemo_run', which makes nemo-run "
              f"0.11.1 write its SLURM job paths wrongly; choose another out_dir or NEMORUN_HOME", file=sys.stderr)
        sys.exit(2)
    if args.executor == "slurm" and any(char.isspace() for char in os.environ["NEMORUN_HOME"]):
        print(f"opsdc launch: error: NEMORUN_HOME ({os.environ['NEMORUN_HOME']}) contains a space, and nemo-run 0.11.1 "
              f"passes its sbatch script's path there to sbatch unquoted; choose another out_dir or NEMORUN_HOME", file=sys.stderr)
        sys.exit(2)
    import nemo_run as run

    name = f"opsdc-{Path(recipe).stem}"
    # Beside the run, whatever NEMORUN_HOME is: jobs that share one would read each other's recipe.
    resolved_recipe = out_dir / "launcher" / f"{Path(recipe).stem}.yaml"
    resolved_recipe.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(resolved_recipe, to_yaml(config))
    if args.executor == "slurm":
        executor = slurm_executor(run, plan, args)
        python = args.python or ("python" if args.container_image else sys.executable)
        home, python, recipe_path = _quote([os.getcwd(), python, str(resolved_recipe)])
        task = run.Script(inline=SLURM_TASK.format(home=home, python=python, recipe=recipe_path))
    else:
        # `python` resolved in this interpreter's environment, activated or not.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        executor = run.LocalExecutor(ntasks_per_node=1, env_vars={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PATH": path})
        task = run.Script(path="opsdc_megatron.cli", m=True, entrypoint="python", args=["train", str(resolved_recipe)])
    with run.Experiment(name, log_level="WARN") as experiment:
        experiment.add(task, executor=executor, name="trainer")
        if args.dryrun:
            experiment.dryrun(delete_exp_dir=False)
            print(f"opsdc launch: dry run written under {os.environ['NEMORUN_HOME']}/experiments/{name}")
            return
        experiment.run(detach=args.detach)
    if args.detach:
        return
    # Only leaving the `with` block waits for the jobs (nemo-run 0.11.1: run() returns once they are submitted).
    if args.executor == "slurm":  # nemo-run 0.11.1 leaves job.state at SUBMITTED; ask the cluster's accounting
        states = {job.id: _slurm_state(job.handle) for job in experiment.jobs}
    else:
        states = {job.id: job.state.name for job in experiment.jobs}
    print(f"opsdc launch: {name}: {states}")
    if any(state not in ("SUCCEEDED", "COMPLETED") for state in states.values()):
        sys.exit(1)


def slurm_executor(run, plan: JobPlan, args: argparse.Namespace):
    """The trainer nodes of `plan` as a SlurmExecutor submitting with sbatch on this machine."""
    experiments = Path(os.environ["NEMORUN_HOME"]) / "experiments"
    return run.SlurmExecutor(
        account=args.account, partition=args.partition, job_name_prefix="opsdc-", time=args.time, nodes=plan.trainer_nodes,
        ntasks_per_node=plan.trainer_tasks_per_node, gpus_per_node=plan.gpus_per_node or None,
        exclusive=True if plan.gpus_per_node else None, mem=args.mem,
        signal=f"USR1@{args.signal_before_limit_s}", retries=args.retries,
        additional_parameters={"requeue": True},
        container_image=args.container_image, container_mounts=args.container_mounts,
        tunnel=run.LocalTunnel(job_dir=str(experiments)), packager=run.Packager(),
    )


def _slurm_state(handle: str) -> str:
    """COMPLETED, FAILED, ... of the SLURM job behind a nemo-run handle (its last path component is the job id)."""
    import subprocess

    job_id = handle.rstrip("/").rsplit("/", 1)[-1]
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)  # right after the end
    state = re.search(r"\bJobState=(\S+)", shown.stdout)
    if state:
        return state.group(1)
    shown = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return shown.stdout.strip().split()[0] if shown.stdout.strip() else f"UNKNOWN (job {job_id}: {shown.stderr.strip()})"


def _quote(words: list[str]) -> list[str]:
    import shlex

    return [shlex.quote(word) for word in words]


if __name__ == "__main__":
    main()
