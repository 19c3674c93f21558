"""Python clients of the rlhf-mesh services (installed as `rlhf_mesh.clients`)."""
