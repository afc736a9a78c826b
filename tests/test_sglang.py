"""SGLang rollout servers, tested against real SGLang 0.5.23 servers on CPU (loopback).

One fleet of two servers (and sglang-router) serves the whole module, started once: the tests run in
file order and each leaves the fleet serving the weights it pushed last. The trainer side is the
project's own: a megatron-core Qwen3 (TP=1, in this process) loaded from the tiny Hugging Face folder
the module writes, stepped by the OPSDC optimizer step, exported by the one name map.
Needs .venv-sglang (make env-sglang).
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opsdc_megatron.config import TrainConfig
from opsdc_megatron.rollout.engine import RolloutEngineError, RolloutInterrupted, SamplingParams
from opsdc_megatron.rollout.sglang.client import GenerateRequest, ServerRejected, ServerUnavailable, generate_one, post_json
from opsdc_megatron.rollout.sglang.engine import SGLangRolloutEngine
from opsdc_megatron.rollout.sglang.launcher import DEFAULT_SGLANG_PYTHON, ServerFleet, cpu_settings
from opsdc_megatron.weight_push.sglang_transports import DiskTransport, DistributedTransport, TensorTransport, WeightPushError
from tests.launch import free_base_port

pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(not DEFAULT_SGLANG_PYTHON.exists(), reason="needs .venv-sglang: run `make env-sglang`"),
]

VOCAB, EOS = 128, 1
PROMPTS = [[5, 17, 42, 9], [3, 4], [100, 101, 102, 103, 104, 105], [7]]
INSTRUCTION = [60, 61, 62]
LOGPROB_TOL = 1e-4


def free_port_pair() -> int:
    """A base port with base and base + 1 free (two servers), and base + 2 (router)."""
    return free_base_port(range(3))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random fp32 Qwen3 folder (no tokenizer: the servers read token ids only)."""
    folder = tmp_path_factory.mktemp("sglang") / "tiny_qwen3"
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, eos_token_id=EOS, bos_token_id=0, pad_token_id=0,
    )
    model = Qwen3ForCausalLM(config).float()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


DEAD_PROXY = {name: "http://127.0.0.1:9" for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")}
"""A cluster-style proxy that reaches nothing (port 9 is closed here): the servers, the router and
every client request of this module must go around it."""


@pytest.fixture(scope="module")
def behind_dead_proxy():
    saved = {name: os.environ.get(name) for name in DEAD_PROXY}
    os.environ.update(DEAD_PROXY)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, behind_dead_proxy: None):
    base = free_port_pair()
    settings = cpu_settings(str(tiny_model), base_port=base, log_dir=str(tmp_path_factory.mktemp("sglang_logs")), max_total_tokens=4096,
        startup_timeout_s=900,  # ~30 s each on an idle 2-core machine; minutes when it is shared
    )
    with ServerFleet(settings, num_servers=2, router_port=base + 2) as running:
        yield running


@pytest.fixture
def pushed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a disk push to the module's servers writes. Not the test's tmp_path, which goes when the test
    passes: the servers go on serving from the folder, and the next test's engine reads its config.json."""
    return tmp_path_factory.mktemp("pushed")


@pytest.fixture(scope="module")
def trainer(tiny_model: Path):
    """megatron-core student + teacher (TP=1) with the project's optimizer, in this process."""
    from transformers import AutoConfig

    from opsdc_megatron.config import ParallelConfig
    from opsdc_megatron.parallel import destroy_distributed, init_distributed
    from opsdc_megatron.train.build import build_training_model

    init_distributed(1, seed=0)
    try:
        yield build_training_model(
            AutoConfig.from_pretrained(tiny_model), str(tiny_model), ParallelConfig(), torch.float32,
            TrainConfig(lr=3e-2, weight_decay=0.0), teacher_refresh_every=0,
        )
    finally:
        destroy_distributed()


def megatron_logprobs(student: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response token | prefix) under the megatron model, fp32."""
    from opsdc_megatron.distill.stage import response_logits

    tokens = torch.tensor([prompt + response])
    index = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)[None]
    with torch.no_grad():
        inputs = dict(input_ids=tokens, position_ids=torch.arange(tokens.shape[1])[None], attention_mask=None)
        picked = response_logits(student, inputs, index, VOCAB)[0].float()
    return torch.log_softmax(picked, dim=-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def assert_logprob_parity(engine: SGLangRolloutEngine, score, version: int) -> None:
    results = engine.sample(PROMPTS * 2, SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12), seed=11)
    worst = 0.0
    for prompt, result in zip(PROMPTS * 2, results):
        assert result.weight_version == str(version), result
        assert result.weight_versions_in_response == (str(version),)
        reference = score(prompt, result.output_ids)
        worst = max(worst, (torch.tensor(result.logprobs) - reference).abs().max().item())
    assert worst <= LOGPROB_TOL, f"SGLang vs trainer logprobs differ by {worst:.2e} at version {version}"
    assert {r.server_url for r in results} == set(engine.urls), "both servers should have answered"


def test_logprob_parity_before_and_after_an_optimizer_step(fleet: ServerFleet, trainer) -> None:
    from opsdc_megatron.distill.batch import ScoredSequence, make_micro_batches
    from opsdc_megatron.distill.forward import make_forward_step
    from opsdc_megatron.models.qwen3.state_dict_adapter import export_hf_state_dict
    from opsdc_megatron.train.step import optimizer_step

    student = trainer.student[0]
    engine = SGLangRolloutEngine(fleet, TensorTransport(bucket_bytes=64 * 1024), [EOS], VOCAB)
    engine.update_weights(export_hf_state_dict(student), version=0)
    assert engine.weight_version == 0
    assert_logprob_parity(engine, lambda p, r: megatron_logprobs(student, p, r), 0)

    sampling = SamplingParams(temperature=1.0, max_new_tokens=10)
    rollouts = engine.generate(PROMPTS, sampling, seed=3)
    assert [r.prompt_index for r in rollouts] == list(range(len(PROMPTS)))

    # One real OPSDC step: teacher = the same weights behind an instruction, exact reverse KL.
    sequences = [ScoredSequence(p, INSTRUCTION + p, r.response_ids) for p, r in zip(PROMPTS, rollouts)]
    before = {name: t.clone() for name, t in export_hf_state_dict(student).items()}
    result = optimizer_step(trainer.stages, trainer.optimizer, make_forward_step("reverse_kl"), make_micro_batches(sequences, 2, 0))
    assert result.grad_norm > 0
    after = export_hf_state_dict(student)
    assert any(not torch.equal(before[name], after[name]) for name in after)

    engine.update_weights(after, version=1)
    assert_logprob_parity(engine, lambda p, r: megatron_logprobs(student, p, r), 1)
    for url in fleet.urls:
        assert post_json(f"{url}/model_info", None, 10)["weight_version"] == "1"


def shifted_weights(fleet_model: Path, seed: int) -> tuple[dict[str, torch.Tensor], Qwen3ForCausalLM]:
    """A visibly different state dict and the transformers model that holds it (the reference)."""
    model = Qwen3ForCausalLM.from_pretrained(fleet_model, dtype=torch.float32, attn_implementation="eager").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return state, model


def transformers_logprobs(model: Qwen3ForCausalLM, prompt: list[int], response: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.parametrize("transport", ["distributed", "disk"])
def test_other_transports_push_exact_weights(fleet: ServerFleet, tiny_model: Path, pushed_folder: Path, transport: str) -> None:
    """gloo broadcast group and safetensors folder; checked against transformers on the pushed weights."""
    version = {"distributed": 2, "disk": 3}[transport]
    weights = DistributedTransport(bucket_bytes=64 * 1024) if transport == "distributed" else DiskTransport(pushed_folder, tiny_model)
    engine = SGLangRolloutEngine(fleet, weights, [EOS], VOCAB)
    try:
        state, reference = shifted_weights(tiny_model, seed=version)
        engine.update_weights(state, version=version)
        assert_logprob_parity(engine, lambda p, r: transformers_logprobs(reference, p, r), version)
    finally:
        weights.close()


def test_refused_broadcast_aborts_that_servers_group_and_a_new_one_works(fleet: ServerFleet, tiny_model: Path) -> None:
    """A server that refuses a bucket never joins its broadcast: the push fails at once, naming it, and
    the group with the pending broadcast is aborted (NCCL's watchdog would end the trainer at the timeout)."""
    import torch.distributed as dist

    url = fleet.urls[0]
    weights = DistributedTransport(bucket_bytes=64 * 1024, timeout_s=300)
    try:
        weights.connect(url, 1)
        group_name, group = weights._groups[url]
        weights._groups[url] = ("no-such-group", group)  # the server refuses every bucket before its broadcast
        state, reference = shifted_weights(tiny_model, seed=3)  # what the disk push left: later tests see no change
        started = time.monotonic()
        with pytest.raises(WeightPushError, match=rf"update_weights_from_distributed \(bucket 1/\d+, version 3\) failed: {url}: .*no-such-group"):
            weights.push({url: 1}, state, "3")
        assert time.monotonic() - started < 60
        assert url not in weights._groups and group not in dist.distributed_c10d._world.pg_map
        post_json(f"{url}/destroy_weights_update_group", {"group_name": group_name}, 10)

        engine = SGLangRolloutEngine(fleet, weights, [EOS], VOCAB)  # new groups with both servers
        engine.update_weights(state, version=3)
        assert_logprob_parity(engine, lambda p, r: transformers_logprobs(reference, p, r), 3)
    finally:
        weights.close()


def test_an_answer_with_other_weights_is_sent_again_elsewhere(fleet: ServerFleet, tiny_model: Path, pushed_folder: Path) -> None:
    """A trainer rank that is not the owner meets a server the owner restarted and has not yet brought to the
    current weights: those answers are not used, the server leaves that rank's pool, the prompts go elsewhere."""
    state, _ = shifted_weights(tiny_model, seed=3)  # the current weights, version 3
    restarted, current = fleet.urls
    weights = DiskTransport(pushed_folder, tiny_model)
    TensorTransport().push({current: 1}, state, "3")  # whatever the tests before left there (the disk push would move its model path)
    weights.push({restarted: 1}, state, "launch")
    try:
        other_rank = SGLangRolloutEngine(fleet.urls, None, [EOS], VOCAB)
        other_rank.update_weights(state, version=3)  # the owner's broadcast: version 3, both servers healthy
        results = other_rank.sample(PROMPTS * 4, SamplingParams(max_new_tokens=4), seed=5)
        assert {(r.server_url, r.weight_version) for r in results} == {(current, "3")}
    finally:
        weights.push({restarted: 1}, state, "3")


def test_router_routes_to_the_servers(fleet: ServerFleet) -> None:
    answer = post_json(
        f"{fleet.router.url}/generate",
        {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 4, "temperature": 0.0}, "return_logprob": True}, 60,
    )
    served = {post_json(f"{url}/model_info", None, 10)["weight_version"] for url in fleet.urls}
    assert len(answer["output_ids"]) >= 1 and {answer["meta_info"]["weight_version"]} == served


def test_a_second_router_on_the_host_starts(fleet: ServerFleet, tmp_path: Path) -> None:
    """Two routers on one host (two jobs on a node): the second died binding Prometheus' default port 29000,
    here held the way the first router holds it."""
    from opsdc_megatron.rollout.sglang.launcher import SGLangRouter

    with socket.socket() as metrics:
        metrics.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            metrics.bind(("0.0.0.0", 29000))
            metrics.listen()
        except OSError:
            pass  # already taken: the case itself
        router = SGLangRouter(list(fleet.urls), fleet.settings, free_base_port(range(1)), tmp_path)
        try:
            router.start()
            router.wait_ready(60.0)
            answer = post_json(f"{router.url}/generate", {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 2}}, 60)
            assert len(answer["output_ids"]) >= 1
        finally:
            router.stop()


def test_a_server_that_cannot_open_a_session_leaves_no_other_open(fleet: ServerFleet, tiny_model: Path) -> None:
    """A push to a live server and one that is gone: the live one's session is closed again (SGLang
    refuses to open a second one, so every later push to it failed), and the next push succeeds."""
    live, gone = fleet.urls[0], f"http://127.0.0.1:{free_port_pair()}"
    state, _ = shifted_weights(tiny_model, seed=3)  # what the servers hold (version 3): nothing changes
    with pytest.raises(WeightPushError, match=rf"begin_weight_update failed on 1 of 2 servers: {gone}"):
        TensorTransport().push({live: 1, gone: 1}, state, "3")
    TensorTransport().push({live: 1}, state, "3")
    assert post_json(f"{live}/model_info", None, 10)["weight_version"] == "3"


def test_external_servers_left_by_a_trainer_killed_mid_push_serve_the_next_one(fleet: ServerFleet, tiny_model: Path) -> None:
    """Servers started outside the trainer (rollout.sglang.server_urls) outlive a trainer killed during a push:
    here one is left paused, the other with its weight-update session open. The next trainer's engine undoes
    both; before, the paused server failed its /health probe and the open session refused every push."""
    paused, in_session = fleet.urls
    post_json(f"{paused}/pause_generation", {"mode": "abort"}, 30)
    post_json(f"{in_session}/begin_weight_update", {}, 30)
    state, reference = shifted_weights(tiny_model, seed=3)  # what the servers hold (version 3): nothing changes
    try:
        engine = SGLangRolloutEngine(list(fleet.urls), TensorTransport(), [EOS], VOCAB)
        engine.update_weights(state, version=3)
        assert_logprob_parity(engine, lambda p, r: transformers_logprobs(reference, p, r), 3)
    finally:  # a failed test must not leave a paused server or an open session to the tests after it
        post_json(f"{paused}/continue_generation", {}, 30)
        try:
            post_json(f"{in_session}/end_weight_update", {}, 30)
        except ServerRejected:
            pass


def test_an_external_server_that_failed_a_probe_rejoins_at_the_next_push(fleet: ServerFleet, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server started outside the trainer fails one probe (a network hiccup, stood in for by a refused /health)
    and leaves the pool; once it answers again, the next push takes it back with the current weights. It stayed
    out for the rest of the run (the trainer does not restart such servers), and one hiccup per server ended it."""
    import opsdc_megatron.rollout.sglang.engine as engine_module

    hiccup, steady = fleet.urls
    real_post_json, unreachable = engine_module.post_json, [True]

    def post_json(url, *args, **kwargs):
        if url == f"{hiccup}/health" and unreachable[0]:
            raise ServerUnavailable(f"{url}: connection reset (test)")
        return real_post_json(url, *args, **kwargs)

    monkeypatch.setattr(engine_module, "post_json", post_json)
    engine = SGLangRolloutEngine(list(fleet.urls), TensorTransport(), [EOS], VOCAB)
    engine.update_weights(shifted_weights(tiny_model, seed=4)[0], version=4)
    assert [post_json(f"{url}/model_info", None, 10)["weight_version"] == "4" for url in (hiccup, steady)] == [False, True]
    unreachable[0] = False
    state, reference = shifted_weights(tiny_model, seed=5)
    engine.update_weights(state, version=5)
    assert [post_json(f"{url}/model_info", None, 10)["weight_version"] for url in (hiccup, steady)] == ["5", "5"]
    assert_logprob_parity(engine, lambda p, r: transformers_logprobs(reference, p, r), 5)


def fault_before_request(monkeypatch: pytest.MonkeyPatch, url: str, request_number: int, fault: Callable[[], None]) -> None:
    """Runs `fault` once, in the request thread, just before the `request_number`-th request to `url` is
    sent: mid-batch on any machine, however fast, with that request (and any still unanswered before it)
    meeting the failed server. A fixed sleep, or the n-th answer, did not: a server answers a decode
    batch's requests in one burst, so after an answer nothing may be left in flight. The tests take a
    request of the first burst (16 in flight, dealt to the least busy server: 8 each): a later one may
    never come to a server that answers slower (CI under load: the 10th never came, no fault)."""
    import opsdc_megatron.rollout.sglang.engine as engine_module

    real_generate_one = engine_module.generate_one
    lock, sent = threading.Lock(), [0]

    def generate_one_with_fault(server_url: str, request: GenerateRequest, timeout_s: float):
        if server_url == url:
            with lock:
                sent[0] += 1
                if sent[0] == request_number:
                    fault()
        return real_generate_one(server_url, request, timeout_s)

    monkeypatch.setattr(engine_module, "generate_one", generate_one_with_fault)


@pytest.mark.parametrize("killed", [[0], [0, 1]], ids=["one", "all"])
def test_servers_killed_during_a_push_are_restarted_with_the_new_weights(
    fleet: ServerFleet, tiny_model: Path, pushed_folder: Path, monkeypatch: pytest.MonkeyPatch, killed: list[int]
) -> None:
    """Servers die as the push starts: the push completes on the others, or, with none left, through the
    restarts, which bring every restarted server to the pushed weights; all answer with them."""
    state, reference = shifted_weights(tiny_model, seed=7 + len(killed))
    version = 7 + len(killed)
    weights = DiskTransport(pushed_folder, tiny_model)
    engine = SGLangRolloutEngine(fleet, weights, [EOS], VOCAB)
    real_push, pushes = weights.push, []

    def push_as_servers_die(servers, state_dict, version):
        pushes.append(sorted(servers))
        if len(pushes) == 1:
            for index in killed:
                fleet.servers[index].kill()
        return real_push(servers, state_dict, version)

    monkeypatch.setattr(weights, "push", push_as_servers_die)
    engine.update_weights(state, version=version)
    engine.wait_for_recovery()
    survivors = [[url] for index, url in enumerate(fleet.urls) if index not in killed]
    assert engine.restarts == len(killed) and pushes[: 1 + len(survivors)] == [sorted(fleet.urls), *survivors], pushes
    assert_logprob_parity(engine, lambda p, r: transformers_logprobs(reference, p, r), version)


def test_a_rank_without_the_fleet_waits_while_rank_0_restarts_every_server(fleet: ServerFleet, tiny_model: Path, pushed_folder: Path) -> None:
    """Both servers die while rank 0, the fleet's owner, has finished its rollouts and waits for the other
    ranks' (generate_across_ranks holds `serving_other_ranks` around the gather). Another trainer rank
    (URLs only) finds no server left: it waits while rank 0 notices and restarts them with the current
    weights, then carries on. It gave up at once; and rank 0, blocked in the gather, restarted nothing."""
    state, reference = shifted_weights(tiny_model, seed=21)
    owner = SGLangRolloutEngine(fleet, DiskTransport(pushed_folder, tiny_model), [EOS], VOCAB, backoff_s=0.2)
    other_rank = SGLangRolloutEngine(fleet.urls, None, [EOS], VOCAB, backoff_s=0.2, owner_restart_wait_s=600)
    owner.update_weights(state, version=21)
    other_rank.update_weights({}, version=21)  # what the owner's broadcast does on a real other rank
    for server in fleet.servers:
        server.kill()
    with ThreadPoolExecutor(1) as pool, owner.serving_other_ranks():
        results = pool.submit(other_rank.sample, PROMPTS, SamplingParams(max_new_tokens=8), 3).result(timeout=600)
    assert owner.restarts == 2 and all(r.weight_version == "21" for r in results)
    assert all(not r.rollout_id.endswith("-a0") for r in results), "the first attempts went to dead servers"
    other_rank.update_weights({}, version=21)  # the next push: the server it had not yet taken back joins too
    assert_logprob_parity(other_rank, lambda p, r: transformers_logprobs(reference, p, r), 21)


def test_sigkill_mid_batch_every_prompt_answered_once(fleet: ServerFleet, trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server 0 is SIGKILLed while the batch runs: its prompts go to server 1, it restarts, gets the weights."""
    from opsdc_megatron.models.qwen3.state_dict_adapter import export_hf_state_dict

    student = trainer.student[0]
    engine = SGLangRolloutEngine(fleet, TensorTransport(), [EOS], VOCAB, max_concurrent_requests=16, request_timeout_s=120, backoff_s=0.2)
    engine.update_weights(export_hf_state_dict(student), version=4)
    prompts = [[2 + (i % 120), 3 + (i * 7) % 120] for i in range(48)]
    fault_before_request(monkeypatch, fleet.urls[0], request_number=5, fault=fleet.servers[0].kill)
    try:
        results = engine.sample(prompts, SamplingParams(temperature=1.0, max_new_tokens=48), seed=5)
        assert len(results) == len(prompts)
        ids = [r.rollout_id for r in results]
        assert [int(i.split("-p")[1].split("-")[0]) for i in ids] == list(range(len(prompts))), "each prompt answered once, in order"
        assert any(not rid.endswith("-a0") for rid in ids), "the prompts sent to the killed server must have been resent"
        assert all(r.weight_version == "4" for r in results)
    finally:  # a failed test must not leave a server down to the tests after it
        engine.wait_for_recovery()
    assert engine.restarts == 1 and fleet.servers[0].alive()
    assert post_json(f"{fleet.urls[0]}/model_info", None, 10)["weight_version"] == "4"
    assert_logprob_parity(engine, lambda p, r: megatron_logprobs(student, p, r), 4)


def test_a_stop_ends_the_rollouts_at_once_and_restarts_no_server(fleet: ServerFleet, trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM to a SLURM job reaches the servers too: the stop is requested and server 0 dies mid-batch. The
    rollouts end at once with RolloutInterrupted, and no restart is started (it would outlast the seconds before
    SIGKILL that the checkpoint needs); before, the engine restarted the server and the batch went on."""
    from opsdc_megatron.models.qwen3.state_dict_adapter import export_hf_state_dict

    stop = threading.Event()
    engine = SGLangRolloutEngine(fleet, TensorTransport(), [EOS], VOCAB, max_concurrent_requests=16, request_timeout_s=120, backoff_s=0.2)
    engine.update_weights(export_hf_state_dict(trainer.student[0]), version=4)
    engine.stop_requested = stop.is_set

    def sigterm() -> None:
        stop.set()
        fleet.servers[0].kill()

    fault_before_request(monkeypatch, fleet.urls[0], request_number=5, fault=sigterm)
    prompts = [[2 + (i % 120), 3 + (i * 7) % 120] for i in range(48)]
    try:
        with pytest.raises(RolloutInterrupted, match=r"a stop was requested with \d+ of 48 prompts unanswered"):
            engine.sample(prompts, SamplingParams(max_new_tokens=48), seed=5)
        assert engine.restarts == 0 and not engine._recoveries and not fleet.servers[0].alive()
    finally:  # a failed test must not leave a server down to the tests after it
        engine.wait_for_recovery()
        if not fleet.servers[0].alive():
            fleet.restart(0)


def test_a_rank_waiting_for_rank_0_to_restart_the_servers_stops_waiting_on_a_stop(tiny_model: Path) -> None:
    """A trainer rank other than 0 whose servers are all gone waits up to owner_restart_wait_s (an hour here)
    for rank 0 to restart them; a stop request (the job's SIGTERM, which took them down) ends the wait."""
    url, _, server = _stub_server(tiny_model)
    engine = SGLangRolloutEngine([url], None, [EOS], VOCAB, owner_restart_wait_s=3600, backoff_s=0.1)
    server.shutdown()
    server.server_close()
    stop, errors = threading.Event(), []
    engine.stop_requested = stop.is_set

    def sample() -> None:
        try:
            engine.sample(PROMPTS, SamplingParams(max_new_tokens=4), 0)
        except Exception as error:
            errors.append(error)

    waiting = threading.Thread(target=sample, daemon=True)  # not a pool: a failed test must not wait out the hour
    waiting.start()
    deadline = time.monotonic() + 60
    while engine._serving():  # until its one server left the pool: the wait has begun
        assert time.monotonic() < deadline, "the server never left the pool"
        time.sleep(0.05)
    stop.set()
    waiting.join(120)
    assert not waiting.is_alive(), "still waiting for rank 0's restart after the stop"
    assert isinstance(errors[0], RolloutInterrupted), errors
    assert "a stop was requested while waiting for trainer rank 0 to restart the servers" in str(errors[0])


def test_hung_server_mid_batch_is_detected_and_replaced(fleet: ServerFleet, trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server 1 is frozen (SIGSTOP: connections stay open, nothing answers) while the batch runs."""
    from opsdc_megatron.models.qwen3.state_dict_adapter import export_hf_state_dict

    engine = SGLangRolloutEngine(fleet, TensorTransport(), [EOS], VOCAB, max_concurrent_requests=16, stall_timeout_s=5, backoff_s=0.2)
    engine.update_weights(export_hf_state_dict(trainer.student[0]), version=5)
    prompts = [[2 + (i % 120), 5 + (i * 11) % 120] for i in range(48)]
    frozen_pid = fleet.servers[1].process.pid
    fault_before_request(monkeypatch, fleet.urls[1], request_number=5, fault=lambda: os.killpg(frozen_pid, signal.SIGSTOP))
    try:
        results = engine.sample(prompts, SamplingParams(max_new_tokens=48), seed=6)
        ids = [r.rollout_id for r in results]
        assert [int(i.split("-p")[1].split("-")[0]) for i in ids] == list(range(len(prompts)))
        assert any(not rid.endswith("-a0") for rid in ids) and all(r.weight_version == "5" for r in results)
    finally:  # a failed test must not leave a frozen server to the tests after it
        try:
            os.killpg(frozen_pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        engine.wait_for_recovery()
    assert engine.restarts == 1 and post_json(f"{fleet.urls[1]}/model_info", None, 10)["weight_version"] == "5"


def test_a_restart_still_running_when_the_trainer_lets_go_of_the_weights_pushes_them_first(
    fleet: ServerFleet, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server 0 is SIGKILLed mid-batch and is still restarting when the batch is done; the trainer then does
    what train/loop.py does before exporting the next step's weights: `release_weights`, then empties the
    dict it pushed. The restart pushes those weights before they go (it read the emptied dict)."""
    state, reference = shifted_weights(tiny_model, seed=13)
    engine = SGLangRolloutEngine(fleet, TensorTransport(), [EOS], VOCAB, max_concurrent_requests=16, backoff_s=0.2)
    engine.update_weights(state, version=13)
    prompts = [[2 + (i % 120), 7 + (i * 5) % 120] for i in range(48)]
    fault_before_request(monkeypatch, fleet.urls[0], request_number=5, fault=fleet.servers[0].kill)
    try:
        engine.sample(prompts, SamplingParams(max_new_tokens=32), seed=8)
        assert any(thread.is_alive() for thread in engine._recoveries.values()), "the test needs the restart to outlast the batch"
        engine.release_weights()
        state.clear()
    finally:  # a failed test must not leave a server down to the tests after it
        engine.wait_for_recovery()
    assert engine.restarts == 1
    assert_logprob_parity(engine, lambda p, r: transformers_logprobs(reference, p, r), 13)


# ---------------------------------------------------------------------------------- bad input


def test_a_response_that_stops_ends_with_its_stop_token(fleet: ServerFleet) -> None:
    """The stop token is trained on like any response token (as in verl), so `output_ids` must carry it: a
    stopped response ends with one of the request's stop tokens, which appears nowhere before it."""
    stop_tokens = tuple(range(1, 33))  # a quarter of the vocabulary: nearly every response stops within a few tokens
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=24)
    results = [generate_one(fleet.urls[0], GenerateRequest(f"stop-{seed}", PROMPTS[0], sampling, stop_tokens, seed=seed), timeout_s=60)
               for seed in range(8)]
    stopped = [r for r in results if r.finish_reason == "stop"]
    assert stopped, [r.output_ids for r in results]
    for result in stopped:
        assert result.output_ids and result.output_ids[-1] in stop_tokens, result
        assert not set(result.output_ids[:-1]) & set(stop_tokens), result
        assert len(result.logprobs) == len(result.output_ids)


def test_vocabulary_mismatch_is_refused(fleet: ServerFleet) -> None:
    with pytest.raises(ValueError, match=rf"vocabulary of {VOCAB} tokens, the trainer's model has 151936"):
        SGLangRolloutEngine(fleet, TensorTransport(), [EOS], vocab_size=151936)
    engine = SGLangRolloutEngine(fleet, TensorTransport(), [EOS], VOCAB)
    with pytest.raises(ValueError, match=r"prompt 1: token ids \[128\] outside the served vocabulary"):
        engine.generate([[1, 2], [128]], SamplingParams(max_new_tokens=2), seed=0)
    # Raised on every trainer rank alike (RolloutEngineError), so that none waits for rank 0's push to end.
    with pytest.raises(RolloutEngineError, match="failed on rank 0: ValueError: weight push: model.embed_tokens.weight has 200 rows"):
        engine.update_weights({"model.embed_tokens.weight": torch.zeros(200, 64)}, version=9)
    with pytest.raises(RolloutEngineError, match="failed on rank 0: ValueError: weight push of version 9: the state dict is empty"):
        engine.update_weights({}, version=9)


def test_server_error_answer_is_raised_with_its_message(fleet: ServerFleet) -> None:
    request = GenerateRequest("bad-1", [1, 2], SamplingParams(top_p=0.0, max_new_tokens=2), (EOS,), seed=0)
    with pytest.raises(ServerRejected, match=r"HTTP 400.*top_p"):
        generate_one(fleet.urls[1], request, timeout_s=30)


def _answering(status: int, body: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    """A server's handler that answers every POST with `status` and `body`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


_Always500 = _answering(500, b"internal error")


class _DiesMidAnswer(http.server.BaseHTTPRequestHandler):
    """Promises 2060 bytes and closes after the headers: a server killed while sending its answer."""

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        self.send_response(200)
        self.send_header("Content-Length", "2060")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_unreachable_failing_dying_and_silent_servers_fail_fast() -> None:
    """Each is a ServerUnavailable, which the engine retries elsewhere (anything else would end the batch)."""
    request = GenerateRequest("x", [1, 2], SamplingParams(max_new_tokens=2), (EOS,), seed=0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(ServerUnavailable, match="Connection refused|ConnectionRefused"):
        generate_one(f"http://127.0.0.1:{closed_port}", request, timeout_s=5)

    for handler, message in ((_Always500, "HTTP 500: internal error"), (_DiesMidAnswer, r"IncompleteRead.*2060 more expected")):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with pytest.raises(ServerUnavailable, match=message):
                generate_one(f"http://127.0.0.1:{server.server_address[1]}", request, timeout_s=5)
        finally:
            server.shutdown()

    with socket.socket() as silent:  # accepts connections, never answers: a hung server
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="timed out|timeout"):
            generate_one(f"http://127.0.0.1:{silent.getsockname()[1]}", request, timeout_s=1.0)
        assert time.monotonic() - started < 10


def _stub_server(model_path: Path) -> tuple[str, dict, http.server.ThreadingHTTPServer]:
    """An SGLang stand-in for the engine's bookkeeping: /health (503 unless state["healthy"]), /model_info, and
    disk pushes, which move its model path to the pushed folder, as SGLang's do. With state["hang"], a /generate
    request hangs the server: it never answers, and /health fails from then on."""
    state = {"model_path": str(model_path), "version": "0", "healthy": True, "model_info_status": 200, "hang": False}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path == "/health":
                self._answer(200 if state["healthy"] else 503, {})
            else:
                self._answer(state["model_info_status"], {"model_path": state["model_path"], "weight_version": state["version"]})

        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            if self.path == "/generate" and state["hang"]:
                state["healthy"] = False
                time.sleep(3600)
            if self.path == "/update_weights_from_disk":
                state.update(model_path=body["model_path"], version=body["weight_version"])
            self._answer(200, {"success": True})

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", state, server


def test_requests_abandoned_on_a_hung_server_do_not_hold_up_the_process_s_exit(tiny_model: Path, tmp_path: Path) -> None:
    """A server outside the trainer (stand-in) hangs mid-batch; the engine abandons its requests and the batch fails.
    Their threads, blocked until request_timeout_s (300 s here), held the process's exit: ThreadPoolExecutor's
    workers are joined at exit. A trainer preempted beside a hung server could outstay its job's time limit."""
    import subprocess
    import sys

    script = f"""
from pathlib import Path
from opsdc_megatron.rollout.engine import SamplingParams
from opsdc_megatron.rollout.sglang.engine import RolloutFailedError, SGLangRolloutEngine
from opsdc_megatron.weight_push.sglang_transports import DiskTransport
from tests.test_sglang import EOS, VOCAB, _stub_server, shifted_weights
model = Path({str(tiny_model)!r})
url, state, server = _stub_server(model)
engine = SGLangRolloutEngine([url], DiskTransport(Path({str(tmp_path / "pushed")!r}), model), [EOS], VOCAB, request_timeout_s=300, stall_timeout_s=1)
engine.update_weights(shifted_weights(model, seed=1)[0], version=1)
state["hang"] = True
try:
    engine.sample([[2, 3], [4, 5]], SamplingParams(max_new_tokens=4), seed=0)
except RolloutFailedError as error:
    print("batch failed:", error, flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0 and "batch failed: no healthy SGLang server left" in proc.stdout, proc.stderr[-3000:]


def test_an_external_server_back_after_a_disk_push_rejoins(tiny_model: Path, tmp_path: Path) -> None:
    """Servers outside the trainer, disk weight push (stand-ins: the engine's bookkeeping only). B misses push 2,
    whose transport then deletes v1, the folder B still names as its model; B answers again at push 3. Its
    vocabulary could not be read there, and the run ended with every server up; it now rejoins and gets v3."""
    (a, _, server_a), (b, b_state, server_b) = _stub_server(tiny_model), _stub_server(tiny_model)
    try:
        engine = SGLangRolloutEngine([a, b], DiskTransport(tmp_path / "pushed", tiny_model), [EOS], VOCAB)
        weights = shifted_weights(tiny_model, seed=6)[0]
        engine.update_weights(weights, version=1)
        b_state["healthy"] = False
        engine.update_weights(weights, version=2)
        assert b_state["version"] == "1" and not Path(b_state["model_path"]).exists()
        b_state["healthy"] = True
        engine.update_weights(weights, version=3)
        assert b_state["version"] == "3"
        b_state["healthy"] = False
        engine.update_weights(weights, version=4)
        b_state.update(healthy=True, model_info_status=503)  # back, but not yet answering everything: stays out, the run goes on
        engine.update_weights(weights, version=5)
        assert b_state["version"] == "3"
        b_state["model_info_status"] = 200
        engine.update_weights(weights, version=6)
        assert b_state["version"] == "6"
    finally:
        server_a.shutdown()
        server_b.shutdown()


def test_a_trainer_resumed_beside_external_servers_that_name_a_removed_push_folder_starts(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Servers outside the trainer (stand-ins) outlive it; after a disk push they name its folder, which the next
    trainer no longer has (the transport keeps the last push only, a run folder gone or moved). The next
    trainer's engines refused to start ("config.json cannot be read here") on every rank; now the push's rank
    names the server and pushes, and the other ranks follow."""
    (url, state, server) = _stub_server(tmp_path / "pushed" / "v7")  # the removed folder of an earlier trainer's push 7
    try:
        SGLangRolloutEngine([url], None, [EOS], VOCAB)  # a rank that only sends rollouts
        engine = SGLangRolloutEngine([url], DiskTransport(tmp_path / "pushed", tiny_model), [EOS], VOCAB)
        assert f"{url} serves {tmp_path / 'pushed' / 'v7'}, whose config.json cannot be read here" in capsys.readouterr().err
        engine.update_weights(shifted_weights(tiny_model, seed=6)[0], version=8)
        assert state["version"] == "8" and (Path(state["model_path"]) / "config.json").is_file()
    finally:
        server.shutdown()


# SGLang's refusal of /init_weights_update_group: a 400 before it joins the group (a backend it cannot
# make, an address it cannot reach).
_RefusesGroups = _answering(400, b'{"success": false, "message": "Failed to initialize custom process group: no route to trainer."}')


def test_a_refused_weight_update_group_is_reported_at_once_with_the_servers_reason() -> None:
    """The join waited the whole timeout (600 s in a run) for a server that had already refused, then
    raised the store's timeout, without the URL or the server's message."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusesGroups)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, raised = f"http://127.0.0.1:{server.server_address[1]}", []

    def connect() -> None:
        try:
            DistributedTransport(timeout_s=600).connect(url, 1)
        except Exception as error:
            raised.append(error)

    try:
        attempt = threading.Thread(target=connect, daemon=True)
        attempt.start()
        attempt.join(120)
        assert not attempt.is_alive(), "connect still waits for a server that refused"
    finally:
        server.shutdown()
    assert len(raised) == 1 and isinstance(raised[0], WeightPushError), raised
    assert url in str(raised[0]) and "no route to trainer" in str(raised[0])


class _Answers200(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"ok": true}')

    def log_message(self, *args: object) -> None:
        pass


def test_requests_and_server_processes_go_around_the_environment_proxy_and_leave_torchrun_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh interpreter with http_proxy set (urllib's default opener would send the request there)."""
    import subprocess
    import sys

    from opsdc_megatron.rollout.sglang.launcher import server_process_env

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers200)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/health"
        probe = f"from opsdc_megatron.rollout.sglang.client import post_json; print(post_json({url!r}, None, 10))"
        answered = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **DEAD_PROXY}, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert answered.returncode == 0 and "'ok': True" in answered.stdout, answered.stderr[-2000:]

    monkeypatch.setenv("no_proxy", "corp.example")
    monkeypatch.setenv("NO_PROXY", "corp.example,10.0.0.0/8")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # what torchrun gives the trainer's processes
    monkeypatch.setenv("MASTER_PORT", "29500")
    env = server_process_env(["node7", "", "localhost"])
    assert env["no_proxy"] == env["NO_PROXY"] == "corp.example,10.0.0.0/8,127.0.0.1,localhost,node7"
    assert "TORCHELASTIC_USE_AGENT_STORE" not in env and "MASTER_PORT" not in env and env["PATH"] == os.environ["PATH"]


def test_a_port_in_use_is_refused_before_any_server_starts(tiny_model: Path) -> None:
    """Another run's server there would answer the readiness probe, and take this run's rollouts and weights."""
    from opsdc_megatron.rollout.sglang.launcher import ServerStartError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fleet = ServerFleet(cpu_settings(str(tiny_model), base_port=port), 1)
        with pytest.raises(ServerStartError, match=f"port {port} is already in use"):
            fleet.start()
        assert not fleet.servers[0].alive()


def _live_processes_in_group(group: int) -> list[int]:
    """Processes of a process group that are not zombies (an orphan's zombie waits for whoever reaps it)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def test_servers_stop_when_the_process_that_started_them_dies(tmp_path: Path) -> None:
    """A trainer ended by SIGKILL (the OOM killer, torchrun ending a hung rank) runs no cleanup, and its servers
    are in sessions of their own: they kept their GPUs' memory and ports, and the next run could not start. Now
    the orphan guard stops the whole group. A stand-in server that forks a worker, as SGLang's does, one that
    ignores SIGTERM: as stop() does, the guard ends with SIGKILL what a SIGTERM left."""
    import subprocess
    import sys
    import textwrap

    starter = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from opsdc_megatron.rollout.sglang.launcher import ManagedProcess
        worker = "import os, signal, time\\nif os.fork() == 0:\\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\\ntime.sleep(600)"
        server = [sys.executable, "-c", worker]
        process = ManagedProcess("stand-in", server, dict(os.environ), Path({str(tmp_path / 'server.log')!r}), "http://127.0.0.1:1/")
        process.start()
        print(process.process.pid, flush=True)
        time.sleep(600)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    try:
        group = int(trainer.stdout.readline())
        deadline = time.monotonic() + 60
        while len(_live_processes_in_group(group)) < 3 and time.monotonic() < deadline:  # guard, server, its worker
            time.sleep(0.1)
        assert len(_live_processes_in_group(group)) == 3, (tmp_path / "server.log").read_text()
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 30
    while _live_processes_in_group(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _live_processes_in_group(group), "the servers outlived the process that started them"


def test_a_stopped_server_has_released_its_port_when_stop_returns(tmp_path: Path) -> None:
    """A server killed mid-batch is restarted on its port; its processes close their sockets only as the kernel tears
    them down, after the signal, and the restart's probe found the port still taken: "port ... is already in use"
    failed the rollout (seen once in CI). A stand-in whose listening process outlives the group's SIGKILL by 2 s."""
    import sys

    from opsdc_megatron.rollout.sglang.launcher import ManagedProcess
    from tests.launch import free_port

    port = free_port()
    holder = (
        "import os, socket, time\n"
        "parent = os.getpid()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # out of the group: it listens on for 2 s after its parent is killed
        f"    listener = socket.create_server(('127.0.0.1', {port}))\n"
        "    started = time.monotonic()\n"
        "    while os.getppid() == parent and time.monotonic() - started < 600: time.sleep(0.05)\n"
        "    time.sleep(2)\n"
        "    os._exit(0)\n"
        "time.sleep(600)\n"
    )
    process = ManagedProcess("stand-in", [sys.executable, "-c", holder], dict(os.environ), tmp_path / "server.log", f"http://127.0.0.1:{port}/")
    def taken() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    process.start()
    deadline = time.monotonic() + 30
    while not taken() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert taken(), (tmp_path / "server.log").read_text()
    process.stop()
    assert not taken(), "stop() returned with the port still taken: a restart would be refused"
    process.refuse_taken_port()  # what the restart's start() does first


def test_fleet_refuses_missing_model_or_interpreter(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ServerFleet(cpu_settings(str(tmp_path)), 1)
    with pytest.raises(FileNotFoundError, match="run tools/setup_sglang.sh"):
        ServerFleet(cpu_settings(str(tiny_model), python=str(tmp_path / "nope" / "python")), 1)


def test_config_selects_and_checks_the_sglang_engine(tiny_model: Path, tmp_path: Path) -> None:
    from opsdc_megatron.config import ConfigError, load_config
    from opsdc_megatron.rollout.sglang.start import server_settings

    base = [f"out_dir={tmp_path}", f"model.hf_path={tiny_model}", "data.train_prompts=x.jsonl", "rollout.engine=sglang"]
    config = load_config(None, [*base, "model.params_dtype=fp32", "rollout.sglang.num_servers=2", "rollout.sglang.weight_transport=disk"])
    settings = server_settings(config)
    assert (settings.dtype, settings.model_path, config.rollout.sglang.num_servers) == ("float32", str(tiny_model.resolve()), 2)
    with pytest.raises(ConfigError, match="rollout.sglang.weight_transport must be tensor, distributed or disk, got 'nccl'"):
        load_config(None, [*base, "rollout.sglang.weight_transport=nccl"])
    with pytest.raises(ConfigError, match="rollout.engine must be hf or sglang, got 'vllm'"):
        load_config(None, [*base[:-1], "rollout.engine=vllm"])


def test_servers_the_trainer_starts_get_reachable_hosts_and_must_leave_it_gpu_memory(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import opsdc_megatron.rollout.sglang.start as start
    from opsdc_megatron.config import ConfigError, load_config
    from opsdc_megatron.launch.plan import check_sglang_servers_to_start

    config = load_config(None, [f"out_dir={tmp_path}", f"model.hf_path={tiny_model}", "data.train_prompts=x.jsonl", "rollout.engine=sglang"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU servers first, also on a machine with GPUs
    one_node = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}
    assert start.trainer_fleet_settings(config, one_node).host == start.trainer_fleet_settings(config, {}).host == "127.0.0.1"

    monkeypatch.setattr(start.socket, "gethostname", lambda: "node7")
    monkeypatch.setattr(start.socket, "gethostbyname", lambda name: {"node7": "10.1.2.7"}[name])
    two_nodes = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    assert start.trainer_fleet_settings(config, two_nodes).host == "10.1.2.7"
    monkeypatch.setattr(start.socket, "gethostbyname", lambda name: "127.0.1.1")  # Debian's /etc/hosts entry
    with pytest.raises(ConfigError, match="'node7' resolves to loopback .127.0.1.1.: the other nodes could not reach"):
        start.trainer_fleet_settings(config, two_nodes)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # servers on the trainer's own GPUs
    with pytest.raises(ConfigError, match="rollout.sglang.mem_fraction_static is required when the trainer starts"):
        start.trainer_fleet_settings(config, one_node)
    with pytest.raises(ConfigError, match="rollout.sglang.mem_fraction_static is required"):  # opsdc train, before torchrun
        check_sglang_servers_to_start(config)
    config.rollout.sglang.mem_fraction_static = 0.3
    assert start.trainer_fleet_settings(config, one_node).mem_fraction_static == 0.3
    config.rollout.sglang.weight_transport = "distributed"
    with pytest.raises(ConfigError, match="server 0 would be two ranks of one NCCL group on GPU 0"):
        start.trainer_fleet_settings(config, one_node)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # gloo on CPU takes any layout
    assert start.trainer_fleet_settings(config, one_node).on_cpu


def test_opsdc_train_starts_pushes_to_and_stops_its_own_server(tmp_path: Path, behind_dead_proxy: None) -> None:
    """`opsdc train` at TP=2 with rollout.engine=sglang and no server_urls: trainer rank 0 starts the
    server, both ranks sample from it, each step's weights are pushed (the engine refuses a rollout of
    any other version), and the server is gone when the run ends."""
    import subprocess
    import sys

    from opsdc_megatron.toy.task import TOY_INSTRUCTION
    from opsdc_megatron.train.metrics import read_metrics
    from tests.tiny_models import save_toy_qwen3

    root, out, port = save_toy_qwen3(tmp_path), tmp_path / "run", free_port_pair()
    overrides = [
        f"out_dir={out}", f"model.hf_path={root / 'model'}", f"data.train_prompts={root / 'train.jsonl'}", f"distill.instruction={TOY_INSTRUCTION}",
        "rollout.engine=sglang", f"rollout.sglang.base_port={port}", "rollout.sglang.startup_timeout_s=900", "model.params_dtype=fp32",
        "rollout.max_response_tokens=24", "rollout.generation_batch_prompts=4", "train.global_batch_prompts=8", "train.micro_batch_prompts=2",
        "train.steps=2", "eval.every_steps=0", "parallel.tensor_parallel_size=2",
    ]
    run = subprocess.run([sys.executable, "-m", "opsdc_megatron.cli", "train", "recipes/toy_cpu.yaml", *overrides],
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    steps = {m["step"]: m for m in read_metrics(out / "metrics.jsonl") if m["kind"] == "train"}
    assert sorted(steps) == [1, 2] and all(m["mean_response_tokens"] > 0 and m["loss"] > 0 for m in steps.values())
    server_log = (out / "sglang_logs" / "server_0.log").read_text()
    assert server_log.count("/update_weights_from_tensor") >= 2 and "--device cpu" in server_log
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the server outlived the run"
