"""The shared server bootstrap, on a real server process over real sockets."""

from __future__ import annotations

import ipaddress
import signal
import urllib.request

import grpc
import psutil
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from rlhf_mesh.clients.health import wait_until_serving
from rlhf_mesh.v1 import learner_pb2, learner_pb2_grpc

from support import PYTHON, ROOT, wait_for

PROBE = [PYTHON, str(ROOT / "tests" / "bootstrap_server.py")]
SECRET = "do-not-leak-4711"
LEARNER = "rlhf_mesh.v1.LearnerService"


def _health(channel: grpc.Channel, service: str = "") -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_not_serving_while_loading_then_serving_with_reflection(child_server):
    server = child_server([*PROBE, "--load-s", "4", "--reflection"])
    with grpc.insecure_channel(server.address) as channel:
        learner = learner_pb2_grpc.LearnerServiceStub(channel)

        def loading() -> bool:
            try:
                return _health(channel) == "NOT_SERVING"
            except grpc.RpcError:  # the port is not bound yet
                return False

        wait_for(loading, what="health NOT_SERVING while the model loads")
        with pytest.raises(grpc.RpcError) as err:
            learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not ready" in err.value.details()

        wait_until_serving(server.address, timeout_s=60, alive=server.alive)
        assert _health(channel) == "SERVING"
        assert _health(channel, LEARNER) == "SERVING"
        assert learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=5).step == 7

        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {LEARNER, "grpc.health.v1.Health"} <= services
        # The full schema comes through reflection: a client can call without the .proto files.
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName(LEARNER).methods_by_name["WatchMetrics"]
        assert method.server_streaming and method.output_type.full_name == "rlhf_mesh.v1.WatchMetricsResponse"


def test_unexpected_error_is_internal_logged_and_not_leaked(child_server):
    server = child_server(PROBE)
    wait_until_serving(server.address, timeout_s=60, alive=server.alive)
    with grpc.insecure_channel(server.address) as channel:
        learner = learner_pb2_grpc.LearnerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            learner.Pause(learner_pb2.PauseRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert SECRET not in err.value.details()
        assert "ref " in err.value.details()
        # Bytes that are no protobuf message: INVALID_ARGUMENT naming the expected type, not INTERNAL.
        raw = channel.unary_unary(f"/{LEARNER}/GetStatus")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid rlhf_mesh.v1.GetStatusRequest" in err.value.details()
        # The server goes on serving.
        assert learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=5).step == 7
        # Reflection is off unless enabled.
        with pytest.raises(grpc.RpcError) as err:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    log = server.log()
    assert SECRET in log and "Traceback" in log
    metrics = urllib.request.urlopen(f"http://localhost:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'rlhf_mesh_rpcs_total{code="INTERNAL",method="Pause",service="probe"} 1.0' in metrics
    assert 'rlhf_mesh_rpcs_total{code="OK",method="GetStatus",service="probe"} 1.0' in metrics


def test_sigterm_drains_in_flight_calls_then_exits(child_server):
    server = child_server([*PROBE, "--call-s", "3", "--drain-grace-s", "20"])
    wait_until_serving(server.address, timeout_s=60, alive=server.alive)
    with grpc.insecure_channel(server.address) as channel:
        in_flight = learner_pb2_grpc.LearnerServiceStub(channel).SaveCheckpoint.future(
            learner_pb2.SaveCheckpointRequest(), timeout=30
        )
        wait_for(lambda: "SaveCheckpoint started" in server.log(), what="the call is in flight")
        server.process.send_signal(signal.SIGTERM)
        assert in_flight.result().path == "/tmp/ckpt"
    assert server.process.wait(timeout=30) == 0
    log = server.log()
    assert "draining" in log and "closed" in log and "stopped" in log


def test_invalid_settings_exit_with_a_message_naming_the_key(child_server, tmp_path):
    config = tmp_path / "probe.yaml"
    config.write_text("port: 1\nbogus_key: 5\n")
    server = child_server([*PROBE, "--config", str(config)])
    assert server.process.wait(timeout=60) == 2
    assert "bogus_key: Extra inputs are not permitted" in server.log()


def test_open_admin_rpcs_are_warned_about_and_the_metrics_port_follows_the_host(child_server):
    """Without tokens on a reachable address, the log says which admin RPCs anyone may call."""
    exposed = child_server(PROBE)
    wait_until_serving(exposed.address, timeout_s=60, alive=exposed.alive)
    warning = next(line for line in exposed.log().splitlines() if "admin RPCs" in line)
    assert " WARNING " in warning and "SaveCheckpoint, Pause, Resume" in warning and "tokens_file" in warning
    local = child_server([*PROBE, "--host", "127.0.0.1"])
    wait_until_serving(f"127.0.0.1:{local.port}", timeout_s=60, alive=local.alive)
    assert "admin RPCs" not in local.log()
    listening = [c.laddr for c in psutil.Process(local.process.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert {port for _, port in listening} == {local.port, local.metrics_port}
    for ip, port in listening:  # gRPC listens on 127.0.0.1 as ::ffff:127.0.0.1
        address = ipaddress.ip_address(ip)
        assert (getattr(address, "ipv4_mapped", None) or address).is_loopback, (ip, port)
