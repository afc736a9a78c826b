"""`RolloutEngine` on SGLang servers: rollouts by HTTP, weights pushed after every optimizer step.

Design choices:
* The engine sends each rollout straight to a server it picks (the one with the fewest requests in
  flight), not through sglang-router: pushes must reach every server anyway, and a failure must be
  traced to the server that failed so it can be restarted. The router (launcher.SGLangRouter) serves
  clients outside the trainer.
* Every rollout has an id (`rid`), `<engine tag>-s<seed>-p<prompt index>-a<attempt>`. A prompt whose
  request fails (connection refused, timeout, 5xx, abort) is sent again to another healthy server
  with exponential backoff, at most `max_attempts` times; only the first answer of a prompt is kept,
  so each prompt is answered exactly once. A 4xx answer is the request's own fault: it is raised.
* A server that fails its health probe (dead process, or no /health answer within 5 s: hung) leaves
  the pool. The probe runs when a request to it fails, and when it has requests in flight but has
  answered none for `stall_timeout_s` (a hang that keeps connections open); its requests are resent.
  The engine owning the fleet restarts it in the background, reconnects the transport and
  pushes the current weights before it takes requests again. A rank without the fleet whose pool
  runs empty waits up to `owner_restart_wait_s` for such a restart: a server rejoins its pool once it
  answers /health with the current weight version. While the owner waits for the other ranks' rollouts
  it probes its servers every few seconds, so a server that dies then is restarted too. Servers started outside the trainer
  (the SLURM job's server step, `rollout.sglang.server_urls`) are not restarted: the others carry on, and
  one that answers /health again rejoins at the next push, which brings it to the current weights.
* Every answer carries the server's weight version; an answer made with any other version than the
  last pushed one (or with two versions, i.e. a push mid-request) is not used: its server leaves this
  rank's pool and the prompt is sent again. That is a server the owner restarted and has not yet
  brought to the current weights (other ranks learn of the restart at the next push). `sample`
  checks every answer once more and raises `StaleRolloutError` on any other version.
* A stop request (`stop_requested`: the trainer's stop signal or file) ends the rollouts at once with
  `RolloutInterrupted`, and no server is restarted from then on: a SIGTERM to a SLURM job reaches the
  servers too, and a restart, or rollouts waiting for one, would outlast the seconds before SIGKILL.
* An owner given no transport serves the weights its fleet was launched with (evaluation): its
  rollouts are version 0, answers must carry the launch version, and `update_weights` is refused.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, wait
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from opsdc_megatron.rollout.engine import Rollout, RolloutEngine, RolloutEngineError, RolloutInterrupted, SamplingParams
from opsdc_megatron.rollout.sglang.client import (
    GenerateRequest,
    GenerateResult,
    ServerRejected,
    ServerUnavailable,
    generate_one,
    post_json,
)
from opsdc_megatron.rollout.sglang.launcher import LAUNCH_WEIGHT_VERSION, ServerFleet
from opsdc_megatron.weight_push.sglang_transports import WeightPushError, WeightTransport

HEALTH_TIMEOUT_S = 5.0


class StaleRolloutError(RuntimeError):
    """A rollout sampled with other weights than the last pushed version."""


class RolloutFailedError(RuntimeError):
    """A prompt that no server could answer within the retry budget, or no server left."""


class ServedModelUnreadable(ValueError):
    """The config.json of the model a server names cannot be read on this host (for one started outside the
    trainer: often the folder of an earlier disk push, removed since)."""


def served_vocab_size(url: str, timeout_s: float = 10.0) -> tuple[int, str]:
    """(vocab_size, model path) of the model a server was launched with, from its config.json."""
    info = post_json(f"{url}/model_info", None, timeout_s)
    config_path = Path(info["model_path"]) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ServedModelUnreadable(f"{url} serves {info['model_path']}, whose config.json cannot be read here: {error}") from None
    text_config = config.get("text_config", config)
    return int(text_config["vocab_size"]), info["model_path"]


class VocabularyMismatchError(ValueError):
    """A server serves a model of another vocabulary than the trainer's."""


def _in_daemon_thread(function: Callable[..., GenerateResult], *args: object) -> Future:
    """`function(*args)` on a daemon thread of its own, as a Future. Not a ThreadPoolExecutor: the interpreter joins
    its workers at exit, and a worker blocked on a hung server held a trainer's exit (a preempted job's too) for up
    to request_timeout_s. The dispatch loop bounds how many run at once."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(error)

    future.set_running_or_notify_cancel()
    threading.Thread(target=run, name="sglang-request", daemon=True).start()
    return future


class SGLangRolloutEngine(RolloutEngine):
    def __init__(
        self,
        fleet: ServerFleet | list[str],
        transport: WeightTransport | None,
        stop_token_ids: list[int],
        vocab_size: int,
        max_concurrent_requests: int = 64,
        request_timeout_s: float = 600.0,
        max_attempts: int = 3,
        backoff_s: float = 0.5,
        stall_timeout_s: float = 60.0,
        server_tensor_parallel_size: int = 1,
        owner_restart_wait_s: float = 0.0,
    ) -> None:
        # fleet + transport: trainer rank 0, which started the servers, pushes weights and restarts failed ones.
        # URLs + transport: rank 0 with servers started outside the trainer (the SLURM job's server step).
        # URLs only: the other trainer ranks, which just send rollouts. Fleet only: evaluation, launch weights.
        self.fleet = fleet if isinstance(fleet, ServerFleet) else None
        self.urls = self.fleet.urls if self.fleet else list(fleet)
        self.transport = transport
        self.server_tensor_parallel_size = self.fleet.settings.tensor_parallel_size if self.fleet else server_tensor_parallel_size
        self.launch_weights_only = self.fleet is not None and transport is None
        """Serves the fleet's launch weights (version 0) and takes no push."""
        self.stop_token_ids = tuple(stop_token_ids)
        self.vocab_size = vocab_size
        self.max_concurrent_requests, self.request_timeout_s = max_concurrent_requests, request_timeout_s
        self.max_attempts, self.backoff_s, self.stall_timeout_s = max_attempts, backoff_s, stall_timeout_s
        self.owner_restart_wait_s = owner_restart_wait_s
        """A rank without the fleet: how long to wait for trainer rank 0 to restart the servers when none is
        left in this rank's pool (0: nobody restarts them)."""
        self.tag = uuid.uuid4().hex[:8]
        self._version = 0 if self.launch_weights_only else -1
        self._pushed: Mapping[str, torch.Tensor] | None = None
        self._healthy = set(range(len(self.urls)))
        self._recoveries: dict[int, threading.Thread] = {}
        self._recovery_errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._transport_lock = threading.Lock()
        """One transport call at a time: recoveries of two servers at once, or one during a push, would
        share the disk transport's folder and interleave the weight-update sessions."""
        self.restarts = 0
        """How many servers were restarted after a failure (for logs and tests)."""
        for url in self.urls:
            try:
                self._check_vocabulary(url)
            except ServedModelUnreadable as error:
                # Servers started outside the trainer outlive it: one that took a disk push names that push's
                # folder, which goes with the trainer that wrote it. Rank 0's first push replaces its weights.
                if self.fleet is not None:
                    raise
                if self.transport is not None:
                    print(f"opsdc train: {error}; its vocabulary is not checked, the first push replaces its weights",
                          file=sys.stderr, flush=True)
            if self.transport is not None:
                if self.fleet is None:
                    self._undo_an_unfinished_push(url)
                self.transport.connect(url, self.server_tensor_parallel_size)

    def _check_vocabulary(self, url: str) -> None:
        served, model_path = served_vocab_size(url)
        if served != self.vocab_size:
            raise VocabularyMismatchError(
                f"{url} serves {model_path} with a vocabulary of {served} tokens, the trainer's model has "
                f"{self.vocab_size}: rollouts would be sampled from another model's token ids"
            )

    def _undo_an_unfinished_push(self, url: str) -> None:
        """Servers started outside the trainer outlive it: one killed mid-push leaves them paused (their
        /health then waits on the pause) or with a weight-update session open (every later one is refused).
        Whatever such a push loaded is replaced by this trainer's first push, before any rollout."""
        post_json(f"{url}/continue_generation", {}, HEALTH_TIMEOUT_S * 6)
        try:
            post_json(f"{url}/end_weight_update", {}, HEALTH_TIMEOUT_S * 6)
        except ServerRejected as error:
            if "no weight-update session is open" not in str(error):
                raise

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def _served_version(self) -> str:
        """The weight version every answer must carry."""
        return LAUNCH_WEIGHT_VERSION if self.launch_weights_only else str(self._version)

    # ------------------------------------------------------------------ weights

    @property
    def reads_pushed_weights(self) -> bool:
        return self.transport is not None  # the rank that pushes; the others only send rollouts

    def update_weights(self, hf_state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Pause the servers, push (bucketed, flushing the cache), resume; then every answer carries `version`."""
        if self.launch_weights_only:
            raise RuntimeError(f"this engine serves the launch weights of {self.fleet.settings.model_path} and has no weight transport")
        failure: Exception | None = None
        if self.transport is not None:
            try:
                self._push(hf_state_dict, version)
            except Exception as error:
                failure = error
        # The owner (trainer rank 0) tells the other ranks which servers it pushed to: a rank probing on
        # its own could keep a server the owner dropped, and sample stale weights from it. The
        # broadcast also holds the other ranks back until the push is done, and tells them if it failed.
        owner_healthy: list[list[int] | tuple[str, str] | None] = [None]
        if self.transport is not None:
            owner_healthy = [self._serving() if failure is None else (type(failure).__name__, str(failure))]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(owner_healthy, src=0)
        if isinstance(owner_healthy[0], tuple):  # on every rank alike
            raise RolloutEngineError(f"the weight push of version {version} failed on rank 0: {': '.join(owner_healthy[0])}") from failure
        if self.transport is None:
            self._healthy = set(owner_healthy[0]) if owner_healthy[0] is not None else {i for i in range(len(self.urls)) if self._server_ok(i)}
        self._version = version

    def _push(self, hf_state_dict: dict[str, torch.Tensor], version: int) -> None:
        """The owner's part of `update_weights`."""
        embed = hf_state_dict.get("model.embed_tokens.weight")
        if embed is not None and embed.shape[0] != self.vocab_size:
            raise ValueError(f"weight push: model.embed_tokens.weight has {embed.shape[0]} rows, the served vocabulary is {self.vocab_size}")
        if not hf_state_dict:
            raise ValueError(f"weight push of version {version}: the state dict is empty")
        self.wait_for_recovery()
        if self.fleet is None:
            self._readmit_answering()
        self._probe_all()
        # Set first: a server that dies during the push is restarted and brought to these weights.
        self._pushed, self._version = hf_state_dict, version
        self._push_to_healthy(hf_state_dict, str(version))

    def release_weights(self) -> None:
        """A restart still running (a server that died during the rollouts) pushes the last weights to its
        server: it finishes before they go (unless a stop came: see `_join_recoveries`). None is started until the next push (no rollouts in between). Its
        failure is raised by that push, which every trainer rank learns of (this runs on rank 0 alone)."""
        self._join_recoveries()
        self._pushed = None

    def _push_to_healthy(self, hf_state_dict: Mapping[str, torch.Tensor], version: str) -> None:
        """Pause, push, continue on every healthy server. A server that dies meanwhile leaves the pool (its
        recovery pushes these weights) and the push is made again to the others, at most once per server;
        when none is left, the push is the recoveries'. A live server's refusal raises."""
        targets = set(self._healthy)
        while True:
            servers = {self.urls[i]: self.server_tensor_parallel_size for i in sorted(targets & self._healthy)}
            if not servers:
                self.wait_for_recovery()
                if self._healthy:
                    return
                raise RolloutFailedError("no healthy SGLang server to push weights to")
            try:
                self._pause_push_continue(servers, hf_state_dict, version)
                return
            except (ServerUnavailable, WeightPushError):
                dead = [i for i in sorted(targets & self._healthy) if not self._server_ok(i)]
                if not dead:
                    raise
                for index in dead:
                    self._mark_failed(index)
                    targets.discard(index)

    def _pause_push_continue(self, servers: dict[str, int], hf_state_dict: Mapping[str, torch.Tensor], version: str) -> None:
        """Every server paused is continued, whatever fails; the first error (the push's before any continue's) is raised."""
        paused, error = [], None
        try:
            for url in servers:
                post_json(f"{url}/pause_generation", {"mode": "abort"}, HEALTH_TIMEOUT_S * 6)
                paused.append(url)
            with self._transport_lock:
                self.transport.push(servers, hf_state_dict, version)
        except BaseException as failure:
            error = failure
        for url in paused:
            try:
                post_json(f"{url}/continue_generation", {}, HEALTH_TIMEOUT_S * 6)
            except ServerUnavailable as failure:
                error = error or failure
        if error is not None:
            raise error

    # ------------------------------------------------------------------ failures

    def _server_ok(self, index: int) -> bool:
        if self.fleet is not None and not self.fleet.servers[index].alive():
            return False
        try:
            post_json(f"{self.urls[index]}/health", None, HEALTH_TIMEOUT_S)
        except (ServerUnavailable, ServerRejected):
            return False
        return True

    def _serving(self) -> list[int]:
        """The pool now (recovery threads add to it)."""
        with self._lock:
            return sorted(self._healthy)

    def _probe_all(self) -> None:
        for index in self._serving():
            if not self._server_ok(index):
                self._mark_failed(index)
        self.wait_for_recovery()

    def _readmit_answering(self) -> None:
        """Servers started outside the trainer that left the pool (a failed probe: a hiccup, or a restart by
        whoever runs them) and answer again rejoin it before a push, which brings them to its weights: nobody
        else would take them back. One that still fails a step of the way stays out until the next push."""
        for index in sorted(set(range(len(self.urls))) - set(self._serving())):
            url = self.urls[index]
            if not self._server_ok(index):
                continue
            try:
                self._check_vocabulary(url)
            except (ServerUnavailable, ServerRejected):
                continue
            except ServedModelUnreadable:  # the disk transport's pushed folder, replaced since
                pass
            try:
                self._undo_an_unfinished_push(url)
                with self._transport_lock:
                    self.transport.connect(url, self.server_tensor_parallel_size)
            except (ServerUnavailable, ServerRejected, WeightPushError):
                continue
            with self._lock:
                self._healthy.add(index)

    def _mark_failed(self, index: int) -> None:
        """Takes the server out of the pool; the owner restarts it in the background, unless a stop was
        requested: a SIGTERM to the job is what took the server down, and a restart outlasts the job."""
        with self._lock:
            if index not in self._healthy:
                return
            self._healthy.discard(index)
            if self.fleet is None or self.stop_requested():
                return
            thread = threading.Thread(target=self._recover, args=(index,), name=f"sglang-recover-{index}", daemon=True)
            self._recoveries[index] = thread
        thread.start()

    def _recover(self, index: int) -> None:
        server = self.fleet.servers[index]
        try:
            if self.transport is not None:
                with self._transport_lock:
                    self.transport.disconnect(server.url)
            self.fleet.restart(index)
            self._check_vocabulary(server.url)
            if self.transport is not None:
                with self._transport_lock:
                    self.transport.connect(server.url, self.fleet.settings.tensor_parallel_size)
                    if self._pushed is not None:
                        self.transport.push({server.url: self.fleet.settings.tensor_parallel_size}, self._pushed, str(self._version))
            with self._lock:
                self._healthy.add(index)
                self.restarts += 1
        except BaseException as error:  # surfaced by wait_for_recovery / generate
            with self._lock:
                self._recovery_errors.append(error)

    @contextmanager
    def serving_other_ranks(self):
        """The owner, waiting in a collective for other ranks that still sample from its servers: a thread
        probes them every HEALTH_TIMEOUT_S and restarts those that fail (the others cannot); the
        restarts are joined on the way out (a failed one is raised by the next push or rollout, which every
        rank learns of: here only rank 0 would raise, after the gather). A stop signal that came meanwhile
        runs its handler only now, once the gather has returned: a restart it started is not waited for."""
        if self.fleet is None:
            yield
            return
        done = threading.Event()

        def watch() -> None:
            while not done.wait(HEALTH_TIMEOUT_S):
                for index in self._serving():
                    if not self._server_ok(index):
                        self._mark_failed(index)

        watcher = threading.Thread(target=watch, name="sglang-watch", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()
            self._join_recoveries()

    def _join_recoveries(self) -> None:
        """Waits for the restarts in progress, unless a stop was requested: a restart outlasts the seconds
        before SIGKILL, and its server goes with the fleet (the threads are daemons)."""
        for index, thread in list(self._recoveries.items()):
            while thread.is_alive():
                if self.stop_requested():
                    return
                thread.join(0.5)
            self._recoveries.pop(index, None)

    def wait_for_recovery(self) -> None:
        """Joins the restarts in progress (see `_join_recoveries`); raises the first that failed."""
        self._join_recoveries()
        if self._recovery_errors:
            error = self._recovery_errors.pop(0)
            raise RolloutFailedError(f"restarting a failed SGLang server failed: {error}") from error

    def _rejoin_restarted(self) -> bool:
        """Waits up to owner_restart_wait_s for servers that serve the current weights again (restarted by
        the owner) and takes them back into the pool; false if none came back."""
        deadline = time.monotonic() + self.owner_restart_wait_s
        while time.monotonic() < deadline:
            if self.stop_requested():
                raise RolloutInterrupted("a stop was requested while waiting for trainer rank 0 to restart the servers")
            for index, url in enumerate(self.urls):
                if not self._server_ok(index):
                    continue
                try:
                    served = str(post_json(f"{url}/model_info", None, HEALTH_TIMEOUT_S).get("weight_version"))
                except (ServerUnavailable, ServerRejected):
                    continue
                if served == self._served_version:
                    with self._lock:
                        self._healthy.add(index)
            if self._healthy:
                return True
            time.sleep(1.0)
        return False

    # ------------------------------------------------------------------ rollouts

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int) -> list[Rollout]:
        return [Rollout(i, r.output_ids, r.finish_reason, self._version) for i, r in enumerate(self.sample(prompt_ids, sampling, seed))]

    def sample(self, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int) -> list[GenerateResult]:
        """`generate` with SGLang's full answers: logprobs of the sampled tokens, the server, the rollout id."""
        for i, prompt in enumerate(prompt_ids):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token ids {bad[:5]} outside the served vocabulary [0, {self.vocab_size})")
        results = self._dispatch(prompt_ids, sampling, seed)
        for result in results.values():
            versions = set(result.weight_versions_in_response) | {result.weight_version}
            if versions != {self._served_version}:
                raise StaleRolloutError(
                    f"rollout {result.rollout_id} from {result.server_url} was sampled with weight versions "
                    f"{sorted(versions)}, expected {self._served_version}"
                )
        return [results[i] for i in range(len(prompt_ids))]

    def _pick_server(self, in_flight: dict[int, int]) -> int | None:
        healthy = self._serving()
        return min(healthy, key=lambda i: in_flight.get(i, 0)) if healthy else None

    def _dispatch(self, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int) -> dict[int, GenerateResult]:
        """Every prompt answered exactly once, whatever servers fail or hang meanwhile."""
        pending: deque[tuple[float, int]] = deque((0.0, i) for i in range(len(prompt_ids)))
        attempts = [0] * len(prompt_ids)
        errors: list[list[str]] = [[] for _ in prompt_ids]
        results: dict[int, GenerateResult] = {}
        in_flight: dict[int, int] = {}
        last_progress: dict[int, float] = {}
        """Per server: when it last answered (or got work while idle); stalls are measured from it."""
        running: dict[Future, tuple[int, int]] = {}

        def retry(i: int, error: str) -> None:
            errors[i].append(error)
            if attempts[i] >= self.max_attempts:
                raise RolloutFailedError(f"prompt {i}: no answer after {attempts[i]} attempts: {errors[i]}")
            pending.append((time.monotonic() + self.backoff_s * 2 ** (attempts[i] - 1), i))

        # A hung server's requests are abandoned (their answers ignored; see _in_daemon_thread).
        while pending or running:
            if self.stop_requested():
                raise RolloutInterrupted(f"a stop was requested with {len(prompt_ids) - len(results)} of {len(prompt_ids)} prompts unanswered")
            if self._recovery_errors:
                self.wait_for_recovery()
            now = time.monotonic()
            for _ in range(len(pending)):
                if len(running) >= self.max_concurrent_requests:
                    break
                not_before, i = pending.popleft()
                server = self._pick_server(in_flight)
                if not_before > now or server is None:
                    pending.append((not_before, i))
                    continue
                request = GenerateRequest(
                    f"{self.tag}-s{seed}-p{i}-a{attempts[i]}", prompt_ids[i], sampling, self.stop_token_ids,
                    seed=(seed * 1_000_003 + i) % 2**63,
                )
                attempts[i] += 1
                if not in_flight.get(server):
                    last_progress[server] = now
                in_flight[server] = in_flight.get(server, 0) + 1
                running[_in_daemon_thread(generate_one, self.urls[server], request, self.request_timeout_s)] = (i, server)
            if not running:
                if not self._healthy and not self._recoveries and not self._rejoin_restarted():
                    raise RolloutFailedError(f"no healthy SGLang server left; {len(pending)} prompts unanswered")
                time.sleep(0.05)
                continue
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                i, server = running.pop(future)
                in_flight[server] -= 1
                last_progress[server] = time.monotonic()
                try:
                    result = future.result()
                except ServerRejected as error:
                    raise ServerRejected(f"prompt {i}: {error}") from None
                except ServerUnavailable as error:
                    if server in self._healthy and not self._server_ok(server):
                        self._mark_failed(server)
                    retry(i, str(error))
                    continue
                versions = set(result.weight_versions_in_response) | {result.weight_version}
                if versions != {self._served_version}:
                    self._mark_failed(server)
                    retry(i, f"{self.urls[server]} answered with weight versions {sorted(versions)}, expected {self._served_version}")
                    continue
                if i in results:
                    raise RuntimeError(f"prompt {i} answered twice ({results[i].rollout_id}, {result.rollout_id})")
                results[i] = result
            self._abandon_stalled(running, in_flight, last_progress, retry)
        return results

    def _abandon_stalled(
        self, running: dict[Future, tuple[int, int]], in_flight: dict[int, int], last_progress: dict[int, float], retry: Callable[[int, str], None]
    ) -> None:
        """A server with work but no answer for stall_timeout_s is probed; if it fails the probe (hung), it
        leaves the pool. The requests of a server out of the pool (this way, or after another request of
        it failed) are sent elsewhere at once, not left to their timeout (late answers are ignored)."""
        now = time.monotonic()
        for server, count in list(in_flight.items()):
            if count == 0:
                continue
            if server in self._healthy:
                if now - last_progress[server] < self.stall_timeout_s:
                    continue
                if self._server_ok(server):
                    last_progress[server] = now  # slow, not hung
                    continue
                self._mark_failed(server)
                reason = f"{self.urls[server]} made no progress for {self.stall_timeout_s:.0f} s and failed its health probe"
            else:
                reason = f"{self.urls[server]} left the pool with this request in flight"
            for future, (i, owner) in list(running.items()):
                if owner == server:
                    running.pop(future)
                    in_flight[server] -= 1
                    retry(i, reason)

    def close(self) -> None:
        """Waits for restarts in progress (see `_join_recoveries`), then closes the transport's groups and stops the
        servers it started (owner only)."""
        if self.transport is None and self.fleet is None:
            return
        try:
            self._join_recoveries()
            if self.transport is not None and not self._recoveries:  # a restart abandoned on a stop may be using it
                self.transport.close()
        finally:
            if self.fleet is not None:
                self.fleet.stop()
