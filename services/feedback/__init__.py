"""FeedbackService: durable human feedback, exported as preference pairs."""

from rlhf_mesh.services.feedback.service import FeedbackService as Service
from rlhf_mesh.services.feedback.settings import FeedbackSettings as Settings

__all__ = ["Service", "Settings"]
