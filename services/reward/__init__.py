"""RewardService: batched reward-model scoring behind one gRPC contract."""

from rlhf_mesh.services.reward.service import RewardService as Service
from rlhf_mesh.services.reward.settings import RewardSettings as Settings

__all__ = ["Service", "Settings"]
