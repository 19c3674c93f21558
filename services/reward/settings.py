"""Settings of the RewardService (env prefix RLHF_MESH_REWARD_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from rlhf_mesh.settings import ServiceSettings


class RewardSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_MESH_REWARD_")

    port: int = Field(50052, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    model: list[str] = Field(
        min_length=1, description="reward model as PATH or NAME=PATH; repeat for several, the first is the default"
    )
    backend: Literal["transformers", "vllm"] = Field("transformers", description="inference backend")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype")
    device: str = Field("cpu", description="torch device of the transformers backend, e.g. cpu or cuda")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="vLLM backend: KV cache size in GiB; default: vLLM's own on GPUs, 5% of memory "
        "(1-4 GiB) on CPU"
    )
    max_length: int | None = Field(
        None, gt=0, description="longest input in tokens; default: the model's max_position_embeddings"
    )
    truncation: Literal["left", "error"] = Field(
        "left", description="over-long input: drop prompt tokens from the left, or INVALID_ARGUMENT"
    )
    max_batch_tokens: int = Field(
        4096, gt=0, description="padded tokens per model batch (a longer sample runs alone)"
    )
    max_padding_ratio: float = Field(
        0.1, ge=0, le=1, description="most padding tokens / all tokens of a padded batch; a sample may run alone"
    )
    max_wait_ms: float = Field(5.0, ge=0, description="longest a sample waits for batch-mates")
    max_queue_samples: int = Field(8192, gt=0, description="queued samples per model; beyond: RESOURCE_EXHAUSTED")
    max_request_samples: int = Field(1024, gt=0, description="samples in one Score call")
    max_sample_bytes: int = Field(
        1 << 20, gt=0, description="largest sample (text, chat or ids) in protobuf bytes; more is INVALID_ARGUMENT"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> RewardSettings:
        self.named_models()
        return self

    def named_models(self) -> list[tuple[str, str]]:
        """(name, path) pairs; a bare PATH is named after its last folder."""
        pairs = []
        for spec in self.model:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = spec.rstrip("/").rsplit("/", 1)[-1], spec
            pairs.append((name, path))
        names = [n for n, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return pairs
