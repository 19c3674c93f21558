"""rlhf-mesh: RLHF as a set of gRPC microservices."""

__version__ = "0.1.0"
