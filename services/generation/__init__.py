"""GenerationService: vLLM generation that streams rollouts over gRPC."""

from rlhf_mesh.services.generation.service import GenerationService as Service
from rlhf_mesh.services.generation.settings import GenerationSettings as Settings

__all__ = ["Service", "Settings"]
