"""The sbatch scripts and the nemo-run launcher on a real SLURM cluster started on this machine.

tools/setup_slurm.sh starts munge, MariaDB + slurmdbd, slurmctld and three slurmd (simulated nodes of
8 fake GPUs each: character devices, nothing opens them); tools/stop_slurm.sh stops them at the end,
also when a test fails. The toy jobs are real megatron-core runs (TP=2, 2 CPU processes) on a tiny
random Qwen3; the H100 scripts run in validation mode (allocation checked, steps printed, no GPU work).
The only stand-ins are the GPUs and the network between nodes (all nodes are this host).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from opsdc_megatron.config import merge_config
from opsdc_megatron.launch.plan import Allocation, PlanError, check_allocation, hf_rollout_memory_notes, plan_job
from opsdc_megatron.plan import H100_80GB_GIB, ModelShape, Workload, choose
from opsdc_megatron.rollout.sglang.launcher import DEFAULT_SGLANG_PYTHON
from opsdc_megatron.toy.task import TOY_INSTRUCTION
from opsdc_megatron.train.metrics import read_metrics
from tests.launch import free_base_port
from tests.tiny_models import save_toy_qwen3

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
COMPARED = ("loss", "grad_norm", "mean_response_tokens", "rollout_accuracy", "teacher_age_steps")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running cluster: the environment to call sbatch/squeue/scontrol with (SLURM_CONF)."""
    if os.geteuid() != 0:
        pytest.skip("tools/setup_slurm.sh installs and starts munge, MariaDB and the SLURM daemons (apt-get, runuser): needs root, as CI has")
    run_dir = tmp_path_factory.mktemp("slurm_cluster")
    env = dict(os.environ, SLURM_CONF=str(run_dir / "etc" / "slurm.conf"))
    try:
        started = subprocess.run(["bash", str(ROOT / "tools" / "setup_slurm.sh"), str(run_dir)], capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, f"setup_slurm.sh failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        yield env
    finally:
        subprocess.run(["bash", str(ROOT / "tools" / "stop_slurm.sh"), str(run_dir)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A tiny random Qwen3 with the toy tokenizer, and toy prompts."""
    return save_toy_qwen3(tmp_path_factory.mktemp("slurm_toy"))


def sglang_base_port() -> int:
    """A base port free at every shift the job script may add (100 x (job id mod 20)): the job id is not
    known before submission."""
    return free_base_port(range(0, 2000, 100))


def toy_overrides(toy: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"out_dir={out}", f"model.hf_path={toy / 'model'}", f"data.train_prompts={toy / 'train.jsonl'}",
        "data.eval_prompts=null", "eval.every_steps=0", f"distill.instruction={TOY_INSTRUCTION}",
        f"train.steps={STEPS}", "train.global_batch_prompts=8", "rollout.generation_batch_prompts=4",
        "rollout.max_response_tokens=16", "train.lr=1e-3", "checkpoint.save_every_steps=0", *extra,
    ]


def sbatch(
    env: dict, script: str, log: Path, *args: str, extra_env: dict | None = None, wait: bool = True, extra_args: list[str] = (),
    submit_dir: Path = ROOT,
) -> tuple[int, str]:
    """Submits slurm/<script> from `submit_dir` (`extra_args`: sbatch options); returns (the job's exit status
    when `wait`, else 0; job id). Waits by polling scontrol every 0.5 s: `sbatch --wait` polls at up to 10 s.
    A job ended by a signal (ExitCode status:signal, e.g. 0:15) is status 1, as `sbatch --wait` says."""
    command = ["sbatch", "--parsable", f"--output={log}", *extra_args, str(ROOT / "slurm" / script), *args]
    proc = subprocess.run(command, cwd=submit_dir, env=dict(env, **(extra_env or {})), capture_output=True, text=True, timeout=120)
    job = proc.stdout.strip().split(";")[0]
    assert proc.returncode == 0 and job, f"sbatch refused {script}: {proc.stderr}"
    return (exit_status(env, job) if wait else 0), job


def exit_status(env: dict, job: str) -> int:
    """The job's exit status once it has ended (polling scontrol every 0.5 s)."""
    wait_until(lambda: job_field(env, job, "JobState") in ENDED, f"job {job} to end", timeout_s=900, poll_s=0.5)
    status, killed_by = map(int, job_field(env, job, "ExitCode").split(":"))
    return 1 if killed_by else status


def job_field(env: dict, job: str, name: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", shown)
    return match.group(1) if match else ""


def wait_until(condition, what: str, timeout_s: float = 600, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def latest_step(out: Path) -> int:
    marker = out / "checkpoints" / "latest"
    return int(marker.read_text().strip().removeprefix("step_")) if marker.exists() else 0


def train_metrics(out: Path) -> dict[int, dict]:
    records = [m for m in read_metrics(out / "metrics.jsonl") if m["kind"] == "train"]
    steps = [m["step"] for m in records]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {m["step"]: m for m in records}


def logged_steps(trainer_log: Path) -> list[int]:
    return [int(n) for n in re.findall(r"train step\s+(\d+)", trainer_log.read_text())]


@pytest.fixture(scope="module")
def uninterrupted(cluster, toy) -> dict[int, dict]:
    """The toy recipe through slurm/toy_cpu.sbatch, start to finish: the reference for the other runs."""
    out = toy / "uninterrupted"
    status, job = sbatch(cluster, "toy_cpu.sbatch", toy / "uninterrupted.log", *toy_overrides(toy, out))
    log = (toy / "uninterrupted.log").read_text()
    assert status == 0, log[-5000:]
    assert "no rollout server step: rollout.engine=hf" in log
    assert "trainer finished" in log
    return train_metrics(out)


def test_toy_recipe_runs_through_the_sbatch_script(uninterrupted, toy):
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))
    out = toy / "uninterrupted"
    assert (out / "final_hf" / "config.json").is_file()
    (log_dir,) = (out / "slurm_logs").iterdir()
    assert logged_steps(log_dir / "trainer.log") == list(range(1, STEPS + 1))
    assert "0: " in (log_dir / "trainer.log").read_text() and "1: " in (log_dir / "trainer.log").read_text()  # two ranks


def test_requeue_resumes_from_the_checkpoint_without_losing_or_repeating_a_step(cluster, toy, uninterrupted):
    """`scontrol requeue` (SIGTERM) mid-run, then SIGUSR1 as before a time limit (the script requeues itself).

    The final record has every step once, equal to the uninterrupted run's: no prompt batch lost or repeated.
    """
    out = toy / "requeued"
    log = toy / "requeued.log"
    _, job = sbatch(cluster, "toy_cpu.sbatch", log, *toy_overrides(toy, out, "checkpoint.save_every_steps=1"), wait=False)
    first = wait_until(lambda: latest_step(out), "the first checkpoint")
    assert first < STEPS - 2, f"the job reached step {first} before it could be requeued; raise STEPS"
    subprocess.run(["scontrol", "requeue", job], env=cluster, check=True)
    # Second run: wait until it resumed and checkpointed once more, then signal the batch script
    # the way `#SBATCH --signal=B:USR1@60` does before the time limit.
    wait_until(lambda: job_field(cluster, job, "Restarts") == "1" and job_field(cluster, job, "JobState") == "RUNNING", "the requeued job to run")
    stopped = latest_step(out)
    second = wait_until(lambda: latest_step(out) if latest_step(out) > stopped else 0, "a checkpoint of the second run")
    assert second < STEPS, f"the second run finished (step {second}) before the signal; raise STEPS"
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    wait_until(lambda: job_field(cluster, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job to end", poll_s=1)
    batch_log = log.read_text()
    assert job_field(cluster, job, "JobState") == "COMPLETED", batch_log[-5000:]
    assert job_field(cluster, job, "Restarts") == "2", batch_log[-5000:]
    assert "received SIGUSR1" in batch_log and "requeueing the job" in batch_log

    runs = sorted((out / "slurm_logs").iterdir(), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    assert [p.name for p in runs] == [f"job_{job}_restart_{n}" for n in range(3)]
    steps_run = [logged_steps(p / "trainer.log") for p in runs]
    # SIGTERM: SLURM kills the step after KillWait, so the checkpoint is best effort; the next run starts
    # right after the newest complete checkpoint (a step done after it is done again, from the same state).
    assert 1 < steps_run[1][0] <= steps_run[0][-1] + 1, steps_run
    # SIGUSR1: the trainer checkpoints after its step and the next run starts exactly there.
    assert "stopping after step" in (runs[1] / "trainer.log").read_text() and "on SIGUSR1" in (runs[1] / "trainer.log").read_text()
    assert steps_run[2][0] == steps_run[1][-1] + 1 and steps_run[2][-1] == STEPS, steps_run
    # Same prompts, samples and updates as the run that was never interrupted.
    requeued = train_metrics(out)
    assert sorted(requeued) == list(range(1, STEPS + 1))
    for step in requeued:
        for key in COMPARED:
            assert requeued[step][key] == uninterrupted[step][key], (step, key)


def test_sigusr1_before_the_trainer_runs_requeues_the_job(cluster, toy):
    """SIGUSR1 while the script still checks the recipe (its default action ended the batch script there,
    neither requeued nor cleaned up): the job is requeued and the next run trains to the end."""
    out, log = toy / "early_signal", toy / "early_signal.log"
    _, job = sbatch(cluster, "toy_cpu.sbatch", log, *toy_overrides(toy, out), wait=False)
    wait_until(lambda: log.exists() and "[opsdc" in log.read_text(), "the batch script to start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    wait_until(lambda: job_field(cluster, job, "Restarts") == "1" and job_field(cluster, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
               "the requeued job to end", poll_s=1)
    batch_log = log.read_text()
    assert job_field(cluster, job, "JobState") == "COMPLETED", batch_log[-5000:]
    assert "received SIGUSR1" in batch_log and "requeueing the job" in batch_log
    assert sorted(train_metrics(out)) == list(range(1, STEPS + 1))


def test_sigusr1_while_the_trainer_process_starts_is_a_clean_stop(cluster, toy):
    """SIGUSR1 after the trainer step started but before Python installed the stop handler (imports take
    seconds on a cluster filesystem). Its default action killed the trainer and the job failed; now the
    trainer starts with SIGUSR1 ignored and finds the job script's stop file at its first check. Here the
    interpreter is a wrapper that holds the trainer 5 s before Python starts, so the signal lands there."""
    out, log = toy / "signal_at_start", toy / "signal_at_start.log"
    started = toy / "signal_at_start.trainer_started"
    wrapper = toy / "slow_start_python"
    wrapper.write_text(
        "#!/bin/bash\n"
        f'if [ "$2" = opsdc_megatron.cli ] && [ ! -e {started} ]; then : > {started}; sleep 5; fi\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    wrapper.chmod(0o755)
    _, job = sbatch(cluster, "toy_cpu.sbatch", log, *toy_overrides(toy, out), wait=False, extra_env={"OPSDC_PYTHON": str(wrapper)})
    wait_until(started.exists, "the trainer step to start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    wait_until(lambda: job_field(cluster, job, "JobState") == "FAILED" or (  # FAILED: the signal killed the trainer
        job_field(cluster, job, "Restarts") == "1" and job_field(cluster, job, "JobState") in ("COMPLETED", "CANCELLED")),
               "the requeued job to end", poll_s=1)
    batch_log = log.read_text()
    first_trainer_log = (out / "slurm_logs" / f"job_{job}_restart_0" / "trainer.log").read_text()
    assert job_field(cluster, job, "JobState") == "COMPLETED", batch_log[-5000:]
    assert "opsdc train: stopping before step 1 on SIGUSR1 to the job" in first_trainer_log, first_trainer_log[-3000:]
    assert "trainer stopped on SIGUSR1" in batch_log and sorted(train_metrics(out)) == list(range(1, STEPS + 1))


def test_a_refused_requeue_is_a_failed_job_not_a_completed_one(cluster, toy):
    """Submitted with --no-requeue, SIGUSR1 checkpoints the run but SLURM will not requeue it: the job
    must not end as COMPLETED (it did, and never resumed); exit 75 says 'rerun to resume'."""
    out, log = toy / "no_requeue", toy / "no_requeue.log"
    _, job = sbatch(cluster, "toy_cpu.sbatch", log, *toy_overrides(toy, out, "checkpoint.save_every_steps=1"), wait=False, extra_args=["--no-requeue"])
    step = wait_until(lambda: latest_step(out), "the first checkpoint")
    assert step < STEPS - 1, f"the job reached step {step} before the signal; raise STEPS"
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    wait_until(lambda: job_field(cluster, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job to end", poll_s=1)
    batch_log = log.read_text()
    assert job_field(cluster, job, "JobState") == "FAILED" and job_field(cluster, job, "ExitCode") == "75:0", batch_log[-5000:]
    assert "FAILED to requeue" in batch_log and (out / "checkpoints" / "latest").exists()


def test_a_trainer_that_fails_after_sigusr1_is_reported_not_requeued(cluster, toy):
    """SIGUSR1, then the trainer's stop checkpoint fails (a file stands where the step's folder goes): the
    job ends FAILED with the trainer's status and is not requeued (every exit after SIGUSR1 was requeued,
    up to OPSDC_MAX_REQUEUES times)."""
    out, log = toy / "fails_after_signal", toy / "fails_after_signal.log"
    (out / "checkpoints").mkdir(parents=True)
    for step in range(STEPS + 1):
        (out / "checkpoints" / f"step_{step:06d}").write_text("not a checkpoint folder\n")
    _, job = sbatch(cluster, "toy_cpu.sbatch", log, *toy_overrides(toy, out), wait=False)
    trainer_log = out / "slurm_logs" / f"job_{job}_restart_0" / "trainer.log"
    wait_until(lambda: trainer_log.exists() and logged_steps(trainer_log), "the first step")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    wait_until(lambda: job_field(cluster, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job to end", poll_s=1)
    batch_log, trainer_output = log.read_text(), trainer_log.read_text()
    assert max(logged_steps(trainer_log)) < STEPS, "the run ended before the signal; raise STEPS"
    assert job_field(cluster, job, "JobState") == "FAILED" and job_field(cluster, job, "Restarts") == "0", batch_log[-5000:]
    assert "received SIGUSR1" in batch_log and "without its stop checkpoint" in batch_log and "requeueing the job" not in batch_log
    assert "NotADirectoryError" in trainer_output and "checkpoint saved, exit" not in trainer_output


@pytest.mark.parametrize("executor, executor_args", [("slurm", ["--time", "00:20:00", "--mem", "4G"]), ("local", [])])
def test_nemo_run_launcher_runs_the_same_job(cluster, toy, uninterrupted, executor, executor_args):
    """SlurmExecutor (sbatch on the test cluster) and LocalExecutor (torchrun here) reproduce the sbatch run. The
    local run's out_dir has a space (nemo-run's own torchrun launcher got the recipe path with shell quotes in it;
    its SLURM submission cannot take one, see the next test)."""
    out = toy / f"through{' ' if executor == 'local' else '_'}launcher_{executor}"  # (not "nemo_run": see NEMORUN_HOME in launch/__main__.py)
    proc = subprocess.run(
        [sys.executable, "-m", "opsdc_megatron.launch", "--recipe", "recipes/toy_cpu.yaml", "--executor", executor,
         *executor_args, *toy_overrides(toy, out)],
        cwd=ROOT, env=dict(cluster, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"{{'trainer': '{'COMPLETED' if executor == 'slurm' else 'SUCCEEDED'}'}}" in proc.stdout
    nemo = train_metrics(out)
    assert sorted(nemo) == list(range(1, STEPS + 1))
    for step in nemo:
        for key in COMPARED:
            assert nemo[step][key] == uninterrupted[step][key], (step, key)


def test_launcher_container_mounts_leave_the_overrides_alone() -> None:
    """--container-mounts took every argument after it (nargs="*"): the overrides became mounts."""
    from opsdc_megatron.launch.__main__ import parse_args

    args = parse_args(["--recipe", "r.yaml", "--executor", "slurm", "--container-mounts", "/data:/data", "--container-mounts", "/m:/m",
                       "out_dir=/x", "model.hf_path=/m/q"])
    assert args.container_mounts == ["/data:/data", "/m:/m"] and args.overrides == ["out_dir=/x", "model.hf_path=/m/q"]


def test_the_server_step_refuses_a_port_another_jobs_server_holds(tmp_path, monkeypatch, capsys) -> None:
    """Jobs whose ids are 20 apart share shifted ports: the second job's server step exec'd SGLang anyway (which
    then failed to bind, unseen) and its trainer used the first job's server. Now it exits, naming the port; also
    with the IPv6 bind address (its URL lacked brackets)."""
    import socket

    from opsdc_megatron.launch.sglang_step import main as step_main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for bind_host in ("0.0.0.0", "::"):
            monkeypatch.setenv("OPSDC_BIND_HOST", bind_host)
            monkeypatch.setenv("SLURM_LOCALID", "0")
            with pytest.raises(SystemExit) as exit_:
                step_main(["server", "--recipe", str(ROOT / "recipes" / "toy_cpu_sglang.yaml"), "out_dir=x", "model.hf_path=x",
                           "data.train_prompts=x", f"rollout.sglang.base_port={port}", f"rollout.sglang.python={sys.executable}"])
            assert exit_.value.code == 1 and f"port {port} is already in use" in capsys.readouterr().err


def test_a_failed_server_task_says_why_to_the_job_script_and_a_stopped_one_does_not(tmp_path, monkeypatch, capsys) -> None:
    """The server step's tasks run SGLang to its end (they exec'd it): one that fails leaves a line in
    $OPSDC_FAILED_TASK_DIR, named by task, with the status; one stopped by SIGTERM (the job's stop) leaves none."""
    from opsdc_megatron.launch.sglang_step import run_task

    monkeypatch.setenv("OPSDC_FAILED_TASK_DIR", str(tmp_path))
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURMD_NODENAME", "node7")
    with pytest.raises(SystemExit) as exit_:
        run_task("server", [sys.executable, "-c", "import sys; sys.exit(5)"], dict(os.environ))
    assert exit_.value.code == 5
    assert (tmp_path / "sglang_server_task_3.failed").read_text() == f"sglang server task 3 on node7: {sys.executable} -c import sys; sys.exit(5) ... exited with status 5\n"

    (tmp_path / "sglang_server_task_3.failed").unlink()
    waiting = [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); print('up', flush=True); time.sleep(60)"]
    stopper = threading.Timer(3, os.kill, (os.getpid(), signal.SIGTERM))  # srun passes the job's SIGTERM to the task
    stopper.start()
    try:
        with pytest.raises(SystemExit) as exit_:
            run_task("server", waiting, dict(os.environ))
    finally:
        stopper.cancel()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert exit_.value.code == 143 and not list(tmp_path.iterdir())

    # A folder the task cannot write to: the reason still reaches its log, with the command's status
    monkeypatch.setenv("OPSDC_FAILED_TASK_DIR", str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as exit_:
        run_task("server", [sys.executable, "-c", "import sys; sys.exit(5)"], dict(os.environ))
    assert exit_.value.code == 5 and "exited with status 5" in capsys.readouterr().err


def test_launcher_keeps_each_runs_recipe_beside_the_run(toy, tmp_path):
    """Two jobs under one NEMORUN_HOME: each SLURM task reads its own resolved recipe (a shared path
    made job A train into job B's out_dir). Dry runs: nothing is submitted. The interpreter's path has a
    space: the task script left it unquoted (`exec /path/sp ace/bin/python` ran /path/sp)."""
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "shared_home"))
    python = tmp_path / "sp ace" / "python"
    python.parent.mkdir()
    python.symlink_to(sys.executable)
    for run in ("a", "b"):
        proc = subprocess.run(
            [sys.executable, "-m", "opsdc_megatron.launch", "--recipe", "recipes/toy_cpu.yaml", "--executor", "slurm", "--dryrun",
             "--python", str(python), *toy_overrides(toy, tmp_path / run)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in ("a", "b"):
        recipe = tmp_path / run / "launcher" / "toy_cpu.yaml"
        assert yaml.safe_load(recipe.read_text())["out_dir"] == str(tmp_path / run)
    refused = subprocess.run(  # nemo-run 0.11.1 hands sbatch its script's path unquoted: "Batch script is empty!"
        [sys.executable, "-m", "opsdc_megatron.launch", "--recipe", "recipes/toy_cpu.yaml", "--executor", "slurm", "--dryrun",
         *toy_overrides(toy, tmp_path / "c")], cwd=ROOT, env=dict(env, NEMORUN_HOME=str(tmp_path / "home with space")),
        capture_output=True, text=True, timeout=300,
    )
    assert refused.returncode == 2 and "contains a space, and nemo-run 0.11.1" in refused.stderr, refused.stderr[-3000:]
    script = next((tmp_path / "shared_home").rglob("trainer.sh"))  # the task nemo-run runs on each node
    exec_line = next(line for line in script.read_text().splitlines() if "-m opsdc_megatron.cli train" in line)
    assert shlex.split(exec_line)[1] == str(python), exec_line


@pytest.mark.sglang
@pytest.mark.skipif(not DEFAULT_SGLANG_PYTHON.exists(), reason="needs .venv-sglang: run `make env-sglang`")
def test_toy_recipe_with_an_sglang_server_step(cluster, toy):
    """slurm/toy_cpu_sglang.sbatch: a real SGLang server (CPU) and sglang-router as steps of the job on node 1
    (the script waits for the router's /readiness), the trainer (TP=2) as another on node 2; the trainer's
    rollouts come from that server and its weights go back to it. The job runs behind a cluster-style http_proxy that reaches nothing: the script's readiness check, the
    trainer's requests and the server's own go around it."""
    out = toy / "sglang"
    port = free_base_port(range(0, 2000, 50))  # the servers' and the router's (base + 50) at every shift
    dead_proxy = {name: "http://127.0.0.1:9" for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")}
    status, job = sbatch(cluster, "toy_cpu_sglang.sbatch", toy / "sglang.log", *toy_overrides(
        toy, out, f"rollout.sglang.base_port={port}", f"rollout.sglang.router_port={port + 50}", "rollout.sglang.startup_timeout_s=900"),
                         extra_env=dead_proxy)
    log = (toy / "sglang.log").read_text()
    assert status == 0, log[-5000:]
    shift = int(job) % 20 * 100
    assert f"rollout servers ready: http://127.0.0.1:{port + shift} (router http://127.0.0.1:{port + 50 + shift})" in log and "trainer finished" in log
    steps = subprocess.run(["sacct", "-j", job, "-n", "-P", "-o", "JobID,JobName,NodeList"], env=cluster, capture_output=True, text=True).stdout
    named = {line.split("|")[1]: line.split("|")[2] for line in steps.splitlines() if "." in line.split("|")[0]}
    assert named.get("sglang_servers") == "node1" and named.get("sglang_router") == "node1" and named.get("trainer") == "node2", steps
    (log_dir,) = (out / "slurm_logs").iterdir()
    assert logged_steps(log_dir / "trainer.log") == list(range(1, STEPS + 1))
    assert sorted(train_metrics(out)) == list(range(1, STEPS + 1))
    server_log = (log_dir / "sglang_servers.log").read_text()
    assert "-m sglang.launch_server" in server_log and "--device cpu" in server_log
    # Every step's rollouts were sampled from the server at the weights pushed after the step before
    # (the engine checks each answer's weight version); the server saw the pushes and the rollouts.
    assert server_log.count("/update_weights_from_distributed") >= STEPS + 1, server_log[-3000:]
    assert "/generate" in server_log


@pytest.mark.sglang
@pytest.mark.skipif(not DEFAULT_SGLANG_PYTHON.exists(), reason="needs .venv-sglang: run `make env-sglang`")
def test_sigusr1_while_the_servers_start_requeues_without_waiting_for_them(cluster, toy):
    """The script waited for every server's /health (up to rollout.sglang.startup_timeout_s, longer than the
    signal's margin in the H100 recipes) before acting on a SIGUSR1 that came meanwhile."""
    out, log = toy / "signal_at_servers", toy / "signal_at_servers.log"
    _, job = sbatch(cluster, "toy_cpu_sglang.sbatch", log, *toy_overrides(toy, out, f"rollout.sglang.base_port={sglang_base_port()}",
                                                                          "rollout.sglang.startup_timeout_s=900"), wait=False)
    try:
        wait_until(lambda: log.exists() and "rollout step:" in log.read_text(), "the server step to start")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
        wait_until(lambda: "requeueing the job" in log.read_text(), "the requeue")
        first_run = log.read_text().split("requeueing the job")[0]
        assert "SIGUSR1 came before the trainer started" in first_run and "rollout servers ready" not in first_run, first_run[-3000:]
    finally:
        subprocess.run(["scancel", job], env=cluster)
        wait_until(lambda: job_field(cluster, job, "JobState") in ("CANCELLED", "COMPLETED", "FAILED"), "the job to end", poll_s=1)


SERVER_START_FAILURES = {"one-of-two": (2, 1), "the-only-one": (1, 0)}
"""Each case's (servers in the job, the task whose port is held)."""


@pytest.fixture(scope="module")
def server_start_failures(cluster, toy, tmp_path_factory) -> dict[str, tuple[int, str, int, str]]:
    """Both cases' jobs, submitted together: (exit status, job id, the failing task's port, the job's log) by case.
    Case k's servers use base + 2k + the job's shift + task (distinct ports); at every shift the job id may give,
    the failing task's port is held by a socket that never answers."""
    import socket

    shifts = range(0, 2000, 100)
    base = free_base_port([shift + k for shift in shifts for k in range(3)])
    folder = tmp_path_factory.mktemp("server_start_failures")
    holders, jobs = [], {}
    try:
        for k, (case, (servers, failing_task)) in enumerate(SERVER_START_FAILURES.items()):
            for shift in shifts:
                holders.append(socket.socket())
                holders[-1].bind(("127.0.0.1", base + 2 * k + shift + failing_task))
                holders[-1].listen()
            _, jobs[case] = sbatch(cluster, "toy_cpu_sglang.sbatch", folder / f"{case}.log", *toy_overrides(
                toy, folder / case, f"rollout.sglang.base_port={base + 2 * k}", f"rollout.sglang.num_servers={servers}",
                "rollout.sglang.startup_timeout_s=120"), wait=False)
        status = {case: exit_status(cluster, job) for case, job in jobs.items()}
    finally:
        for holder in holders:
            holder.close()
    return {
        case: (status[case], job, base + 2 * k + int(job) % 20 * 100 + SERVER_START_FAILURES[case][1], (folder / f"{case}.log").read_text())
        for k, (case, job) in enumerate(jobs.items())
    }


@pytest.mark.sglang
@pytest.mark.skipif(not DEFAULT_SGLANG_PYTHON.exists(), reason="needs .venv-sglang: run `make env-sglang`")
@pytest.mark.parametrize("case", SERVER_START_FAILURES)
def test_a_server_task_failing_at_start_fails_the_job_at_once_naming_it(server_start_failures, case):
    """A server task's port is held by something that never answers, and the task exits. With two servers its
    step goes on (--kill-on-bad-exit=0, so that a server's death mid-run leaves the others), and the script
    waited for that task's /health until rollout.sglang.startup_timeout_s (1800 s in the H100 recipes), then
    blamed the timeout; with one, the step ends, and the script said only that. Now it stops at once, naming
    the task, its node and why."""
    status, _, task_port, text = server_start_failures[case]
    failing_task = SERVER_START_FAILURES[case][1]
    assert status == 1 and re.search(
        rf"FAILED while waiting for \S+/health: sglang server task {failing_task} on node1: .*port {task_port} is already in use", text
    ), text[-3000:]
    assert "did not answer within" not in text and "trainer started" not in text, text[-3000:]


@pytest.mark.parametrize(
    "script, nodes, trainer_nodes, servers_per_node, gpus_per_server",
    [("qwen3_8b.sbatch", 2, 1, 8, 1), ("qwen3_14b.sbatch", 3, 2, 4, 2), ("qwen3_32b.sbatch", 3, 2, 2, 4)],
)
def test_h100_scripts_validate_on_the_fake_gpu_cluster(cluster, tmp_path, script, nodes, trainer_nodes, servers_per_node, gpus_per_server):
    """Submitted from the checkout's parent with a relative OPSDC_HOME (the default interpreter was then
    looked up relative to the checkout, after the script's cd into it: not found)."""
    log = tmp_path / "validate.log"
    status, job = sbatch(cluster, script, log, f"out_dir={tmp_path / 'run'}", extra_env={"OPSDC_VALIDATE": "1", "OPSDC_HOME": ROOT.name},
                         submit_dir=ROOT.parent)
    text = log.read_text()
    assert status == 0, text[-4000:]
    assert job_field(cluster, job, "NumNodes") == str(nodes)
    assert job_field(cluster, job, "TresPerNode") == "gres:gpu:8"
    assert "validation mode: resources and commands checked, nothing started" in text
    steps = {line.split(":", 1)[0].removeprefix("would run step "): shlex.split(line.split(":", 1)[1])
             for line in text.splitlines() if line.startswith("would run step ")}
    assert sorted(steps) == ["sglang_router", "sglang_servers", "trainer"]
    assert all(f"--job-name={name}" in command for name, command in steps.items())
    trainer = steps["trainer"]
    # placed by host name: the job's node list is sorted by name, a step's --relative index follows slurm.conf's order
    hosts = subprocess.run(["scontrol", "show", "hostnames", job_field(cluster, job, "NodeList")], env=cluster, capture_output=True, text=True).stdout.split()
    assert len(hosts) == nodes and not any("--relative" in arg for command in steps.values() for arg in command)
    assert {f"--nodes={trainer_nodes}", f"--nodelist={','.join(hosts[1:])}", "--ntasks-per-node=8", f"--ntasks={8 * trainer_nodes}", "--gpus-per-node=8"} <= set(trainer)
    assert "-m opsdc_megatron.cli train" in trainer[trainer.index("-c") + 1]
    servers = steps["sglang_servers"]
    assert {"--nodes=1", f"--nodelist={hosts[0]}", f"--ntasks-per-node={servers_per_node}", f"--ntasks={servers_per_node}", "--gpus-per-node=8"} <= set(servers)
    assert servers[servers.index("-m") + 1 : servers.index("-m") + 5] == ["opsdc_megatron.launch.sglang_step", "server", "--recipe", f"recipes/{script.replace('.sbatch', '.yaml')}"]
    assert f"rollout step: 1 node(s) x {servers_per_node} SGLang server(s), rollout.sglang.tensor_parallel_size={gpus_per_server}" in text
    router = steps["sglang_router"]
    assert "opsdc_megatron.launch.sglang_step" in router and "router" in router and f"--nodelist={hosts[0]}" in router
    worker_urls = router[router.index("--worker-urls") + 1].split(",")
    shift = int(job) % 20 * 100  # jobs sharing a node do not share SGLang ports
    assert worker_urls == [f"http://127.0.0.1:{30000 + shift + i}" for i in range(servers_per_node)]
    assert f"rollout.sglang.base_port={30000 + shift}" in servers and f"rollout.sglang.router_port={30999 + shift}" in router
    assert "rollout.sglang.server_urls=[" + ",".join(f"'{url}'" for url in worker_urls) + "]" in trainer
    assert "trainer inputs not checked here: model.hf_path: models/Qwen3-" in text  # no checkpoint on the test cluster
    assert not (tmp_path / "run" / "slurm_logs").exists()


def test_bad_inputs_fail_in_the_job_before_any_step(cluster, toy, tmp_path):
    """Four refused jobs, submitted together (each spends most of its time importing in its checks)."""
    # Another job's server on this job's ports (job ids 20 apart share them): it answered the health wait and
    # served this job's trainer. An answering server at every shift: the job stops before its server step.
    import http.server

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.end_headers()

    port = sglang_base_port()
    squatters = [http.server.ThreadingHTTPServer(("127.0.0.1", port + shift), Healthy) for shift in range(0, 2000, 100)]
    for squatter in squatters:
        threading.Thread(target=squatter.serve_forever, daemon=True).start()
    try:
        jobs = {
            # More GPUs than the allocation: the 8B script's 2 nodes, a recipe asking for 1 rollout + 2 trainer nodes.
            "gpus": sbatch(cluster, "qwen3_8b.sbatch", tmp_path / "gpus.log", f"out_dir={tmp_path / 'gpus'}",
                           "slurm.trainer_nodes=2", "parallel.data_parallel_size=4", wait=False)[1],
            # A missing model folder: the toy script stops at its first check.
            "model": sbatch(cluster, "toy_cpu.sbatch", tmp_path / "model.log",
                            *toy_overrides(toy, tmp_path / "model", "model.hf_path=/nonexistent/Qwen3-8B"), wait=False)[1],
            # No SGLang environment for the server step: refused before the server step starts.
            "sglang": sbatch(cluster, "toy_cpu_sglang.sbatch", tmp_path / "sglang.log",
                             *toy_overrides(toy, tmp_path / "sglang", "rollout.sglang.python=/nonexistent/python"), wait=False)[1],
            "taken": sbatch(cluster, "toy_cpu_sglang.sbatch", tmp_path / "taken.log",
                            *toy_overrides(toy, tmp_path / "taken", f"rollout.sglang.base_port={port}"), wait=False)[1],
        }
        status = {name: exit_status(cluster, job) for name, job in jobs.items()}
    finally:
        for squatter in squatters:
            squatter.shutdown()
            squatter.server_close()
    text = {name: (tmp_path / f"{name}.log").read_text() for name in jobs}
    assert status["gpus"] == 2, text["gpus"]
    assert ("the recipe needs 1 rollout + 2 trainer node(s) with 8 GPUs each, but this allocation has 2 node(s) "
            "(SLURM_JOB_NUM_NODES); submit with --nodes=3") in text["gpus"]
    assert "FAILED before starting anything" in text["gpus"] and "would run" not in text["gpus"]
    assert status["model"] == 2, text["model"]
    assert "model.hf_path: /nonexistent/Qwen3-8B has no config.json" in text["model"]
    assert not (tmp_path / "model" / "slurm_logs").exists()
    assert status["sglang"] == 2, text["sglang"]
    assert "rollout.sglang.python: SGLang interpreter /nonexistent/python not found" in text["sglang"] and "would run" not in text["sglang"]
    assert not (tmp_path / "sglang" / "slurm_logs").exists()
    assert status["taken"] == 1 and "answers before this job started its servers: another job's server on that port" in text["taken"], text["taken"][-3000:]
    assert "rollout servers ready" not in text["taken"] and not list((tmp_path / "taken").glob("slurm_logs/*/sglang_servers.log")), text["taken"][-3000:]


def test_launcher_refuses_bad_inputs_before_submitting(cluster, toy, tmp_path):
    def launch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "opsdc_megatron.launch", "--executor", "slurm", *args],
                              cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=300)

    queued_before = subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster, capture_output=True, text=True).stdout
    gpus = launch("--recipe", "recipes/qwen3_8b.yaml", "rollout.engine=hf", "slurm.rollout_nodes=0", "parallel.data_parallel_size=4")
    assert gpus.returncode == 2
    assert ("parallel: tensor 4 x pipeline 1 x data 4 = 16 trainer processes, but slurm.trainer_nodes x "
            "slurm.gpus_per_node = 1 x 8 = 8 GPUs") in gpus.stderr
    model = launch("--recipe", "recipes/toy_cpu.yaml", *toy_overrides(toy, tmp_path / "out", "model.hf_path=/nonexistent/model"))
    assert model.returncode == 2
    assert "model.hf_path: /nonexistent/model has no config.json" in model.stderr
    sglang = launch("--recipe", "recipes/qwen3_8b.yaml")
    assert sglang.returncode == 2 and "the rollout server step is in slurm/opsdc_job.sh only" in sglang.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster, capture_output=True, text=True).stdout == queued_before


@pytest.mark.parametrize("recipe, trainer_nodes, tasks_per_node, servers_per_node", [
    ("qwen3_8b.yaml", 1, 8, 8), ("qwen3_14b.yaml", 2, 8, 4), ("qwen3_32b.yaml", 2, 8, 2), ("toy_cpu.yaml", 1, 2, 0),
    ("toy_cpu_sglang.yaml", 1, 2, 1),
])
def test_recipe_resource_math(recipe, trainer_nodes, tasks_per_node, servers_per_node):
    filled_in = ["out_dir=runs/toy", "model.hf_path=model", "data.train_prompts=train.jsonl"] if recipe.startswith("toy") else []
    config = merge_config(ROOT / "recipes" / recipe, filled_in)
    plan = plan_job(config)
    p = config.parallel
    assert plan.trainer_nodes * max(plan.gpus_per_node, plan.trainer_tasks_per_node) == p.tensor_parallel_size * p.pipeline_parallel_size * p.data_parallel_size
    assert (plan.trainer_nodes, plan.trainer_tasks_per_node, plan.servers_per_rollout_node) == (trainer_nodes, tasks_per_node, servers_per_node)
    if plan.gpus_per_node:
        assert plan.gpus_per_node % p.tensor_parallel_size == 0  # TP stays within a node
        assert config.train.global_batch_prompts % (p.data_parallel_size * config.train.micro_batch_prompts) == 0
        with pytest.raises(PlanError, match="this allocation has 4 GPU"):
            check_allocation(plan, Allocation(plan.nodes, 4, 64))
    check_allocation(plan, Allocation(plan.nodes, plan.gpus_per_node, 64))


def test_hf_rollouts_on_gpus_note_the_memory_opsdc_plan_does_not_count():
    """rollout.engine=hf on GPUs (the nemo-run launcher's engine) keeps the whole model and its KV cache on
    every trainer GPU; Qwen3-8B: 8.19 B parameters, 36 layers x 2 x 8 KV heads x 128 x 2 bytes = 144 KiB per token."""
    config = merge_config(ROOT / "recipes" / "qwen3_8b.yaml", [
        "rollout.engine=hf", "slurm.rollout_nodes=0", f"model.hf_path={ROOT / 'recipes' / 'models' / 'qwen3-8b.json'}",
        "rollout.generation_batch_prompts=4", "data.max_prompt_tokens=1024", "rollout.max_response_tokens=1024",
    ])
    [note] = hf_rollout_memory_notes(config)
    assert f"15.3 GiB of bf16 weights and up to {4 * 2048 * 144 / 2**20:.1f} GiB of KV cache" in note, note
    assert "8192 tokens" in note
    assert hf_rollout_memory_notes(merge_config(ROOT / "recipes" / "qwen3_8b.yaml", [])) == []  # SGLang servers hold their own
    cpu = merge_config(ROOT / "recipes" / "toy_cpu.yaml", ["out_dir=x", "model.hf_path=m", "data.train_prompts=t.jsonl"])
    assert hf_rollout_memory_notes(cpu) == []


@pytest.mark.parametrize("overrides, message", [
    (["rollout.sglang.num_servers=4"], "rollout.sglang.num_servers is 4, but slurm.rollout_nodes x slurm.gpus_per_node / "
                                       "rollout.sglang.tensor_parallel_size = 1 x 8 / 1 = 8 servers"),
    (["rollout.sglang.tensor_parallel_size=3"], "rollout.sglang.tensor_parallel_size (3) must divide slurm.gpus_per_node (8)"),
    (["rollout.sglang.weight_transport=tensor"], "weight_transport=tensor shares memory with servers on the trainer's host"),
    (["slurm.rollout_nodes=0"], "rollout.engine=sglang needs slurm.rollout_nodes >= 1"),
    # Values the trainer's checks refuse, which the plan runs before: they were a ZeroDivisionError and an OverflowError
    (["rollout.sglang.tensor_parallel_size=0"], "rollout.sglang.tensor_parallel_size must be >= 1, got 0"),
    (["parallel.tensor_parallel_size=0"], "parallel.tensor_parallel_size must be >= 1, got 0"),
    (["rollout.sglang.startup_timeout_s=inf"], "rollout.sglang.startup_timeout_s must be > 0 and at most 1e+09 s, got inf"),
    (["rollout.sglang.startup_timeout_s=1e300"], "rollout.sglang.startup_timeout_s must be > 0 and at most 1e+09 s, got 1e+300"),
])
def test_rollout_plan_refusals(overrides, message):
    with pytest.raises(PlanError) as refused:
        plan_job(merge_config(ROOT / "recipes" / "qwen3_8b.yaml", overrides))
    assert message in str(refused.value)


@pytest.mark.parametrize("script", sorted(path.name for path in (ROOT / "slurm").glob("*.sbatch")))
def test_a_script_submitted_from_outside_the_checkout_says_where_to_submit_from(tmp_path, script):
    """sbatch from a scratch folder: the job found no slurm/opsdc_job.sh there and failed with a bare bash error."""
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path)}
    env.pop("OPSDC_HOME", None)
    proc = subprocess.run(["bash", str(ROOT / "slurm" / script)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"opsdc: no {tmp_path}/slurm/opsdc_job.sh: submit from the opsdc-megatron checkout, or set OPSDC_HOME to it" in proc.stderr


def test_the_job_script_hands_the_trainer_ipv6_server_urls_it_can_read():
    """Nodes whose NodeAddr is IPv6: the URLs carry brackets, which an unquoted YAML list read as nested lists
    (every trainer rank exited 2 after the servers' start-up)."""
    script = (ROOT / "slurm" / "opsdc_job.sh").read_text()
    functions = "\n".join(line for line in script.splitlines() if line.startswith(("url_host()", "comma_joined()", "yaml_strings()")))
    built = subprocess.run(
        ["bash", "-c", functions + '\nurls=(); for addr in fd00::12 10.0.0.3; do urls+=("http://$(url_host $addr):30000"); done\n'
                                   'echo "rollout.sglang.server_urls=$(yaml_strings "${urls[@]}")"'],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    config = merge_config(ROOT / "recipes" / "qwen3_8b.yaml", [built, "rollout.sglang.num_servers=2"])
    assert config.rollout.sglang.server_urls == ["http://[fd00::12]:30000", "http://10.0.0.3:30000"]


def test_trainer_ranks_follow_the_host_order_master_addr_is_taken_from():
    """Rank 0 hosts the rendezvous store at MASTER_ADDR, the first trainer host by name; srun numbers a step's
    nodes in its own order (slurm.conf's), so SLURM_PROCID 0 could run elsewhere and the rendezvous hang. The
    job script's trainer command (run here without srun, the launch replaced by a print) numbers ranks by host."""
    script = (ROOT / "slurm" / "opsdc_job.sh").read_text()
    command = script[script.index("TRAINER_CMD='"):].split("\nGPU_ARGS=", 1)[0]
    command = command.replace('exec "$0" -m opsdc_megatron.cli train "$@"', 'echo "$RANK $WORLD_SIZE $LOCAL_RANK"')
    env = dict(os.environ, OPSDC_TRAINER_TASKS_PER_NODE="2", TRAINER_MAX_CONNECTIONS="1", OPSDC_TRAINER_HOSTS="node2 node10",
               SLURM_NTASKS="4", SLURM_PROCID="0", SLURM_LOCALID="1")
    ranks = {}
    for node in ("node2", "node10", "node3"):
        ran = subprocess.run(["bash", "-c", command + '\nbash -c "$TRAINER_CMD" python'], env=dict(env, SLURMD_NODENAME=node),
                             capture_output=True, text=True)
        ranks[node] = (ran.returncode, ran.stdout.strip() or ran.stderr.strip())
    assert ranks["node2"] == (0, "1 4 1") and ranks["node10"] == (0, "3 4 1")  # not SLURM_PROCID
    assert ranks["node3"] == (2, "opsdc_job.sh: this node, node3, is none of the trainer hosts node2 node10")


def test_a_fractional_server_startup_timeout_is_rounded_up_for_the_job_script():
    """The script waits whole seconds: 0.5 s became 0, and the job failed its first /health wait at once."""
    assert plan_job(merge_config(ROOT / "recipes" / "qwen3_8b.yaml", ["rollout.sglang.startup_timeout_s=0.5"])).server_startup_timeout_s == 1


@pytest.mark.skipif(not DEFAULT_SGLANG_PYTHON.exists(), reason="needs .venv-sglang: run `make env-sglang`")
def test_the_sglang_environment_is_checked_before_the_job_starts(tmp_path, monkeypatch):
    """GPU servers need an interpreter named (the repo's .venv-sglang is SGLang's CPU build), with sglang,
    with sglang_router when the recipe starts a router (`pip install sglang==0.5.23` does not bring it: the
    router step died and the job blamed server 0), and, for the NCCL weight push, the trainer's NCCL version
    (sglang 0.5.23 pins torch 2.14.1, whose NCCL differs from torch 2.13.0's: NCCL refuses the group)."""
    import torch

    from opsdc_megatron.launch.plan import check_sglang_interpreter

    def recipe(python=None, *overrides):
        return merge_config(ROOT / "recipes" / "qwen3_8b.yaml", [f"rollout.sglang.python={python}"] * bool(python) + list(overrides))

    def environment(name, sglang=True, router=True, nccl=None):
        """An interpreter that answers the probe as an SGLang environment on a GPU cluster would (none here)."""
        answer = {"sglang": sglang, "sglang_router": router, "torch": "2.14.1+cu130", "nccl": nccl}
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\necho '{json.dumps(answer)}'\n")
        path.chmod(0o755)
        return str(path)

    with pytest.raises(ValueError, match="GPU servers need a CUDA build of SGLang"):
        check_sglang_interpreter(recipe())
    with pytest.raises(ValueError, match=f"{sys.executable} has no sglang package"):
        check_sglang_interpreter(recipe(sys.executable))
    with pytest.raises(ValueError, match=f"rollout.sglang.python: {tmp_path} could not be run: .*Permission denied"):
        check_sglang_interpreter(recipe(str(tmp_path)))  # a folder (the venv's, say), not its interpreter
    with pytest.raises(ValueError, match="router_port is set, but .* has no sglang_router package"):
        check_sglang_interpreter(recipe(environment("no_router", router=False)))
    check_sglang_interpreter(recipe(environment("no_router", router=False), "rollout.sglang.router_port=0"))
    check_sglang_interpreter(recipe(str(DEFAULT_SGLANG_PYTHON)))  # the real environment: sglang and sglang_router import
    check_sglang_interpreter(merge_config(ROOT / "recipes" / "toy_cpu_sglang.yaml", ["out_dir=x", "model.hf_path=x", "data.train_prompts=x"]))

    monkeypatch.setattr(torch.version, "cuda", "13.0")  # this trainer as a CUDA build linking NCCL 2.29.7 (torch 2.13.0's)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 29, 7))
    newer = environment("newer_nccl", nccl=[2, 30, 7])
    with pytest.raises(ValueError, match="links NCCL 2.29.7, .* links NCCL 2.30.7, and NCCL refuses a group"):
        check_sglang_interpreter(recipe(newer))
    check_sglang_interpreter(recipe(newer, "rollout.sglang.weight_transport=disk"))
    check_sglang_interpreter(recipe(environment("same_nccl", nccl=[2, 29, 7])))


@pytest.mark.parametrize("size", ["8b", "14b", "32b"])
def test_h100_recipes_use_the_layout_opsdc_plan_chooses(size):
    config = merge_config(ROOT / "recipes" / f"qwen3_{size}.yaml")
    work = Workload(config.data.max_prompt_tokens + config.rollout.max_response_tokens, config.train.global_batch_prompts,
                    config.train.micro_batch_prompts, config.distill.fused_output_layer)
    gpus = config.slurm.trainer_nodes * config.slurm.gpus_per_node
    chosen, _ = choose(ModelShape.from_hf_config(ROOT / "recipes" / "models" / f"qwen3-{size}.json"), work, gpus, config.slurm.gpus_per_node, H100_80GB_GIB)
    p = config.parallel
    assert (p.tensor_parallel_size, p.pipeline_parallel_size, p.data_parallel_size, config.model.activation_recompute) == (
        chosen.tp, chosen.pp, chosen.dp, "full" if chosen.recompute else "none")
    assert p.distributed_optimizer  # the estimate shards the optimizer state over data-parallel ranks
    assert p.sequence_parallel == (chosen.tp > 1)  # and splits the activations outside the matmuls over TP
