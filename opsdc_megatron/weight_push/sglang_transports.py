"""The three ways the trainer's weights reach SGLang servers after an optimizer step.

All three carry Hugging Face names and full tensors, exactly what
`models.qwen3.state_dict_adapter.export_hf_state_dict` returns (the one name map per architecture);
SGLang's own `load_weights` fuses q/k/v and gate/up on its side. Each push carries the weight
version, which SGLang stamps on every later `/generate` answer.

* `TensorTransport` (colocated: trainer and server share a host): buckets of tensors in shared
  memory, `/update_weights_from_tensor` inside `/begin_weight_update` ... `/end_weight_update`.
  The payload is SGLang's wire format: torch's ForkingPickler (file_system sharing strategy), base64,
  one pickle per server TP rank; a flattened bucket is {"flattened_tensor", "metadata"} with metadata
  records carrying the fields SGLang's FlattenedTensorMetadata has (name, shape, dtype, start_idx,
  end_idx, numel), as `types.SimpleNamespace`, which SGLang's safe unpickler admits. The wire format
  is written here with torch alone rather than by importing SGLang's MultiprocessingSerializer /
  FlattenedTensorBucket: SGLang 0.5.23 pins torch 2.14.1 (the trainer runs 2.13) and its package
  import patches transformers in the importing process, which the trainer must not have.
* `DistributedTransport` (separate hosts): a process group per server, trainer rank 0 + the server's
  TP ranks, made by `/init_weights_update_group`; each bucket is one flattened broadcast announced by
  `/update_weights_from_distributed`. NCCL on GPUs, gloo on CPU (SGLang accepts both).
* `DiskTransport`: a safetensors folder per version, `/update_weights_from_disk`. The slowest, but needs
  nothing but a shared file system; also what a restarted server would load from.
"""

from __future__ import annotations

import base64
import io
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing  # registers torch's tensor reductions with ForkingPickler

from opsdc_megatron.models.hf_folder import save_hf_folder
from opsdc_megatron.rollout.sglang.client import free_port, post_json
from opsdc_megatron.weight_push.buckets import DEFAULT_BUCKET_BYTES, buckets

TRANSPORTS = ("tensor", "distributed", "disk")


class WeightPushError(RuntimeError):
    """A server refused or failed a push; the message names the server and the step."""


class WeightTransport(ABC):
    """Pushes HF-named full tensors to servers; `connect`/`disconnect` wrap a server's lifetime."""

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 600.0) -> None:
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s

    def connect(self, url: str, tensor_parallel_size: int) -> None:
        """Called once a server is healthy (at start and after a restart)."""

    def disconnect(self, url: str) -> None:
        """Called before a server is restarted or stopped."""

    @abstractmethod
    def push(self, servers: Mapping[str, int], state_dict: Mapping[str, torch.Tensor], version: str) -> None:
        """Load `state_dict` into every server ({url: tensor-parallel size}) and stamp `version`."""

    def close(self) -> None:
        for url in list(getattr(self, "_groups", {})):
            self.disconnect(url)

    @contextmanager
    def _update_session(self, urls: list[str]) -> Iterator[None]:
        """`/begin_weight_update` ... `/end_weight_update`: SGLang 0.5.23 refuses tensor and distributed
        updates outside such a session (400) and refuses to open a second one: every session opened is
        closed, also when a bucket fails or another server could not open its own, so the next push can open one."""
        errors = self._post_each(urls, "/begin_weight_update", lambda url: {})
        opened = [url for url, error in errors.items() if error is None]
        try:
            self._raise_failures(errors, "begin_weight_update")
            yield
        finally:
            self._post_all(opened, "/end_weight_update", lambda url: {}, "end_weight_update")

    def _post_all(self, urls: list[str], path: str, payload_for: Callable[[str], dict], what: str) -> None:
        """The same kind of call to every server at once; raises naming each failed server."""
        self._raise_failures(self._post_each(urls, path, payload_for), what)

    def _post_each(self, urls: list[str], path: str, payload_for: Callable[[str], dict]) -> dict[str, BaseException | None]:
        """The same kind of call to every server at once: {url: its error, or None}."""
        def call(url: str) -> None:
            answer = post_json(f"{url}{path}", payload_for(url), self.timeout_s)
            if answer.get("success") is False:
                raise WeightPushError(f"{url}{path}: {answer.get('message')}")

        with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
            futures = {url: pool.submit(call, url) for url in urls}
        return {url: future.exception() for url, future in futures.items()}

    @staticmethod
    def _raise_failures(errors: dict[str, BaseException | None], what: str) -> None:
        failed = [str(error) for error in errors.values() if error is not None]
        if failed:
            raise WeightPushError(f"{what} failed on {len(failed)} of {len(errors)} servers: " + "; ".join(failed))


def serialize_for_sglang(obj: object) -> str:
    """SGLang's MultiprocessingSerializer format: ForkingPickler bytes, base64 text."""
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode()


def flattened_bucket(named_tensors: list[tuple[str, torch.Tensor]]) -> dict:
    """One contiguous tensor and the metadata SGLang rebuilds the named tensors from (one dtype)."""
    flat = torch.cat([t.detach().reshape(-1) for _, t in named_tensors])
    metadata, start = [], 0
    for name, tensor in named_tensors:
        numel = tensor.numel()
        metadata.append(SimpleNamespace(name=name, shape=tensor.shape, dtype=tensor.dtype, start_idx=start, end_idx=start + numel, numel=numel))
        start += numel
    return {"flattened_tensor": flat, "metadata": metadata}


class TensorTransport(WeightTransport):
    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 600.0, flattened: bool = True) -> None:
        super().__init__(bucket_bytes, timeout_s)
        self.flattened = flattened
        # With the default file_descriptor strategy the server's unpickling fails ("digest sent was
        # rejected") and takes the server down: tensors must travel as named files in /dev/shm.
        torch.multiprocessing.set_sharing_strategy("file_system")

    def push(self, servers: Mapping[str, int], state_dict: Mapping[str, torch.Tensor], version: str) -> None:
        parts = list(buckets(state_dict, self.bucket_bytes))
        with self._update_session(list(servers)):
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                cpu_part = [(name, tensor.detach().cpu()) for name, tensor in part]
                payload_object = flattened_bucket(cpu_part) if self.flattened else cpu_part
                # One pickle per receiving rank, as SGLang's own client makes: with the file_system
                # strategy each pickling adds a reference to the shared-memory file and each unpickling
                # drops one, so one pickle read by three ranks unlinked the file under the third.
                serialized = {url: [serialize_for_sglang(payload_object) for _ in range(tp)] for url, tp in servers.items()}
                body = {
                    "load_format": "flattened_bucket" if self.flattened else None,
                    "flush_cache": last,
                    "weight_version": version if last else None,
                }
                self._post_all(
                    list(servers), "/update_weights_from_tensor",
                    lambda url: {**body, "serialized_named_tensors": serialized[url]},
                    f"update_weights_from_tensor (bucket {index + 1}/{len(parts)}, version {version})",
                )
                # Dropping the last reference unlinks the shared-memory file.
                del payload_object, cpu_part


def _url_host(address: str) -> str:
    """An address as the host part of a URL: an IPv6 literal goes in brackets."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def join_weight_update_group(backend: str, address: str, port: int, world_size: int, group_name: str, timeout_s: float) -> dist.ProcessGroup:
    """Rank 0 of the group SGLang's `/init_weights_update_group` makes, on this process's side.

    SGLang builds that group with its `init_custom_process_group`: a TCP rendezvous whose store keys
    carry the group name as prefix, and a process group outside the default world. A plain
    `init_process_group` would wait on keys without that prefix (and replace this process's
    default group), so the same construction is made here from torch's own pieces.
    """
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{_url_host(address)}:{port}", 0, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), PrefixStore(group_name, store), group_name=group_name, backend_options=None, timeout=timeout
    )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class DistributedTransport(WeightTransport):
    """One group per server, so a restarted server rejoins without disturbing the others."""

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 600.0, backend: str | None = None, master_address: str = "127.0.0.1") -> None:
        super().__init__(bucket_bytes, timeout_s)
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self.master_address = master_address
        self._groups: dict[str, tuple[str, dist.ProcessGroup]] = {}

    def connect(self, url: str, tensor_parallel_size: int) -> None:
        if url in self._groups:
            self.disconnect(url)
        group_name = f"opsdc-weights-{uuid.uuid4().hex[:12]}"
        port = free_port(self.master_address)
        request = {
            "master_address": self.master_address, "master_port": port, "rank_offset": 1,
            "world_size": 1 + tensor_parallel_size, "group_name": group_name, "backend": self.backend,
        }
        answer: dict = {}
        failure: list[BaseException] = []
        joined: list = []

        def ask_server() -> None:
            try:
                answer.update(post_json(f"{url}/init_weights_update_group", request, self.timeout_s))
            except BaseException as error:
                failure.append(error)

        def join() -> None:
            try:
                joined.append(join_weight_update_group(self.backend, self.master_address, port, 1 + tensor_parallel_size, group_name, self.timeout_s))
            except BaseException as error:
                joined.append(error)

        # The server joins inside the request, so the request is in flight while we join. A server that
        # refuses never joins: its answer ends the wait (the join thread then times out on its own).
        asking, joining = (threading.Thread(target=target, daemon=True) for target in (ask_server, join))
        asking.start()
        joining.start()
        refused = lambda: not asking.is_alive() and (failure or answer.get("success") is False)  # noqa: E731
        while joining.is_alive() and not refused():
            joining.join(0.1)
        if not refused():
            asking.join(self.timeout_s)
        if refused() or asking.is_alive():
            if joined and isinstance(joined[0], dist.ProcessGroup):
                dist.destroy_process_group(joined[0])
            reason = failure[0] if failure else answer.get("message") if refused() else f"no answer in {self.timeout_s:.0f} s"
            raise WeightPushError(f"{url}/init_weights_update_group: {reason}")
        if isinstance(joined[0], BaseException):
            raise WeightPushError(f"{url}/init_weights_update_group: joining the group failed: {joined[0]}") from joined[0]
        self._groups[url] = (group_name, joined[0])

    def disconnect(self, url: str) -> None:
        self._drop_group(url, broadcast_pending=False)

    def _drop_group(self, url: str, broadcast_pending: bool) -> None:
        """Destroys the server's side of its group (if it still answers) and this side. A group whose
        broadcast the server never joined is aborted instead: NCCL would keep the broadcast queued, hang
        the group's destruction on it, and its watchdog would end this process at the timeout."""
        entry = self._groups.pop(url, None)
        if entry is None:
            return
        group_name, group = entry
        try:
            post_json(f"{url}/destroy_weights_update_group", {"group_name": group_name}, 10.0)
        except (ConnectionError, ValueError):
            pass  # a dead server has no group left to destroy
        if broadcast_pending:
            dist.distributed_c10d._abort_process_group(group)
        else:
            dist.destroy_process_group(group)

    def push(self, servers: Mapping[str, int], state_dict: Mapping[str, torch.Tensor], version: str) -> None:
        missing = [url for url in servers if url not in self._groups]
        if missing:
            raise WeightPushError(f"no weight-update group with {missing}: connect() first")
        parts = list(buckets(state_dict, self.bucket_bytes))
        with self._update_session(list(servers)):
            for index, part in enumerate(parts):
                self._broadcast_bucket(servers, part, version if index == len(parts) - 1 else None, f"bucket {index + 1}/{len(parts)}, version {version}")

    def _broadcast_bucket(self, servers: Mapping[str, int], part: list[tuple[str, torch.Tensor]], version: str | None, what: str) -> None:
        """Announces the bucket to every server and broadcasts it as one flattened tensor per group.

        The broadcasts are issued asynchronously and awaited only after every server has answered
        its request: a server that refuses the request never joins the broadcast, and a blocking
        broadcast would then wait out the group's whole timeout.
        """
        flat = torch.cat([t.detach().reshape(-1) for _, t in part]).to(self.device)
        announce = {
            "names": [name for name, _ in part],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in part],
            "shapes": [list(t.shape) for _, t in part],
            "load_format": "flattened_bucket",
            "flush_cache": version is not None,
            "weight_version": version,
        }
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            calls = {
                url: pool.submit(post_json, f"{url}/update_weights_from_distributed", {**announce, "group_name": self._groups[url][0]}, self.timeout_s)
                for url in servers
            }
            works = {url: dist.broadcast(flat, src=0, group=self._groups[url][1], async_op=True) for url in servers}
            failed = []
            for url, call in calls.items():
                try:
                    answer = call.result()
                except (ConnectionError, ValueError) as error:
                    answer = {"success": False, "message": str(error)}
                if answer.get("success") is False:
                    failed.append(f"{url}: {answer.get('message')}")
                    self._drop_group(url, broadcast_pending=True)
                else:
                    works[url].wait()
        if failed:
            raise WeightPushError(f"update_weights_from_distributed ({what}) failed: " + "; ".join(failed))


class DiskTransport(WeightTransport):
    """Writes `<directory>/v<version>` (safetensors + the launch folder's config and tokenizer) and loads it."""

    def __init__(self, directory: str | Path, source_model_dir: str | Path, timeout_s: float = 600.0, keep_last: int = 1) -> None:
        super().__init__(DEFAULT_BUCKET_BYTES, timeout_s)
        self.directory, self.source_model_dir, self.keep_last = Path(directory), Path(source_model_dir), keep_last

    def push(self, servers: Mapping[str, int], state_dict: Mapping[str, torch.Tensor], version: str) -> None:
        folder = save_hf_folder(dict(state_dict), self.source_model_dir, self.directory / f"v{version}")
        self._post_all(
            list(servers), "/update_weights_from_disk",
            lambda url: {"model_path": str(folder), "weight_version": version, "flush_cache": True},
            f"update_weights_from_disk ({folder})",
        )
        versions = sorted((p for p in self.directory.glob("v*") if p.is_dir() and p != folder), key=lambda p: p.stat().st_mtime)
        for old in versions[: max(0, len(versions) - self.keep_last + 1)]:
            shutil.rmtree(old, ignore_errors=True)


def make_transport(
    kind: str, bucket_bytes: int, model_path: str, disk_dir: str | Path, timeout_s: float = 600.0, master_address: str = "127.0.0.1"
) -> WeightTransport:
    """The transport named by `rollout.sglang.weight_transport`; `master_address`: where the servers reach this process."""
    if kind == "tensor":
        return TensorTransport(bucket_bytes, timeout_s)
    if kind == "distributed":
        return DistributedTransport(bucket_bytes, timeout_s, master_address=master_address)
    if kind == "disk":
        return DiskTransport(disk_dir, model_path, timeout_s)
    raise ValueError(f"weight transport must be one of {TRANSPORTS}, got {kind!r}")
