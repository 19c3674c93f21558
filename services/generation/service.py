"""The GenerationService servicer and its place on the shared server bootstrap."""

from __future__ import annotations

import asyncio
import logging

import grpc
from prometheus_client import Counter

from rlhf_mesh.services.generation import prompts
from rlhf_mesh.services.generation.engine import PolicyEngine, QueueFull
from rlhf_mesh.services.generation.settings import GenerationSettings
from rlhf_mesh.v1 import generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

REQUESTS = Counter("rlhf_mesh_generation_requests_total", "Generate calls by outcome.", ["status"])


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Validates, waits for the policy version asked for, admits, streams samples as they finish."""

    def __init__(self, settings: GenerationSettings, engine: PolicyEngine) -> None:
        self.settings = settings
        self.engine = engine

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        async def refuse(code: grpc.StatusCode, message: str) -> None:
            REQUESTS.labels(code.name.lower()).inc()
            await context.abort(code, message)

        try:
            plan = await asyncio.to_thread(prompts.plan, request, self.engine.tokenizer, self.engine.limits)
        except prompts.InvalidRequest as err:
            await refuse(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        wanted = request.min_policy_version
        if wanted > self.engine.version and not await self.engine.wait_for_version(wanted, self._wait_s(context)):
            await refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"min_policy_version {wanted} was not reached before the deadline; serving {self.engine.version}",
            )
        try:
            self.engine.admit(plan)
        except QueueFull as err:
            await refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, f"generation queue is full ({err}); retry later")
        status = "cancelled"
        try:
            async for event in self.engine.generate(plan, request.stream_tokens):
                yield event
            status = "ok"
        finally:
            REQUESTS.labels(status).inc()

    def _wait_s(self, context: grpc.aio.ServicerContext) -> float:
        """How long a call may wait for its min_policy_version: answer just before its deadline,
        so the caller gets FAILED_PRECONDITION rather than DEADLINE_EXCEEDED."""
        remaining = context.time_remaining()
        if remaining is None:
            return self.settings.max_version_wait_s
        return max(0.0, min(remaining - min(0.25, remaining / 10), self.settings.max_version_wait_s))

    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        return self.engine.info()


class GenerationService:
    """GenerationService on the shared bootstrap: starts vLLM, warms it, serves."""

    name = "generation"

    def __init__(self, settings: GenerationSettings) -> None:
        self.settings = settings
        self.engine = PolicyEngine(settings)
        self.servicer = GenerationServicer(settings, self.engine)

    def register(self, server: grpc.aio.Server) -> list[str]:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)
        return [generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name]

    async def start(self) -> None:
        await self.engine.start()
        info = self.engine.info()
        log.info("serving %s (policy version %d, max_model_len %d, %s)",
                 info.model_id, info.policy_version, info.max_model_len_tokens, info.dtype)

    async def close(self) -> None:
        await self.engine.close()
