"""Settings of the RewardService (env prefix RLHF_MESH_REWARD_)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from rlhf_mesh.http_site import HttpPortSettings
from rlhf_mesh.settings import ServiceSettings, old_name_of

_TERM = re.compile(r"\s*([+-])?\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?([A-Za-z_][\w.-]*)\s*")


def parse_composite(spec: str) -> tuple[str, list[tuple[float, str]]]:
    """`NAME=0.8*rm+0.2*math` -> (NAME, [(0.8, "rm"), (0.2, "math")]); a bare part weighs 1."""
    name, sep, expression = spec.partition("=")
    if not sep or not name.strip() or not expression.strip():
        raise ValueError(f"composite {spec!r}: write NAME=WEIGHT*PART+WEIGHT*PART, e.g. total=0.8*rm+0.2*math")
    parts, position = [], 0
    while position < len(expression):
        match = _TERM.match(expression, position)
        if match is None or match.end() == position or (parts and match.group(1) is None):
            raise ValueError(f"composite {spec!r}: cannot read {expression[position:]!r}")
        sign, weight, part = match.groups()
        parts.append(((-1 if sign == "-" else 1) * float(weight or 1), part))
        position = match.end()
    if len({part for _, part in parts}) != len(parts):
        raise ValueError(f"composite {spec!r}: a part appears twice")
    return name.strip(), parts


class RewardSettings(ServiceSettings, HttpPortSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_MESH_REWARD_")

    port: int = Field(50052, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    model: list[str] = Field(
        default_factory=list,
        description="reward model as PATH or NAME=PATH (a folder or a hub id); repeat for several, the first is the "
        "default",
    )
    function: list[str] = Field(
        default_factory=list,
        description="reward function as NAME (a built-in: math, exact, regex, format) or NAME=package.module:callable "
        "(TRL's fn(prompts, completions, **kwargs)); repeat for several",
    )
    composite: list[str] = Field(
        default_factory=list, description="composite reward NAME=WEIGHT*PART+WEIGHT*PART over models and functions, "
        "e.g. total=0.8*rm+0.2*math; repeat for several"
    )
    reward: list[str] | None = old_name_of("composite")
    function_workers: int = Field(3, ge=1, description="worker processes that run reward functions")
    function_workers_per_caller: int | None = Field(
        None, ge=1, description="most function workers one caller's calls hold at once; default function_workers - 1 "
        "(at least 1), so a caller's slow calls always leave a worker for the others"
    )
    function_timeout_s: float = Field(
        10.0, gt=0, description="longest one reward function call may take, counted from its arrival (queued time "
        "included; a call that waited it out fails without running)"
    )
    function_max_queued_samples: int = Field(
        4096, gt=0, description="samples queued for the function workers; beyond: RESOURCE_EXHAUSTED with a retry "
        "hint (the caller holding the most queued samples gives way first), a larger call: INVALID_ARGUMENT"
    )
    function_worker_memory_mb: int = Field(
        2048, ge=0, description="data memory (heap and private mappings) of each function worker in MiB; a call "
        "that allocates past it fails alone; 0: no limit"
    )
    http_port: int | None = Field(
        None, ge=0, le=65535, description="HTTP port of the JSON protocols (OpenRLHF /get_reward, vLLM /classify and "
        "/pooling, /v1/score); off unless set (0 picks a free one)"
    )
    http_host: str | None = Field(
        None, description="address of the HTTP port (default: host; a wildcard such as [::] or an empty string: "
        "every address, IPv4 and IPv6)"
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
    max_queued_tokens: int = Field(
        1 << 20, gt=0, description="tokens queued per model, counting calls still being tokenized at their upper "
        "bound; beyond: RESOURCE_EXHAUSTED with a retry hint, and a call that could never fit: INVALID_ARGUMENT"
    )
    max_queued_samples: int = Field(
        8192, gt=0, description="samples queued per model; beyond: RESOURCE_EXHAUSTED, as for max_queued_tokens"
    )
    max_queue_samples: int | None = old_name_of("max_queued_samples")
    fair_batches: bool = Field(
        True, description="share batches between callers: the caller served the fewest tokens picks the next batch; "
        "false: the oldest sample does, so one large call holds every later caller behind it"
    )
    max_request_samples: int = Field(1024, gt=0, description="samples in one Score call")
    max_sample_bytes: int = Field(
        1 << 20, gt=0, description="largest sample (text, chat or ids) in protobuf bytes; more is INVALID_ARGUMENT"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> RewardSettings:
        if not self.model and not self.function:
            raise ValueError("give at least one --model or --function")
        scorers = [n for n, _ in self.named_models()] + [n for n, _ in self.named_functions()]
        composites = self.composites()
        names = scorers + [n for n, _ in composites]
        if len(set(names)) != len(names):
            raise ValueError(f"model, function and composite names must be unique, got {names}")
        for name, parts in composites:
            unknown = sorted(part for _, part in parts if part not in scorers)
            if unknown:
                raise ValueError(f"composite {name}: {unknown} are not models or functions of this server "
                                 "(composites do not nest)")
        return self

    def composites(self) -> list[tuple[str, list[tuple[float, str]]]]:
        """(name, [(weight, part), ...]) of every composite."""
        return [parse_composite(spec) for spec in self.composite]

    def named_functions(self) -> list[tuple[str, str]]:
        """(name, spec) pairs; a bare NAME is the built-in of that name."""
        return [(name, spec if sep else name) for name, sep, spec in (f.partition("=") for f in self.function)]

    def named_models(self) -> list[tuple[str, str]]:
        """(name, path) pairs; a bare PATH is named after its last folder."""
        pairs = []
        for spec in self.model:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = spec.rstrip("/").rsplit("/", 1)[-1], spec
            pairs.append((name, path))
        return pairs
