"""HTTP client of SGLang's native API: `/generate` on token ids, and the small JSON calls around it.

Every wait has a timeout. Failures are classified so the engine can act on them:
`ServerUnavailable` (connection refused or reset, timeout, HTTP 5xx: the server may be dead or hung,
retry elsewhere) and `ServerRejected` (HTTP 4xx: the request itself is wrong, retrying cannot help).
Only the standard library is used, so the trainer's environment needs no HTTP package.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass

from opsdc_megatron.rollout.engine import SamplingParams


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Servers are always reached directly. urllib's default opener routes every request through the
http_proxy of the environment (clusters often set one for internet access), which cannot reach a
node's server port; NO_PROXY would have to list every node."""


def open_direct(request: urllib.request.Request | str, timeout_s: float):
    """`urlopen` without the environment's proxies."""
    return _DIRECT.open(request, timeout=timeout_s)


class ServerUnavailable(ConnectionError):
    """The server did not answer in time, refused the connection or answered 5xx."""


class ServerRejected(ValueError):
    """The server answered 4xx: the request (or the served model) does not fit."""


def free_port(address: str) -> int:
    """A port free on `address`'s family (IPv6 when it is an IPv6 literal)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind(("::" if family == socket.AF_INET6 else "", 0))
        return sock.getsockname()[1]


def post_json(url: str, payload: dict | None, timeout_s: float) -> dict:
    """POST a JSON body (GET when `payload` is None) and decode the JSON answer."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="GET" if payload is None else "POST")
    try:
        with open_direct(request, timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:2000]
        kind = ServerRejected if 400 <= error.code < 500 else ServerUnavailable
        raise kind(f"{url}: HTTP {error.code}: {detail}") from None
    # http.client.HTTPException: the answer broke off (IncompleteRead: the server died while sending it).
    except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise ServerUnavailable(f"{url}: {type(reason).__name__}: {reason}") from None
    if not body:
        return {}
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return {"text": body.decode(errors="replace")}


@dataclass(frozen=True)
class GenerateRequest:
    rollout_id: str
    """Unique per rollout (SGLang's `rid`): lets a resend be told apart and an abort target it."""
    input_ids: list[int]
    sampling: SamplingParams
    stop_token_ids: tuple[int, ...]
    seed: int
    return_logprob: bool = True


@dataclass(frozen=True)
class GenerateResult:
    rollout_id: str
    output_ids: list[int]
    """Sampled tokens; the stop token is included when finish_reason is 'stop'."""
    logprobs: list[float] | None
    """log p(token) of each sampled token under the served weights (temperature-1 distribution)."""
    finish_reason: str
    """'stop' or 'length' (an aborted request raises instead)."""
    weight_version: str
    weight_versions_in_response: tuple[str, ...]
    """Every weight version that produced part of the response: more than one means a push happened mid-request."""
    server_url: str


def generate_payload(request: GenerateRequest) -> dict:
    s = request.sampling
    return {
        "rid": request.rollout_id,
        "input_ids": request.input_ids,
        "sampling_params": {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k if s.top_k > 0 else -1,
            "max_new_tokens": s.max_new_tokens,
            "stop_token_ids": list(request.stop_token_ids),
            "sampling_seed": request.seed,
        },
        "return_logprob": request.return_logprob,
    }


CONTEXT_END_TOKENS = 2
"""How far short of max_new_tokens SGLang 0.5.23 ends a response that reaches the model's context: it admits
prompt + max_new_tokens <= context length, then caps generation at context length - 2 - prompt."""


def parse_generate_response(request: GenerateRequest, answer: dict, server_url: str) -> GenerateResult:
    meta = answer.get("meta_info") or {}
    reason = (meta.get("finish_reason") or {}).get("type")
    if reason == "abort":
        raise ServerUnavailable(f"{server_url}: request {request.rollout_id} was aborted: {meta.get('finish_reason')}")
    if reason not in ("stop", "length"):
        raise ServerRejected(f"{server_url}: request {request.rollout_id}: unexpected finish_reason {meta.get('finish_reason')!r}")
    output_ids = list(answer["output_ids"])
    if reason == "length" and len(output_ids) < request.sampling.max_new_tokens - CONTEXT_END_TOKENS:
        # SGLang lowers max_new_tokens to what its KV cache and context leave, with only a warning in its log at start.
        raise ServerRejected(
            f"{server_url}: request {request.rollout_id}: the server ended the response at {len(output_ids)} tokens "
            f"(finish_reason 'length'), short of max_new_tokens = {request.sampling.max_new_tokens} after a "
            f"{len(request.input_ids)}-token prompt: its KV cache (or the model's context length) is smaller than prompt + "
            f"response; raise rollout.sglang.max_total_tokens (or mem_fraction_static), or lower the response budget "
            f"(rollout.max_response_tokens, eval.max_response_tokens, opsdc eval --max-tokens)"
        )
    logprobs = None
    if request.return_logprob:
        pairs = meta["output_token_logprobs"]
        if [token for _, token, *_ in pairs] != output_ids:
            raise ServerRejected(f"{server_url}: request {request.rollout_id}: logprob tokens differ from output_ids")
        logprobs = [float(value) for value, *_ in pairs]
    version = str(meta.get("weight_version"))
    spans = meta.get("weight_versions") or []
    versions = tuple(dict.fromkeys(str(span["version"]) for span in spans)) or (version,)
    return GenerateResult(request.rollout_id, output_ids, logprobs, reason, version, versions, server_url)


def generate_one(server_url: str, request: GenerateRequest, timeout_s: float) -> GenerateResult:
    """One `/generate` call; raises ServerUnavailable or ServerRejected."""
    return parse_generate_response(request, post_json(f"{server_url}/generate", generate_payload(request), timeout_s), server_url)
