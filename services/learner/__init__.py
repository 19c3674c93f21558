"""The PPO learner: pulls rollouts, scores them, trains, pushes weights to every replica."""

from rlhf_mesh.services.learner.service import FollowerService
from rlhf_mesh.services.learner.service import LearnerService as Service
from rlhf_mesh.services.learner.settings import LearnerSettings as Settings

__all__ = ["FollowerService", "Service", "Settings"]
