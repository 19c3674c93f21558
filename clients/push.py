"""Pushing a learner's weights into running GenerationServices.

- `GenerationClient.push_weights(weights, version)`: in-band over gRPC to one replica (a
  manifest, then chunks of at most 4 MiB); works anywhere gRPC does.
- `push_to_replicas(addresses, weights, version, base=...)`: in-band to many replicas in
  parallel (a headless Service's DNS name resolves to all of them), hashed once; with a base,
  only what changed since (a delta push, XOR + zstd per tensor), falling back to the full push
  for a replica that cannot take it. Every replica gets its own result.
- `CollectiveSender(clients, ...).push(weights, version)`: to every replica of its group at
  once. gRPC carries the control and the manifest while the bytes travel by torch.distributed
  (gloo) broadcast from this process (rank 0) to every engine worker of every replica.

`weights` is a transformers model (sent as its checkpoint names its tensors: a tied parameter
once, fused experts split back), any module, or a state dict, in the dtype the service serves.
A state dict may name its tensors as the checkpoint does or as transformers does at run time
(`model.state_dict()`: GPT-NeoX's `lm_head.weight` for `embed_out.weight`, a mixture of
experts' fused `mlp.experts.gate_up_proj`): the replica converts them with transformers' own
mapping. A tied parameter may appear under both of its names (`lm_head.weight` and the
embedding's) as long as both hold the same bytes. Versions only go
up: a push at a version not above the served one gets FAILED_PRECONDITION, so retrying a
push is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

import grpc
import torch

from rlhf_mesh.clients.channel import TlsConfig, resolve
from rlhf_mesh.clients.generation import GenerationClient
from rlhf_mesh.processes import free_port
from rlhf_mesh.v1 import generation_pb2
from rlhf_mesh.weights import Snapshot, Update, gloo_group, manifest, prepare, state_dict_of


@dataclass
class ReplicaResult:
    """The outcome of a push to one replica: a response, or the error it got."""

    address: str
    response: generation_pb2.PushWeightsResponse | None = None
    error: grpc.RpcError | None = None
    delta: bool = False  # the replica took the delta push, not the full one
    delta_refused: grpc.RpcError | None = None  # why it got the full push instead

    @property
    def ok(self) -> bool:
        return self.error is None


def push_to_replicas(targets: str | Sequence[str], weights: torch.nn.Module | dict[str, torch.Tensor],
                     version: int, timeout_s: float = 600.0, *, base: Snapshot | None = None,
                     tls: TlsConfig | None = None, token: str | None = None) -> list[ReplicaResult]:
    """In-band push to every replica in parallel; a replica that fails is reported, never skipped.

    With `base` (the `Update.snapshot` of the version these replicas were pushed last), each
    replica gets only what changed since; one that cannot take the delta (it serves another
    version, or holds no full copy of it) gets the full push. The digests are computed once.
    `token` needs the admin role where the replicas check tokens.
    """
    addresses = resolve(targets) if isinstance(targets, str) else list(targets)
    return send_update(addresses, prepare(state_dict_of(weights), version, base), timeout_s, tls=tls, token=token)


def send_update(addresses: Sequence[str], update: Update, timeout_s: float = 600.0, *,
                tls: TlsConfig | None = None, token: str | None = None, retries: bool = True) -> list[ReplicaResult]:
    """`update` to every replica in parallel: its delta where it has one, and the full push to a
    replica that refuses the delta (so correctness never depends on it). `retries`: see open_channel."""
    def one(address: str) -> ReplicaResult:
        with GenerationClient(address, tls=tls, token=token, retries=retries) as client:
            try:
                refused = None
                if update.delta is not None:
                    try:
                        return ReplicaResult(address, response=client.push(update.delta, timeout_s), delta=True)
                    except grpc.RpcError as err:
                        if err.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                            raise
                        refused = err
                return ReplicaResult(address, response=client.push(update.full, timeout_s), delta_refused=refused)
            except grpc.RpcError as err:
                return ReplicaResult(address, error=err)

    with ThreadPoolExecutor(max_workers=max(1, len(addresses))) as pool:
        return list(pool.map(one, addresses))


class CollectiveSender:
    """Rank 0 of a gloo group that every worker of `clients`' replicas joins.

    After a failed push (a refused manifest, a timeout) the group may be out of step, so the
    sender refuses further pushes: make a new one (on a new port). `master_port` 0 picks a free one.
    """

    def __init__(self, clients: Sequence[GenerationClient], master_address: str, master_port: int = 0,
                 timeout_s: float = 60.0) -> None:
        if master_port == 0:
            master_port = free_port(master_address)
        self.clients = list(clients)
        self.timeout_s = timeout_s
        workers = [c.model_info().worker_count for c in self.clients]
        world_size = 1 + sum(workers)
        offsets = [1 + sum(workers[:i]) for i in range(len(workers))]
        self._pool = ThreadPoolExecutor(max_workers=len(self.clients) + 1)  # the calls and the broadcasts
        self._failed: int | None = None  # the version whose push failed
        joins = [
            self._pool.submit(client.stub.InitWeightTransfer, generation_pb2.InitWeightTransferRequest(
                master_address=master_address, master_port=master_port, world_size=world_size,
                rank_offset=offset, backend=generation_pb2.COLLECTIVE_BACKEND_GLOO, timeout_ms=int(timeout_s * 1000),
            ), timeout=timeout_s * 2)
            for client, offset in zip(self.clients, offsets, strict=True)
        ]
        # Workers wait in the rendezvous for this rank; both sides must meet.
        self.group = gloo_group(master_address, master_port, 0, world_size, timeout_s)
        for join in joins:
            join.result()

    def push(self, weights: torch.nn.Module | dict[str, torch.Tensor], version: int,
             pushed: generation_pb2.WeightManifest | None = None) -> list[generation_pb2.PushWeightsCollectiveResponse]:
        """Broadcast every tensor while each replica receives, verifies and applies them.

        Raises a replica's gRPC error as soon as it has one: a refused manifest (a stale
        version, another update running) ends the push at once, not at the group's timeout.
        `pushed`: the manifest of these tensors at `version`, when the caller computed it already.
        """
        if self._failed is not None:
            raise RuntimeError(f"the push of version {self._failed} failed and this sender's group may be "
                               "out of step: make a new sender")
        tensors = state_dict_of(weights)
        request = generation_pb2.PushWeightsCollectiveRequest(manifest=pushed or manifest(tensors, version))
        calls = [self._pool.submit(c.stub.PushWeightsCollective, request, timeout=self.timeout_s * 2)
                 for c in self.clients]
        broadcast = self._pool.submit(self._broadcast, [tensor.contiguous() for tensor in tensors.values()])
        wait([broadcast, *calls], return_when=FIRST_EXCEPTION)
        errors = [call.exception() for call in calls if call.done() and call.exception() is not None]
        if errors:  # a replica that rejects the bytes has received them all; one that refused the manifest, none
            wait([broadcast], timeout=1.0)
        if not broadcast.done() or broadcast.exception() is not None:
            self._failed = version  # some worker is short of bytes
        if errors:
            raise errors[0]
        broadcast.result()
        return [call.result() for call in calls]

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Queued at once, as the workers do. A broadcast nobody receives blocks until the group's
        timeout, and so would dropping the group: this thread holds it (through self) till then."""
        for work in [self.group.broadcast(tensor, 0) for tensor in tensors]:
            work.wait()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
