"""Python clients of the rlhf-mesh services (installed as `rlhf_mesh.clients`)."""

from rlhf_mesh.clients.channel import TlsConfig
from rlhf_mesh.clients.environment import AsyncEnvironmentClient, EnvironmentClient
from rlhf_mesh.clients.feedback import FeedbackClient, feedback
from rlhf_mesh.clients.generation import AsyncGenerationClient, GenerationClient
from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.clients.reward import AsyncRewardClient, RewardClient

__all__ = [
    "AsyncEnvironmentClient", "AsyncGenerationClient", "AsyncRewardClient", "EnvironmentClient", "FeedbackClient",
    "GenerationClient", "RewardClient", "TlsConfig", "feedback", "wait_until_serving",
]
