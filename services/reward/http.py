"""The RewardService's HTTP port: the JSON protocols other RL frameworks already speak, on the
same path as gRPC (`ScoreDispatcher.score_request`: batcher, queue bounds, tokens, metrics).

- `POST /get_reward` (or `/{model}/get_reward`): OpenRLHF's remote reward server.
  `{"query": [...], "prompts": [...], "labels": [...]}`; a query is the full text as the policy
  saw it, tokenized without adding special tokens; labels are the references.
  -> `{"rewards": [...], "scores": [...], "extra_logs": {component: [...]}}`.
- `POST /classify`: vLLM's pooling API as veRL's reward loop calls it. `{"model", "input"}` with
  input a text, texts, token ids or lists of them, `use_activation` (default true: sigmoid, as
  vLLM does; false: the raw score) -> `{"data": [{"index", "label", "probs": [score], ...}]}`.
- `POST /pooling`: the same inputs -> `{"data": [{"index", "object": "pooling", "data": [score]}]}`.
- `POST /v1/score` (or `/{model}/v1/score`): `ScoreRequest` in protobuf's JSON mapping ->
  `ScoreResponse`, every field printed.
A model (or function, or composite) is named by the URL path or the body's `model`; none is the
default. A score a function did not give (it returned None: `skipped`) is `null`, never a number.

Admission before work: the token is checked before the body is read; the body must be
`application/json` in UTF-8 (else 415 / 400); it is read in chunks and refused with 413 as soon
as it passes max_message_bytes, inflated bytes counted for a compressed one; it is parsed and
turned into protos in a thread, so a large body does not hold the event loop (gRPC health
included). A client that goes away cancels its request and its queued samples. Errors are
vLLM's shape (rlhf_mesh/http_site.py): 400 naming the field, 401 / 403 for tokens, 404 unknown
model, 408 slow body, 413, 415, 429 overload with Retry-After, 504 a function's timeout; every
refusal is counted in rlhf_mesh_reward_requests_total.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format

from rlhf_mesh.http_site import Refused, caller, error_reply, parse_json, read_body, ssl_context, start_site
from rlhf_mesh.security import TokenAuth
from rlhf_mesh.services.reward.dispatch import REQUESTS, ScoreDispatcher
from rlhf_mesh.services.reward.reward_model import InvalidSample
from rlhf_mesh.services.reward.scorers import ScoringError
from rlhf_mesh.services.reward.settings import RewardSettings
from rlhf_mesh.v1 import common_pb2, reward_pb2

SCORE_METHOD = "/rlhf_mesh.v1.RewardService/Score"  # the role HTTP calls need: score
DEFAULT_RETRY_AFTER_S = 1  # a 429 whose cause gave no estimate
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_OUTCOMES = {401: "unauthenticated", 403: "permission_denied"}  # else "invalid", as gRPC counts them
MAX_TOKEN_ID = 2**32 - 1


def _bad(message: str) -> Refused:
    return Refused(400, message)


def _text(value: str, where: str) -> str:
    """`value`, if protobuf can carry it (JSON's \\ud800 makes a lone surrogate, which UTF-8 cannot)."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise _bad(f"{where}: not valid Unicode (a lone surrogate)") from None
    return value


def _count(value: list, field: str, limit: int) -> None:
    if len(value) > limit:  # refused before a proto is built for any of them
        raise _bad(f"{field}: {len(value)} samples, more than max_request_samples={limit}")


def _strings(body: dict, field: str, limit: int, count: int | None = None, *, required: bool = False
             ) -> list[str] | None:
    value = body.get(field)
    if value is None:
        if required:
            raise _bad(f"{field}: required, a list of strings")
        return None
    if not isinstance(value, list):
        raise _bad(f"{field}: must be a list of strings")
    _count(value, field, limit)
    if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        raise _bad(f"{field}: must be a list of strings")
    if count is not None and len(value) != count:
        raise _bad(f"{field}: {len(value)} items for {count} queries")
    return [_text(str(v), f"{field}[{i}]") for i, v in enumerate(value)]


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(type(v) is int for v in value)


def _ids(value: list[int], where: str) -> common_pb2.TokenIds:
    if min(value) < 0 or max(value) > MAX_TOKEN_ID:
        raise _bad(f"{where}: token ids run from 0 to {MAX_TOKEN_ID}")
    return common_pb2.TokenIds(ids=value)


def _sigmoid(x: float) -> float:
    """vLLM's activation of one logit, for every float (exp(-x) overflows below -709)."""
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    z = math.exp(x)
    return z / (1 + z)


def _score(result: reward_pb2.ScoreResult | reward_pb2.ComponentScore) -> float | None:
    return None if result.skipped else result.score


class RewardHttp:
    """The HTTP front door of one RewardService."""

    def __init__(self, dispatcher: ScoreDispatcher, settings: RewardSettings) -> None:
        self.dispatcher = dispatcher
        self.settings = settings
        self.auth = TokenAuth(settings.tokens_file) if settings.tokens_file else None
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        application = web.Application()  # the body's size is bounded by read_body
        routes = [("/get_reward", self.get_reward), ("/classify", self.classify), ("/pooling", self.pooling),
                  ("/v1/score", self.v1_score)]
        for path, handler in routes:
            application.router.add_post(path, handler)
            if path in ("/get_reward", "/v1/score"):
                application.router.add_post("/{model}" + path, handler)
        return application

    async def start(self, host: str, port: int) -> int:
        s = self.settings
        self.runner, bound = await start_site(self.app(), host, port, ssl_context(s.tls_cert, s.tls_key,
                                                                                  s.tls_client_ca),
                                              settings=s, cancel_on_disconnect=True)
        return bound

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request, build: Callable[[dict], list[reward_pb2.ScoreSample]],
                      reply: Callable[[dict, str, list[reward_pb2.ScoreResult]], dict]) -> web.Response:
        """Token, body, scoring and errors, the same for every endpoint."""
        name = request.match_info.get("model")
        try:
            who = caller(request, self.auth, SCORE_METHOD)
            raw = await read_body(request, self.settings.max_message_bytes)
            body, name, samples = await asyncio.to_thread(self._parse, raw, name, build)
        except Refused as err:
            REQUESTS.labels(self.dispatcher.registry.label(name or ""), _OUTCOMES.get(err.status, "invalid")).inc()
            return error_reply(err.status, str(err))
        try:
            scorer, results = await self.dispatcher.score_request(name, samples, caller=who)
        except InvalidSample as err:
            return error_reply(400, str(err))
        except ScoringError as err:
            response = error_reply(_STATUS.get(err.code, 500), str(err))
            if response.status == 429:  # whole seconds, at least 1 (RFC 9110)
                response.headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s or DEFAULT_RETRY_AFTER_S)))
            return response
        return web.json_response(reply(body, scorer, results))

    @staticmethod
    def _parse(raw: bytes, name: str | None, build: Callable[[dict], list[reward_pb2.ScoreSample]]
               ) -> tuple[dict, str, list[reward_pb2.ScoreSample]]:
        """The body as a JSON object, the scorer's name (the path's, else the body's `model`) and
        the samples `build` makes of it."""
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _bad("model: must be a string")
        return body, name if name is not None else model or "", build(body)

    async def get_reward(self, request: web.Request) -> web.Response:
        limit = self.settings.max_request_samples

        def build(body: dict) -> list[reward_pb2.ScoreSample]:
            queries = _strings(body, "query", limit, required=True)
            prompts = _strings(body, "prompts", limit, len(queries)) or [""] * len(queries)
            labels = _strings(body, "labels", limit, len(queries)) or [""] * len(queries)
            return [reward_pb2.ScoreSample(query=reward_pb2.QueryText(text=q, prompt=p), reference=r)
                    for q, p, r in zip(queries, prompts, labels, strict=True)]

        def reply(body: dict, scorer: str, results: list[reward_pb2.ScoreResult]) -> dict:
            rewards = [_score(r) for r in results]
            logs: dict[str, list[float | None]] = {}
            for result in results:
                for component in result.components:
                    logs.setdefault(component.name, []).append(_score(component))
            return {"rewards": rewards, "scores": rewards, "extra_logs": logs}

        return await self._handle(request, build, reply)

    async def classify(self, request: web.Request) -> web.Response:
        def reply(body: dict, scorer: str, results: list[reward_pb2.ScoreResult]) -> dict:
            sigmoid = body.get("use_activation") is not False
            probs = [None if r.skipped else _sigmoid(r.score) if sigmoid else r.score for r in results]
            data = [{"index": i, "label": None, "probs": [p], "num_classes": 1} for i, p in enumerate(probs)]
            return self._list("classify", scorer, data, results)

        return await self._handle(request, self._pooling_inputs, reply)

    async def pooling(self, request: web.Request) -> web.Response:
        def reply(body: dict, scorer: str, results: list[reward_pb2.ScoreResult]) -> dict:
            data = [{"index": i, "object": "pooling", "data": [_score(r)]} for i, r in enumerate(results)]
            return self._list("pool", scorer, data, results)

        return await self._handle(request, self._pooling_inputs, reply)

    def _pooling_inputs(self, body: dict) -> list[reward_pb2.ScoreSample]:
        """vLLM's `input`: a text, a list of texts, token ids, or a list of token-id lists."""
        activation = body.get("use_activation")
        if activation is not None and not isinstance(activation, bool):
            raise _bad("use_activation: must be true, false or null")
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise _bad("add_special_tokens: must be true or false")
        value = body.get("input")
        items = value if isinstance(value, list) and value and not _is_ids(value) else [value]
        _count(items, "input", self.settings.max_request_samples)
        samples = []
        for i, item in enumerate(items):
            where = "input" if items is not value else f"input[{i}]"
            if isinstance(item, str):
                samples.append(reward_pb2.ScoreSample(
                    query=reward_pb2.QueryText(text=_text(item, where), add_special_tokens=add_special)))
            elif _is_ids(item):
                samples.append(reward_pb2.ScoreSample(token_ids=_ids(item, where)))
            else:
                raise _bad(f"{where}: a text, a list of texts, token ids or a list of token-id lists")
        return samples

    @staticmethod
    def _list(kind: str, scorer: str, data: list[dict], results: list[reward_pb2.ScoreResult]) -> dict[str, Any]:
        tokens = sum(r.num_tokens for r in results)
        return {"id": f"{kind}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": scorer,
                "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

    async def v1_score(self, request: web.Request) -> web.Response:
        def build(body: dict) -> list[reward_pb2.ScoreSample]:
            if isinstance(body.get("samples"), list):
                _count(body["samples"], "samples", self.settings.max_request_samples)
            parsed = reward_pb2.ScoreRequest()
            try:
                json_format.ParseDict(body, parsed)
            except json_format.ParseError as err:
                raise _bad(str(err)) from None
            return list(parsed.samples)

        def reply(body: dict, scorer: str, results: list[reward_pb2.ScoreResult]) -> dict:
            return json_format.MessageToDict(reward_pb2.ScoreResponse(results=results, model=scorer),
                                             always_print_fields_with_no_presence=True)

        return await self._handle(request, build, reply)
