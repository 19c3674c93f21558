"""Settings of the GenerationService (env prefix RLHF_MESH_GENERATION_)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Literal

from pydantic import Field, FilePath, field_validator
from pydantic_settings import SettingsConfigDict

from rlhf_mesh.http_site import HttpPortSettings
from rlhf_mesh.settings import ServiceSettings
from rlhf_mesh.vllm_memory import kv_cache_memory_bytes


class GenerationSettings(ServiceSettings, HttpPortSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_MESH_GENERATION_")

    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    model: str = Field(description="Hugging Face causal LM folder (or name) served as policy version 0")
    # vLLM engine arguments, passed through unchanged.
    dtype: str = Field("auto", description="weight dtype: auto, float32, bfloat16, float16")
    max_model_len: int | None = Field(None, gt=0, description="longest prompt plus completion; default: the model's")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the model is sharded over")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory vLLM may use")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="KV cache size in GiB; default: vLLM's own on GPUs, 5% of memory (1-4 GiB) on CPU"
    )
    enforce_eager: bool = Field(True, description="no CUDA graphs / compilation (fast start; turn off on GPU)")
    max_num_seqs: int | None = Field(None, gt=0, description="sequences per engine step; default: vLLM's")
    seed: int = Field(0, description="engine seed (requests without a seed draw from it)")
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = Field(
        "processed_logprobs",
        description="completion_logprobs after temperature/top-k/top-p (the sampling distribution) or raw",
    )
    enable_lora: bool = Field(
        False, description="serve LoRA adapters pushed by the learner (adapter pushes) on top of the base model"
    )
    max_lora_rank: int = Field(16, ge=1, description="largest rank of a pushed adapter (vLLM's max_lora_rank)")
    max_loras: int = Field(
        2, ge=1, description="adapters in one batch: the new one, and the one samples that started before its "
        "push still use"
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="any other vLLM AsyncEngineArgs, e.g. max_num_batched_tokens=4096"
    )
    # Limits of the service itself.
    max_samples_per_prompt: int = Field(64, ge=1, description="largest n; more is INVALID_ARGUMENT")
    max_request_prompts: int = Field(4096, ge=1, description="prompts in one Generate call")
    max_prompt_bytes: int = Field(
        1 << 20, ge=1, description="largest prompt (text, chat or ids) in protobuf bytes; more is INVALID_ARGUMENT"
    )
    max_queued_samples: int = Field(
        8192, ge=1, description="samples admitted and unfinished; beyond: RESOURCE_EXHAUSTED"
    )
    weight_staging_dir: str = Field(
        "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
        description="where in-band pushes are staged before they are applied (memory-backed is fastest)",
    )
    keep_weight_base: bool = Field(
        True, description="keep the last in-band push's tensors in weight_staging_dir (one more copy of the "
        "policy there) so that the next push may be a delta against it"
    )
    catch_up_from: str | None = Field(
        None, description="HOST:PORT of the peer replicas (a headless Service's name): before it serves, the replica "
        "pulls the newest policy version one of them serves (FetchWeights)"
    )
    catch_up_timeout_s: float = Field(600.0, gt=0, description="deadline of each call to a peer while catching up")
    catch_up_token_file: FilePath | None = Field(
        None, description="bearer token for the peers (roles generate + admin)"
    )
    catch_up_tls_ca: FilePath | None = Field(
        None, description="PEM CA of the peers' certificates; turns TLS on (this replica's tls_cert is its client "
        "certificate where they ask for one)"
    )
    catch_up_tls_server_name: str | None = Field(
        None, description="name the peers' certificates carry (the peers are dialled by IP)"
    )
    max_version_wait_s: float = Field(
        300.0, ge=0, description="longest a call waits for its min_policy_version (or until its deadline)"
    )
    max_collective_timeout_s: float = Field(
        600.0, gt=0, description="largest timeout_ms InitWeightTransfer accepts: how long a stalled collective may "
        "hold the workers"
    )

    # The OpenAI-compatible HTTP port (services/generation/openai_api.py).
    http_port: int | None = Field(
        None, ge=0, le=65535, description="HTTP port of the OpenAI-compatible API (/v1/chat/completions, "
        "/v1/completions, /v1/models, sessions); off unless set (0 picks a free one)"
    )
    http_host: str | None = Field(
        None, description="address of the HTTP port (default: host; a wildcard such as [::] or an empty string: "
        "every address, IPv4 and IPv6)"
    )
    served_model_name: str | None = Field(
        None, description="the model's name on the HTTP port (/v1/models, a request's model); default: model"
    )
    tool_call_parser: str | None = Field(
        None, description="vLLM tool parser that turns sampled text into tool_calls (as `vllm serve "
        "--tool-call-parser`: hermes, llama3_json, mistral, pythonic, qwen3_xml, ...); unset: no tool calls are parsed"
    )
    reasoning_parser: str | None = Field(
        None, description="vLLM reasoning parser that splits reasoning from content (as `vllm serve "
        "--reasoning-parser`: deepseek_r1, qwen3, ...)"
    )
    max_sessions: int = Field(
        1024, ge=1, description="sessions held at once (open, and closed but not yet taken); a new one beyond: 429"
    )
    max_session_tokens: int = Field(
        262_144, ge=1, description="tokens a session may hold over all its branches; a call beyond: 400"
    )
    max_total_session_tokens: int = Field(
        16_777_216, ge=1, description="tokens all sessions may hold together (about 90 bytes each); a call "
        "beyond: 429"
    )
    session_idle_s: float = Field(
        1800.0, gt=0, description="a session unused this long (or closed and not taken this long) is dropped"
    )

    @field_validator("engine_args", mode="before")
    @classmethod
    def _parse_engine_args(cls, value: Any) -> Any:
        """Flags give strings (`--engine-args k=v`); read numbers and booleans as JSON."""
        if not isinstance(value, dict):
            return value

        def parse(v: Any) -> Any:
            try:
                return json.loads(v) if isinstance(v, str) else v
            except ValueError:
                return v

        return {k: parse(v) for k, v in value.items()}

    @field_validator("engine_args")
    @classmethod
    def _known_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value:
            from vllm.engine.arg_utils import AsyncEngineArgs

            known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"not vLLM engine arguments: {unknown}")
        return value

    def engine_kwargs(self, path: str) -> dict[str, Any]:
        """Keyword arguments of vLLM's AsyncEngineArgs, for the policy in the local folder `path`."""
        explicit = dict(
            model=path, dtype=self.dtype, kv_cache_memory_bytes=kv_cache_memory_bytes(self.kv_cache_gib),
            max_model_len=self.max_model_len,
            tensor_parallel_size=self.tensor_parallel_size, gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager, max_num_seqs=self.max_num_seqs, seed=self.seed,
            logprobs_mode=self.logprobs_mode,
            weight_transfer_config={"backend": "rlhf_mesh"},  # services/generation/weight_transfer.py
        )
        if self.enable_lora:
            explicit |= dict(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=self.max_loras)
        return {**{k: v for k, v in explicit.items() if v is not None}, **self.engine_args}
