"""The gRPC services of rlhf-mesh, one subpackage each (installed as `rlhf_mesh.services`)."""
