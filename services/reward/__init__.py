"""RewardService: batched scoring with reward models, reward functions and composites behind one gRPC contract.

`Service` and `Settings` load on first use, so the reward-function worker processes, which
import only rlhf_mesh/worker_pool.py and rlhf_mesh/reward_functions.py, start without the server's dependencies.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Service", "Settings"]


def __getattr__(name: str) -> Any:
    if name == "Service":
        from rlhf_mesh.services.reward.service import RewardService

        return RewardService
    if name == "Settings":
        from rlhf_mesh.services.reward.settings import RewardSettings

        return RewardSettings
    raise AttributeError(name)
