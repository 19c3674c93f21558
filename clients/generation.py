"""Clients of the GenerationService: `GenerationClient` (blocking) and `AsyncGenerationClient`.

`generate` returns an iterator of finished `Sample`s in the order they finish (with
`stream_tokens=True`, of `GenerateResponse` events: token deltas and samples). A prompt is
text, a list of token ids, a chat conversation (a list of `{"role", "content"}` dicts) or a
`Prompt`. Every call has a deadline (`timeout_s`, default 300 s for generation); UNAVAILABLE
is retried by the channel's service config, which gRPC does only before the first response
message, so a sample is never received twice. Leaving the iteration early cancels the call,
and the server aborts its engine requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TypeAlias

from rlhf_mesh.clients.channel import AsyncClient, Client
from rlhf_mesh.clients.common import conversation, is_chat, is_token_ids
from rlhf_mesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc

SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
PromptLike: TypeAlias = common_pb2.Prompt | str | Sequence[int] | Sequence[dict[str, str]]


def to_prompt(prompt: PromptLike) -> common_pb2.Prompt:
    """Build a Prompt from any of the accepted forms."""
    if isinstance(prompt, common_pb2.Prompt):
        return prompt
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    items = list(prompt)
    if is_chat(items):
        return common_pb2.Prompt(chat=conversation(items))
    if is_token_ids(items):
        return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=items))
    raise TypeError(f"cannot use {type(prompt).__name__} as a prompt: give text, token ids or chat messages")


def generate_request(
    prompts: Sequence[PromptLike], *, n: int | None = None, max_tokens: int | None = None,
    temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
    seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False, min_policy_version: int = 0, stream_tokens: bool = False,
) -> generation_pb2.GenerateRequest:
    """A GenerateRequest; parameters left None take the server's defaults."""
    optional = dict(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    sampling = generation_pb2.SamplingParams(
        stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
        **{k: v for k, v in optional.items() if v is not None},
    )
    return generation_pb2.GenerateRequest(
        prompts=[to_prompt(p) for p in prompts], sampling=sampling,
        min_policy_version=min_policy_version, stream_tokens=stream_tokens,
    )


class GenerationClient(Client):
    """Blocking client; use as a context manager or call close()."""

    service = SERVICE
    stub_class = generation_pb2_grpc.GenerationServiceStub

    def __init__(self, address: str, *, timeout_s: float = 300.0, **options) -> None:
        super().__init__(address, timeout_s=timeout_s, **options)

    def generate(self, prompts: Sequence[PromptLike], *, timeout_s: float | None = None,
                 **sampling) -> Iterator[generation_pb2.Sample]:
        """Finished samples as they arrive; keyword arguments are those of `generate_request`."""
        call = self.stub.Generate(generate_request(prompts, **sampling), timeout=self._timeout(timeout_s))
        try:
            for event in call:
                yield event if sampling.get("stream_tokens") else event.sample
        finally:
            call.cancel()  # a no-op once the stream ended; aborts the samples of an abandoned one

    def model_info(self, timeout_s: float | None = None) -> generation_pb2.GetModelInfoResponse:
        return self.stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=self._timeout(timeout_s))

    def push_weights(self, weights, version: int, *, timeout_s: float = 600.0) -> generation_pb2.PushWeightsResponse:
        """Make this replica serve `weights` as `version`, in-band: a transformers model, any module, or
        a state dict under the checkpoint's names or transformers' run-time ones (`model.state_dict()`).

        Pushing to many replicas, and delta pushes: `rlhf_mesh.clients.push`.
        """
        from rlhf_mesh.weights import prepare, state_dict_of  # torch only for callers that push

        return self.push(prepare(state_dict_of(weights), version).full, timeout_s)

    def push_adapter(self, peft_model, version: int, *, timeout_s: float = 600.0) -> generation_pb2.PushWeightsResponse:
        """Make this replica (started with enable_lora) generate with `peft_model`'s active LoRA
        adapter on its base model, as `version`; a few MB where a full push sends the whole model."""
        from rlhf_mesh.weights import full_push, lora_adapter_of

        tensors, adapter = lora_adapter_of(peft_model)
        return self.push(full_push(tensors, version, adapter=adapter), timeout_s)

    def push(self, push, timeout_s: float = 600.0) -> generation_pb2.PushWeightsResponse:
        """Send a prepared `rlhf_mesh.weights.Push` (full, or a delta against the served version)."""
        from rlhf_mesh.weights import push_requests

        call = self.channel.stream_unary(  # no request serializer: the messages are serialized already
            f"/{SERVICE}/PushWeights", response_deserializer=generation_pb2.PushWeightsResponse.FromString)
        return call(push_requests(push), timeout=timeout_s)


class AsyncGenerationClient(AsyncClient):
    """asyncio client; use with `async with` or await close()."""

    service = SERVICE
    stub_class = generation_pb2_grpc.GenerationServiceStub

    def __init__(self, address: str, *, timeout_s: float = 300.0, **options) -> None:
        super().__init__(address, timeout_s=timeout_s, **options)

    async def generate(self, prompts: Sequence[PromptLike], *, timeout_s: float | None = None,
                       **sampling) -> AsyncIterator[generation_pb2.Sample]:
        call = self.stub.Generate(generate_request(prompts, **sampling), timeout=self._timeout(timeout_s))
        try:
            async for event in call:
                yield event if sampling.get("stream_tokens") else event.sample
        finally:
            call.cancel()

    async def model_info(self, timeout_s: float | None = None,
                         wait_for_ready: bool = False) -> generation_pb2.GetModelInfoResponse:
        """`wait_for_ready`: wait (up to the deadline) for a replica that is not up or not SERVING yet."""
        return await self.stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=self._timeout(timeout_s),
                                            wait_for_ready=wait_for_ready)
