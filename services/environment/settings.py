"""Settings of the EnvironmentService (env prefix RLHF_MESH_ENVIRONMENT_)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, FilePath, model_validator
from pydantic_settings import SettingsConfigDict

from rlhf_mesh.settings import ServiceSettings


class EnvironmentSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_MESH_ENVIRONMENT_")

    port: int = Field(50055, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    environment: list[str] = Field(
        default_factory=list, min_length=1,
        description="environment as NAME (a built-in: calculator, retry) or NAME=package.module:Class; repeat for "
        "several",
    )
    generation: list[str] = Field(min_length=1, description="GenerationService HOST:PORT; repeat for replicas")
    reward: str | None = Field(None, description="RewardService HOST:PORT, for requests that name a reward_model")
    tokenizer: str | None = Field(
        None, description="the policy's tokenizer (a folder or a hub id); default: the model the first replica serves"
    )
    max_turns: int = Field(8, ge=1, description="most model turns of an episode (a request may ask for fewer)")
    max_episode_tokens: int | None = Field(
        None, gt=0, description="most tokens of an episode, prompt included (a request may ask for fewer); "
        "default and upper bound: the replicas' model length"
    )
    episode_affinity: bool = Field(
        True, description="every turn of an episode on one replica, whose prefix cache holds the episode; false: "
        "each turn to the next replica in turn (to measure what affinity saves)"
    )
    max_request_tasks: int = Field(1024, gt=0, description="tasks in one RunEpisodes call")
    max_samples_per_task: int = Field(64, gt=0, description="largest n (episodes per task)")
    max_task_bytes: int = Field(65536, gt=0, description="largest task, in bytes of JSON")
    max_concurrent_episodes: int = Field(
        256, gt=0, description="episodes running at once, server-wide; the others of a call wait their turn"
    )
    environment_workers: int = Field(4, ge=1, description="worker processes that run environments")
    environment_workers_per_caller: int | None = Field(
        None, ge=1, description="most environment workers one caller's calls hold at once; default: all of them"
    )
    environment_timeout_s: float = Field(
        10.0, gt=0, description="longest one reset() or step() may take, counted from its arrival (queued included)"
    )
    environment_max_queued_calls: int = Field(
        4096, gt=0, description="environment calls queued for the workers; beyond, the episode ends with an error"
    )
    environment_worker_memory_mb: int = Field(
        2048, ge=0, description="data memory of each environment worker in MiB; 0: no limit"
    )
    rpc_timeout_s: float = Field(600.0, gt=0, description="deadline of each Generate and Score call the service makes")
    services_wait_s: float = Field(
        300.0, gt=0, description="how long the service waits at start for the first generation replica to serve"
    )
    services_token_file: FilePath | None = Field(
        None, description="bearer token of the service's calls (role generate on generation, and feedback to "
        "take sessions; score on reward)"
    )
    agent_token_file: FilePath | None = Field(
        None, description="token agent programs call the OpenAI-compatible ports with (role generate); "
        "default: services_token_file's"
    )
    services_tls_ca: FilePath | None = Field(None, description="PEM CA of the services' certificates; turns TLS on")
    services_tls_cert: FilePath | None = Field(None, description="PEM client certificate, for mutual TLS")
    services_tls_key: FilePath | None = Field(None, description="PEM private key of services_tls_cert")
    services_tls_server_name: str | None = Field(
        None, description="name the services' certificates carry, when not the address's host"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> EnvironmentSettings:
        names = [name for name, _ in self.named_environments()]
        if len(set(names)) != len(names):
            raise ValueError(f"environment names must be unique, got {names}")
        return self

    def named_environments(self) -> list[tuple[str, str]]:
        """(name, spec) pairs; a bare NAME is the built-in of that name."""
        return [(name, spec if sep else name) for name, sep, spec in (e.partition("=") for e in self.environment)]

    def credentials(self) -> dict[str, Any]:
        """The `tls` and `token` arguments of the service's clients."""
        from rlhf_mesh.clients.channel import client_credentials

        return client_credentials(self.services_token_file, self.services_tls_ca, self.services_tls_cert,
                                  self.services_tls_key, self.services_tls_server_name)
