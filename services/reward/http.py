"""The RewardService's HTTP port: the JSON protocols other RL frameworks already speak, on the
same path as gRPC (`ScoreDispatcher.score`: batcher, queue bounds, tokens, metrics).

- `POST /get_reward` (or `/{model}/get_reward`): OpenRLHF's remote reward server.
  `{"query": [...], "prompts": [...], "labels": [...]}`; a query is the full text as the policy
  saw it, tokenized without adding special tokens; labels are the references.
  -> `{"rewards": [...], "scores": [...], "extra_logs": {component: [...]}}`.
- `POST /classify`: vLLM's pooling API as veRL's reward loop calls it. `{"model", "input"}` with
  input a text, texts, token ids or lists of them, `use_activation` (default true: sigmoid, as
  vLLM does; false: the raw score) -> `{"data": [{"index", "label", "probs": [score], ...}]}`.
- `POST /pooling`: the same inputs -> `{"data": [{"index", "object": "pooling", "data": [score]}]}`.
- `POST /v1/score` (or `/{model}/v1/score`): `ScoreRequest` in protobuf's JSON mapping ->
  `ScoreResponse`.
A model (or function, or composite) is named by the URL path or the body's `model`; none is the
default. Errors: 400 naming the field, 401 / 403 for tokens, 404 unknown model, 429 overload.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format

from rlhf_mesh.http_site import ssl_context, start_site
from rlhf_mesh.security import TokenAuth
from rlhf_mesh.services.reward.dispatch import REQUESTS, ScoreDispatcher
from rlhf_mesh.services.reward.reward_model import InvalidSample
from rlhf_mesh.services.reward.scorers import ScoringError
from rlhf_mesh.services.reward.settings import RewardSettings
from rlhf_mesh.v1 import common_pb2, reward_pb2

SCORE_METHOD = "/rlhf_mesh.v1.RewardService/Score"  # the role HTTP calls need: score
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class BadRequest(Exception):
    """A body that does not fit the endpoint: HTTP 400 with the message."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


def _strings(body: dict, field: str, count: int | None = None, *, required: bool = False) -> list[str] | None:
    value = body.get(field)
    if value is None:
        if required:
            raise BadRequest(f"{field}: required, a list of strings")
        return None
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                              for v in value):
        raise BadRequest(f"{field}: must be a list of strings")
    if count is not None and len(value) != count:
        raise BadRequest(f"{field}: {len(value)} items for {count} queries")
    return [str(v) for v in value]


def _pooling_inputs(body: dict) -> list[reward_pb2.ScoreSample]:
    """vLLM's `input`: a text, a list of texts, token ids, or a list of token-id lists."""
    value = body.get("input")
    add_special = body.get("add_special_tokens", True)
    if not isinstance(add_special, bool):
        raise BadRequest("add_special_tokens: must be true or false")
    items = value if isinstance(value, list) and value and not _is_ids(value) else [value]
    samples = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            samples.append(reward_pb2.ScoreSample(
                query=reward_pb2.QueryText(text=item, add_special_tokens=add_special)))
        elif isinstance(item, list) and item and _is_ids(item):
            samples.append(reward_pb2.ScoreSample(token_ids=common_pb2.TokenIds(ids=item)))
        else:
            where = "input" if len(items) == 1 else f"input[{i}]"
            raise BadRequest(f"{where}: a text, a list of texts, token ids or a list of token-id lists")
    return samples


def _is_ids(value: list) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


class RewardHttp:
    """The HTTP front door of one RewardService."""

    def __init__(self, dispatcher: ScoreDispatcher, settings: RewardSettings) -> None:
        self.dispatcher = dispatcher
        self.settings = settings
        self.auth = TokenAuth(settings.tokens_file) if settings.tokens_file else None
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        application = web.Application(client_max_size=self.settings.max_message_bytes)
        routes = [("/get_reward", self.get_reward), ("/classify", self.classify), ("/pooling", self.pooling),
                  ("/v1/score", self.v1_score)]
        for path, handler in routes:
            application.router.add_post(path, handler)
            if path in ("/get_reward", "/v1/score"):
                application.router.add_post("/{model}" + path, handler)
        return application

    async def start(self, host: str, port: int) -> int:
        s = self.settings
        self.runner, bound = await start_site(self.app(), host, port,
                                              ssl_context=ssl_context(s.tls_cert, s.tls_key, s.tls_client_ca))
        return bound

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request, name: str | None, build, reply) -> web.Response:
        """Token, body, scoring and errors, the same for every endpoint."""
        if self.auth is not None:
            refused = self.auth.check(SCORE_METHOD, [("authorization", request.headers.get("Authorization", ""))])
            if refused is not None:
                return _error(_STATUS[refused[0]], refused[1])
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        name = name if name is not None else body.get("model") or ""
        if not isinstance(name, str):
            return _error(400, "model: must be a string")
        try:
            samples = build(body)
        except BadRequest as err:
            REQUESTS.labels(self.dispatcher.registry.label(name), "invalid").inc()
            return _error(400, str(err))
        try:
            scorer, results = await self.dispatcher.score_request(name, samples)
        except InvalidSample as err:
            return _error(400, str(err))
        except ScoringError as err:
            return _error(_STATUS.get(err.code, 500), str(err))
        return web.json_response(reply(body, scorer, results))

    async def get_reward(self, request: web.Request) -> web.Response:
        def build(body: dict) -> list[reward_pb2.ScoreSample]:
            queries = _strings(body, "query", required=True)
            prompts = _strings(body, "prompts", len(queries)) or [""] * len(queries)
            labels = _strings(body, "labels", len(queries)) or [""] * len(queries)
            return [reward_pb2.ScoreSample(query=reward_pb2.QueryText(text=q, prompt=p), reference=r)
                    for q, p, r in zip(queries, prompts, labels, strict=True)]

        def reply(body: dict, scorer: str, results: list[reward_pb2.ScoreResult]) -> dict:
            rewards = [r.score for r in results]
            logs: dict[str, list[float]] = {}
            for result in results:
                for component in result.components:
                    logs.setdefault(component.name, []).append(component.score)
            return {"rewards": rewards, "scores": rewards, "extra_logs": logs}

        return await self._handle(request, request.match_info.get("model"), build, reply)

    async def classify(self, request: web.Request) -> web.Response:
        def reply(body: dict, scorer: str, results: list[reward_pb2.ScoreResult]) -> dict:
            sigmoid = body.get("use_activation") is not False
            probs = [1 / (1 + math.exp(-r.score)) if sigmoid else r.score for r in results]
            data = [{"index": i, "label": None, "probs": [p], "num_classes": 1} for i, p in enumerate(probs)]
            return self._list("classify", scorer, data, results)

        return await self._handle(request, None, self._checked_pooling_inputs, reply)

    async def pooling(self, request: web.Request) -> web.Response:
        def reply(body: dict, scorer: str, results: list[reward_pb2.ScoreResult]) -> dict:
            data = [{"index": i, "object": "pooling", "data": [r.score]} for i, r in enumerate(results)]
            return self._list("pool", scorer, data, results)

        return await self._handle(request, None, self._checked_pooling_inputs, reply)

    @staticmethod
    def _checked_pooling_inputs(body: dict) -> list[reward_pb2.ScoreSample]:
        activation = body.get("use_activation")
        if activation is not None and not isinstance(activation, bool):
            raise BadRequest("use_activation: must be true, false or null")
        return _pooling_inputs(body)

    @staticmethod
    def _list(kind: str, scorer: str, data: list[dict], results: list[reward_pb2.ScoreResult]) -> dict[str, Any]:
        tokens = sum(r.num_tokens for r in results)
        return {"id": f"{kind}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": scorer,
                "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

    async def v1_score(self, request: web.Request) -> web.Response:
        parsed = reward_pb2.ScoreRequest()

        def build(body: dict) -> list[reward_pb2.ScoreSample]:
            try:
                json_format.ParseDict(body, parsed)
            except json_format.ParseError as err:
                raise BadRequest(str(err)) from None
            return list(parsed.samples)

        def reply(body: dict, scorer: str, results: list[reward_pb2.ScoreResult]) -> dict:
            return json_format.MessageToDict(reward_pb2.ScoreResponse(results=results, model=scorer))

        return await self._handle(request, request.match_info.get("model"), build, reply)
