"""Starting and stopping SGLang servers (and sglang-router in front of them) as subprocesses.

Each server runs `python -m sglang.launch_server` from its own virtual environment (.venv-sglang,
made by tools/setup_sglang.sh: SGLang pins another torch than the trainer). Every server lives in
its own process group, so stopping it (SIGTERM, then SIGKILL after a grace period) also ends the
scheduler and detokenizer processes it forks; nothing is left running when a test fails. The group
is started through `orphan_guard.py`, which stops it in the same way when the process that started
it dies without stopping it (SIGKILL, the OOM killer).

Placement: server i listens on host:(base_port + i) and, with GPUs, gets the GPU group
[i * tp, (i + 1) * tp) of this node. On a SLURM cluster the job's own server step runs the same
command on the rollout nodes, one task per GPU group (launch/sglang_step.py, slurm/opsdc_job.sh).

On machines without CUDA the server runs SGLang's CPU path (../shared/FACTS.md section 2): torch-native
attention and sampling, a bounded KV cache, no warm-up, an idle scheduler that sleeps, and the
`cpu_stub` stand-ins (sgl_kernel, torchvision) first on PYTHONPATH.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import torch

from opsdc_megatron.rollout.sglang.client import free_port, open_direct

CPU_STUB_DIR = Path(__file__).resolve().parent / "cpu_stub"
ORPHAN_GUARD = Path(__file__).resolve().parent / "orphan_guard.py"
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_SGLANG_PYTHON = REPO_ROOT / ".venv-sglang" / "bin" / "python"
STOP_GRACE_S = 30.0
LAUNCH_WEIGHT_VERSION = "launch"
"""The weight version a server reports until the first push (SGLang's --weight-version)."""


class ServerStartError(RuntimeError):
    """A server or router that exited or did not become healthy in time; the message has its log tail."""


@dataclass(frozen=True)
class ServerSettings:
    """What every server of a fleet runs; one field per `sglang.launch_server` concern."""

    model_path: str
    """Hugging Face folder the servers load at start (later weights arrive by push)."""
    tensor_parallel_size: int = 1
    """GPUs per server (SGLang's --tp-size); 1 on CPU."""
    dtype: str = "auto"
    """SGLang's --dtype: auto, float32, bfloat16, float16."""
    mem_fraction_static: float | None = None
    """Fraction of GPU memory for weights + KV cache; None keeps SGLang's default."""
    max_total_tokens: int | None = None
    """KV-cache size in tokens; None = SGLang's default on GPU, 8192 on CPU (else it reserves ~15 GB)."""
    max_running_requests: int | None = None
    """Requests decoded at once per server; None = SGLang's default on GPU, 16 on CPU."""
    host: str = "127.0.0.1"
    base_port: int = 30000
    """Server i listens on base_port + i."""
    python: str = str(DEFAULT_SGLANG_PYTHON)
    """Interpreter of the SGLang environment."""
    startup_timeout_s: float = 300.0
    extra_args: tuple[str, ...] = ()
    """Further `sglang.launch_server` flags, passed through unchanged."""
    skip_tokenizer_init: bool = True
    """The trainer sends and reads token ids only, so the servers load no tokenizer (and need none)."""
    deterministic: bool | None = None
    """--enable-deterministic-inference: SGLang honours each request's sampling_seed only with it.
    None = on GPUs only: SGLang 0.5.23 refuses it with the CPU's torch_native attention, so CPU
    rollouts are not reproducible from the seed."""
    log_dir: str | None = None
    """Where server_<i>.log files go; None = a temporary folder."""
    on_cpu: bool = field(default_factory=lambda: not torch.cuda.is_available())


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun tells the trainer's processes about their world; not for the servers they start."""


def server_process_env(hosts: Iterable[str]) -> dict[str, str]:
    """This process's environment for a server or router it starts.

    Without torchrun's rank and rendezvous variables: SGLang's scheduler would read them
    (TORCHELASTIC_USE_AGENT_STORE, MASTER_PORT) and wait forever on the trainer's rendezvous store.
    With loopback and `hosts` added to NO_PROXY (both spellings): a cluster's http_proxy would
    otherwise catch the servers' own traffic, SGLang's warm-up request to itself (python requests;
    the server kills itself when it fails) and sglang-router's health checks of its workers (reqwest).
    """
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("TORCHELASTIC_")}
    listed = [*env.get("no_proxy", "").split(","), *env.get("NO_PROXY", "").split(","), "127.0.0.1", "localhost", *hosts]
    env["no_proxy"] = env["NO_PROXY"] = ",".join(dict.fromkeys(host for host in listed if host))
    return env


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _http_url(host: str, port: int) -> str:
    """The base URL of a server on `host` (an IPv6 literal in brackets, as "::" from slurm/opsdc_job.sh)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ManagedProcess:
    """A subprocess in its own process group, with a log file, a readiness probe and a clean stop."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path, ready_url: str) -> None:
        self.name, self.command, self.env, self.log_path, self.ready_url = name, command, env, log_path, ready_url
        self.process: subprocess.Popen | None = None
        self._lifeline: int | None = None  # the write end of the orphan guard's stdin: closed, the guard stops the group

    def port_taken(self) -> bool:
        """Whether something accepts connections on the readiness URL's port."""
        address = urlsplit(self.ready_url)
        host = "127.0.0.1" if address.hostname in ("0.0.0.0", "::") else address.hostname  # every interface: this host
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.settimeout(2)
            return probe.connect_ex((host, address.port)) == 0

    def refuse_taken_port(self) -> None:
        """Another run's server on this port would answer the readiness probe (SGLang binds its port
        last, after loading the model), and this run would sample from it and push weights into it."""
        if self.port_taken():
            raise ServerStartError(
                f"{self.name}: port {urlsplit(self.ready_url).port} is already in use (another run's server?); choose another "
                "rollout.sglang.base_port (router_port for the router, --sglang-base-port for opsdc eval)"
            )

    def start(self) -> None:
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.process.pid})")
        self.refuse_taken_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._close_lifeline()
        read_end, self._lifeline = os.pipe()  # close-on-exec: no program this process starts holds it (a bare fork does, until it exits)
        try:
            with open(self.log_path, "ab") as log:
                log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.command)}\n".encode())
                self.process = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(ORPHAN_GUARD), str(STOP_GRACE_S), *self.command],
                    env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=read_end, start_new_session=True,
                )
        except BaseException:
            self._close_lifeline()
            raise
        finally:
            os.close(read_end)

    def _close_lifeline(self) -> None:
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout_s: float) -> None:
        """Polls the readiness URL until it answers 200; raises if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.process.returncode if self.process else None
                raise ServerStartError(f"{self.name} exited with code {code} before it was ready; log {self.log_path}:\n{_log_tail(self.log_path)}")
            try:
                with open_direct(self.ready_url, 5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, http.client.HTTPException, OSError):  # still starting
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerStartError(f"{self.name} was not ready within {timeout_s:.0f} s ({self.ready_url}); log {self.log_path}:\n{_log_tail(self.log_path)}")

    def kill(self) -> None:
        """SIGKILL to the whole process group (failure tests; the last resort of stop)."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=STOP_GRACE_S)
        self._close_lifeline()

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after STOP_GRACE_S."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                os.killpg(self.process.pid, signal.SIGCONT)  # a stopped (hung) group must run to terminate
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        # The server's children may outlive its main process: end the group in any case.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=STOP_GRACE_S)
        self._close_lifeline()
        # Its processes close their sockets as they are torn down, after the signal: a restart that probed the port
        # at once found it still taken (a server's teardown of several GB) and failed the rollout.
        deadline = time.monotonic() + STOP_GRACE_S
        while self.port_taken() and time.monotonic() < deadline:
            time.sleep(0.1)


class SGLangServer(ManagedProcess):
    """One `sglang.launch_server` process (and the scheduler/detokenizer processes it forks)."""

    def __init__(self, index: int, settings: ServerSettings, log_dir: Path) -> None:
        self.index, self.settings = index, settings
        self.port = settings.base_port + index
        self.url = _http_url(settings.host, self.port)
        super().__init__(f"SGLang server {index} ({self.url})", self._command(), self._env(), log_dir / f"server_{index}.log", f"{self.url}/health")

    def _command(self) -> list[str]:
        s = self.settings
        command = [
            s.python, "-m", "sglang.launch_server", "--model-path", s.model_path, "--host", s.host, "--port", str(self.port),
            "--tp-size", str(s.tensor_parallel_size), "--dtype", s.dtype, "--weight-version", LAUNCH_WEIGHT_VERSION,
        ]
        if s.mem_fraction_static is not None:
            command += ["--mem-fraction-static", str(s.mem_fraction_static)]
        max_total_tokens = s.max_total_tokens if s.max_total_tokens is not None else (8192 if s.on_cpu else None)
        if max_total_tokens is not None:
            command += ["--max-total-tokens", str(max_total_tokens)]
        max_running = s.max_running_requests if s.max_running_requests is not None else (16 if s.on_cpu else None)
        if max_running is not None:
            command += ["--max-running-requests", str(max_running)]
        if s.on_cpu:
            command += ["--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch", "--skip-server-warmup", "--sleep-on-idle"]
        if s.skip_tokenizer_init:
            command += ["--skip-tokenizer-init"]
        if s.deterministic if s.deterministic is not None else not s.on_cpu:
            command += ["--enable-deterministic-inference"]
        return command + list(s.extra_args)

    def _env(self) -> dict[str, str]:
        s = self.settings
        env = server_process_env([s.host])
        if s.on_cpu:
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CPU_STUB_DIR), env.get("PYTHONPATH", "")) if p)
            env.setdefault("OMP_NUM_THREADS", "1")
        else:
            visible = env.get("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(torch.cuda.device_count()))).split(",")
            tp = s.tensor_parallel_size
            group = visible[self.index * tp : (self.index + 1) * tp]
            if len(group) != tp:
                raise ValueError(f"server {self.index} needs GPUs {self.index * tp}..{(self.index + 1) * tp - 1}, only {len(visible)} visible")
            env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
        return env


class SGLangRouter(ManagedProcess):
    """sglang-router in front of the servers: one URL for clients outside the trainer (eval, tools).

    Fails fast on a dead worker (no router-side retries, health checked every 2 s) so that clients
    retry with their own budget instead of waiting out the router's ~28 s circuit breaker. Its Prometheus
    metrics listen on a free port: on the default 29000 a second router on the host (another job's) died.
    """

    def __init__(self, worker_urls: list[str], settings: ServerSettings, port: int, log_dir: Path) -> None:
        self.url = _http_url(settings.host, port)
        command = [
            settings.python, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls, "--host", settings.host,
            "--port", str(port), "--disable-retries", "--health-check-interval-secs", "2", "--health-failure-threshold", "1",
            "--prometheus-port", str(free_port(settings.host)),
        ]
        env = server_process_env([settings.host, *(urlsplit(url).hostname or "" for url in worker_urls)])
        # Ready once it routes: its /health answers before it has registered the workers (in the background).
        super().__init__(f"sglang-router ({self.url})", command, env, log_dir / "router.log", f"{self.url}/readiness")


class ServerFleet:
    """N servers (and optionally a router), started together; a context manager that always stops them.

    Use `restart(i)` after a failure; `stop()` is idempotent.
    """

    def __init__(self, settings: ServerSettings, num_servers: int, router_port: int | None = None) -> None:
        if num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {num_servers}")
        if settings.python and not Path(settings.python).exists() and not shutil.which(settings.python):
            raise FileNotFoundError(f"SGLang interpreter {settings.python} not found: run tools/setup_sglang.sh (make env-sglang)")
        if not (Path(settings.model_path) / "config.json").is_file():
            raise FileNotFoundError(f"model path {settings.model_path} has no config.json")
        self.settings = settings
        self.log_dir = Path(settings.log_dir) if settings.log_dir else Path(os.environ.get("TMPDIR", "/tmp")) / f"opsdc-sglang-{os.getpid()}-{id(self):x}"
        self.servers = [SGLangServer(i, settings, self.log_dir) for i in range(num_servers)]
        self.router = SGLangRouter([s.url for s in self.servers], settings, router_port, self.log_dir) if router_port else None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> "ServerFleet":
        """Starts every server at once, waits for all to be healthy, then the router."""
        try:
            for server in self.servers:
                server.start()
            for server in self.servers:
                server.wait_ready(self.settings.startup_timeout_s)
            if self.router is not None:
                self.router.start()
                self.router.wait_ready(60.0)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, index: int) -> None:
        """Stops server `index` (whatever state it is in) and starts it again from the launch model."""
        server = self.servers[index]
        server.stop()
        server.start()
        server.wait_ready(self.settings.startup_timeout_s)

    def stop(self) -> None:
        """Stops the router and every server, also after one of them would not stop; then raises the first error."""
        errors = []
        for process in ([self.router] if self.router else []) + self.servers:
            try:
                process.stop()
            except Exception as error:  # noqa: BLE001 - the others must still be stopped
                errors.append(error)
        if errors:
            raise errors[0]

    def __enter__(self) -> "ServerFleet":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def cpu_settings(model_path: str, **overrides: object) -> ServerSettings:
    """Settings for a CPU server on loopback (tests, the demo, the benchmark)."""
    return replace(ServerSettings(model_path=model_path, dtype="float32", on_cpu=True), **overrides)
