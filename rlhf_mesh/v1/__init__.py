"""Generated protobuf and gRPC modules of the rlhf_mesh.v1 API (`make protos`; do not edit)."""
