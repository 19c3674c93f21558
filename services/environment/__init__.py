"""EnvironmentService: multi-turn episodes against the GenerationService, token-exact, with loss masks.

`Service` and `Settings` load on first use, so the environment worker processes, which import
only environments.py and the environments, start without the server's dependencies.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Service", "Settings"]


def __getattr__(name: str) -> Any:
    if name == "Service":
        from rlhf_mesh.services.environment.service import EnvironmentService

        return EnvironmentService
    if name == "Settings":
        from rlhf_mesh.services.environment.settings import EnvironmentSettings

        return EnvironmentSettings
    raise AttributeError(name)
