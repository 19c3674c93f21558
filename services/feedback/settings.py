"""Settings of the FeedbackService (env prefix RLHF_MESH_FEEDBACK_)."""

from __future__ import annotations

from pydantic import Field, FilePath
from pydantic_settings import SettingsConfigDict

from rlhf_mesh.http_site import HttpPortSettings
from rlhf_mesh.settings import ServiceSettings


class FeedbackSettings(ServiceSettings, HttpPortSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_MESH_FEEDBACK_")

    port: int = Field(50054, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    db: str = Field(
        "sqlite:///feedback.db",
        description="SQLAlchemy URL: sqlite:///PATH, or postgresql://USER:PASSWORD@HOST/DB for shared deployments",
    )
    max_responses: int = Field(16, ge=2, description="responses in one piece of feedback")
    max_text_bytes: int = Field(64 << 10, gt=0, description="longest prompt, response or correction, UTF-8 bytes")
    rater_page: bool = Field(True, description="serve the rater page (HTTP) beside the gRPC port")
    rater_port: int = Field(8054, ge=0, le=65535, description="HTTP port of the rater page (0 picks a free one)")
    rater_identity_header: str | None = Field(
        None, description="header in which a trusted authenticating proxy in front of the rater page names the "
        "rater (e.g. X-Forwarded-User); off unless set, and only safe when the proxy is the page's only way in")
    session_replicas: list[str] = Field(
        default_factory=list, description="GenerationService HOST:PORT whose sessions a rating with a session_id "
        "rewards (repeat for replicas; the one that holds the session takes it)")
    services_token_file: FilePath | None = Field(
        None, description="bearer token of the calls to session_replicas (role feedback there)")
    services_tls_ca: FilePath | None = Field(None, description="PEM CA of session_replicas' certificates; turns TLS on")
    assignment_lease_s: float = Field(
        1800.0, gt=0, description="how long a rater holds an item before it goes back to the other raters")
