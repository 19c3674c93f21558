"""GenerateRequest -> prompt token ids and vLLM SamplingParams, or INVALID_ARGUMENT.

Every check runs before anything reaches the engine; messages name the field and,
for a prompt, its index. Prompt forms: text (tokenized with the model's tokenizer,
special tokens added as vLLM adds them), token ids (used as given) and chat
(rendered with the model's chat template plus the assistant generation prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from rlhf_mesh.v1 import generation_pb2

DEFAULT_MAX_TOKENS = 16


class InvalidRequest(ValueError):
    """A request the engine must not see; the message says why."""


@dataclass(frozen=True)
class Limits:
    """What the served model and the service settings allow."""

    max_model_len: int
    vocab_size: int
    max_samples_per_prompt: int
    max_request_prompts: int
    max_prompt_bytes: int


@dataclass
class Plan:
    """A validated request: token ids per prompt and the sampling parameters of one sample."""

    prompt_ids: list[list[int]]
    n: int
    seed: int | None
    params: SamplingParams  # n=1: every sample is its own engine request

    @property
    def num_samples(self) -> int:
        return len(self.prompt_ids) * self.n

    def sample_params(self, prompt_index: int, sample_index: int) -> SamplingParams:
        """Sample j of prompt i draws from seed + i*n + j: reproducible, and independent across prompts."""
        if self.seed is None:
            return self.params
        params = self.params.clone()
        params.seed = self.seed + prompt_index * self.n + sample_index
        return params


def _sampling(request: generation_pb2.GenerateRequest, limits: Limits) -> tuple[int, int, dict[str, Any]]:
    s = request.sampling
    max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise InvalidRequest(f"sampling.max_tokens must be >= 1, got {max_tokens}")
    if max_tokens >= limits.max_model_len:
        raise InvalidRequest(
            f"sampling.max_tokens {max_tokens} leaves no room for a prompt in max_model_len {limits.max_model_len}"
        )
    n = s.n if s.HasField("n") else 1
    if not 1 <= n <= limits.max_samples_per_prompt:
        raise InvalidRequest(f"sampling.n must be in [1, {limits.max_samples_per_prompt}], got {n}")
    temperature = s.temperature if s.HasField("temperature") else 1.0
    if not temperature >= 0 or math.isinf(temperature):  # also refuses NaN
        raise InvalidRequest(f"sampling.temperature must be a finite number >= 0, got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else -1
    if top_k < -1:
        raise InvalidRequest(f"sampling.top_k must be -1, 0 or positive, got {top_k}")
    for i, token in enumerate(s.stop_token_ids):
        if token >= limits.vocab_size:
            raise InvalidRequest(
                f"sampling.stop_token_ids[{i}]: {token} is outside the vocabulary ({limits.vocab_size})"
            )
    if any(not stop for stop in s.stop):
        raise InvalidRequest("sampling.stop: empty stop string")
    kwargs = dict(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos, logprobs=0,
    )
    return n, max_tokens, kwargs


def plan(request: generation_pb2.GenerateRequest, tokenizer: Any, limits: Limits) -> Plan:
    """Validate `request` and tokenize its prompts; raises InvalidRequest."""
    if not request.prompts:
        raise InvalidRequest("prompts is empty")
    if len(request.prompts) > limits.max_request_prompts:
        raise InvalidRequest(
            f"{len(request.prompts)} prompts, more than max_request_prompts={limits.max_request_prompts}"
        )
    n, max_tokens, kwargs = _sampling(request, limits)
    prompt_ids = []
    for i, prompt in enumerate(request.prompts):
        ids = _tokenize(i, prompt, tokenizer, limits)
        if len(ids) + max_tokens > limits.max_model_len:
            raise InvalidRequest(
                f"prompts[{i}]: {len(ids)} prompt tokens + max_tokens {max_tokens} exceed "
                f"max_model_len {limits.max_model_len}"
            )
        prompt_ids.append(ids)
    kind = RequestOutputKind.DELTA if request.stream_tokens else RequestOutputKind.FINAL_ONLY
    seed = request.sampling.seed if request.sampling.HasField("seed") else None
    return Plan(prompt_ids, n, seed, SamplingParams(n=1, output_kind=kind, **kwargs))


def _tokenize(index: int, prompt: Any, tokenizer: Any, limits: Limits) -> list[int]:
    kind = prompt.WhichOneof("kind")
    where = f"prompts[{index}]"
    size = prompt.ByteSize()
    if size > limits.max_prompt_bytes:  # refused before the tokenizer's memory grows with it
        raise InvalidRequest(f"{where}: {size} bytes, more than max_prompt_bytes={limits.max_prompt_bytes}")
    if kind == "text":
        ids = list(tokenizer.encode(prompt.text, add_special_tokens=True)) if prompt.text else []
    elif kind == "token_ids":
        ids = list(prompt.token_ids.ids)
        for j, token in enumerate(ids):
            if token >= limits.vocab_size:
                raise InvalidRequest(f"{where}.token_ids[{j}]: {token} is outside the vocabulary ({limits.vocab_size})")
    elif kind == "chat":
        if not prompt.chat.messages:
            raise InvalidRequest(f"{where}: empty chat")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(f"{where}: the model has no chat template; send text or token ids")
        messages = [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
        try:
            ids = list(tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        except Exception as err:  # a template may refuse roles or orders; that is the caller's input
            raise InvalidRequest(f"{where}: chat template failed: {err}") from None
    else:
        raise InvalidRequest(f"{where}: no prompt given (text, token_ids or chat)")
    if not ids:
        raise InvalidRequest(f"{where}: empty prompt")
    return ids
