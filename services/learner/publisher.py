"""Publishing the learner's policy to every generation replica, and keeping them on it.

A `PolicyPublisher` owns the replica list and their clients, both weight transports (in-band
gRPC to every replica in parallel, or one gloo broadcast to all of them), and the last version
it published. Replicas that fail while they restart are pushed again with the learner's one
retry policy; a replica that comes back at an older version is repaired before it generates.

Versions: policy version k + offset is the learner's policy after step k. Version 0 is the
policy every replica loaded at start; the offset moves the versions above the replicas' own
when the learner finds them elsewhere (it resumed from a checkpoint older than their last
push, or they restarted), since served versions only go up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from rlhf_mesh.clients.channel import resolve
from rlhf_mesh.clients.generation import AsyncGenerationClient, GenerationClient
from rlhf_mesh.clients.push import CollectiveSender, ReplicaResult, send_update
from rlhf_mesh.services.learner.errors import LearnerError
from rlhf_mesh.services.learner.retry import RETRYABLE, Retry, failure, learner_client
from rlhf_mesh.services.learner.settings import LearnerSettings
from rlhf_mesh.v1 import generation_pb2
from rlhf_mesh.weights import TORCH_DTYPES, Snapshot, Update, full_push, prepare

# The policy's tensors as a push sends them, and the LoRA adapter's config when they are an adapter's.
Weights = tuple[dict[str, torch.Tensor], generation_pb2.LoraAdapter | None]

log = logging.getLogger(__name__)


class PushFailed(grpc.RpcError):
    """A push that some replicas did not take: the first one's status, every replica named."""

    def __init__(self, code: grpc.StatusCode, message: str, replicas: list[str]) -> None:
        super().__init__(message)
        self._code, self._message, self.replicas = code, message, replicas

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message


@dataclass
class PushReport:
    """What a publish sent: bytes on the wire, what full pushes would have sent, and to whom a delta went."""

    sent_bytes: int = 0
    full_bytes: int = 0
    delta_replicas: list[str] = field(default_factory=list)


class PolicyPublisher:
    """The generation replicas as the learner sees them: whom to push to, how, and what they were given."""

    def __init__(self, settings: LearnerSettings, policy_weights: Callable[[], Weights], keep_snapshots: bool) -> None:
        self.settings = s = settings
        self.policy_weights = policy_weights  # the trainer's push_weights
        self.replicas = list(s.generation)  # one address per replica
        self.generators: list[AsyncGenerationClient] = []
        self.offset = 0
        # The version every replica was last given, with its tensors where they are kept (deltas are
        # computed against them; in async mode training changes the live ones before a restarted
        # replica is repaired). None: version 0, which every replica loads from disk.
        self.published: Snapshot | None = None
        self.deltas = s.weight_delta and s.weight_transport == "grpc" and not s.adapter_pushes
        self.keep_tensors = keep_snapshots or self.deltas
        self.dtype = torch.float32  # the replicas' own, read at connect()
        self._credentials = s.credentials()
        self._sender: CollectiveSender | None = None
        self._retry = Retry(attempts=s.replica_retries)

    def _client(self, address: str) -> GenerationClient:
        return learner_client(GenerationClient, address, self.settings)

    def version(self, step: int) -> int:
        """The policy version of the learner's weights after `step` steps, as the replicas serve it."""
        return step + self.offset

    def min_version(self, step: int, max_lag: int) -> int:
        """The oldest policy version step `step`'s rollouts may come from."""
        return max(0, self.version(step) - max_lag)

    async def connect(self, step: int) -> None:
        """Open the clients; every replica serves the learner's step-`step` weights when this returns."""
        s = self.settings
        if s.resolve_replicas:  # the replicas behind a headless Service, as they are now
            self.replicas = sorted(self._resolved())
            log.info("generation replicas: %s", ", ".join(self.replicas))
        self.generators = [learner_client(AsyncGenerationClient, a, s) for a in self.replicas]
        try:
            infos = await asyncio.gather(*(g.model_info(timeout_s=s.services_wait_s, wait_for_ready=True)
                                           for g in self.generators))
        except grpc.aio.AioRpcError as err:
            raise LearnerError(f"cannot use the generation replicas {self.replicas}: {failure(err)}") from None
        dtypes = {info.dtype for info in infos}
        if len(dtypes) != 1:
            raise LearnerError(f"generation replicas serve different dtypes: {sorted(dtypes)}")
        self.dtype = getattr(torch, dtypes.pop())
        if self.dtype not in TORCH_DTYPES.values():
            raise LearnerError(f"generation replicas serve {self.dtype}, which cannot be pushed")
        if s.adapter_pushes:
            short = [a for a, info in zip(self.replicas, infos, strict=True) if info.max_lora_rank < s.lora_r]
            if short:
                raise LearnerError(f"lora_publish adapter: replicas {short} serve no LoRA adapters of rank "
                                   f"{s.lora_r} (start them with enable_lora and max_lora_rank >= {s.lora_r})")
        if s.weight_transport == "collective":
            self._sender = await asyncio.to_thread(self._new_sender, self.replicas)
        served = [info.policy_version for info in infos]
        if any(v != self.version(step) for v in served):
            # Replicas that moved on (a learner killed after a push and resumed from an older
            # checkpoint) or came back (restarted at 0) serve other weights: push the learner's
            # own, at a version above every served one, before any of them generates.
            self.offset = max(served) + 1 - step
            log.info("replicas serve policy versions %s; pushing the learner's step-%d weights as version %d",
                     sorted(set(served)), step, self.version(step))
            await self.publish(self.version(step))
        elif self.version(step) > 0:  # what a replica that restarts must be given again
            version = self.version(step)
            if self.keep_tensors:
                tensors, adapter = self.weights()
                self.published = self._kept(await asyncio.to_thread(prepare, tensors, version, None, adapter))
            else:  # nothing to hash: no delta is computed against it
                self.published = Snapshot(version, {}, generation_pb2.WeightManifest(policy_version=version))

    async def close(self) -> None:
        for client in self.generators:
            await client.close()
        self._close_sender()

    def weights(self) -> Weights:
        """What a push sends, in the replicas' dtype (`prepare` copies what it keeps): the policy's
        tensors as its checkpoint names them (a tied one once), or its LoRA adapter's and its config."""
        tensors, adapter = self.policy_weights()
        return {name: t.to(self.dtype) for name, t in tensors.items()}, adapter

    async def publish(self, version: int) -> PushReport:
        """Every replica serves `version` = the current policy when this returns. Replicas that
        fail while they restart are pushed again, with backoff; a refusal raises LearnerError."""
        s = self.settings
        if s.resolve_replicas:
            await self._adopt_new_replicas()
        base = self.published if self.deltas and self.published is not None else None
        tensors, adapter = self.weights()
        update = await asyncio.to_thread(prepare, tensors, version, base, adapter)
        send = self._send_collective if s.weight_transport == "collective" else self._send_in_band
        pending, report = list(self.replicas), PushReport()

        async def attempt(_: int) -> None:
            nonlocal pending
            try:
                await asyncio.to_thread(send, pending, update, report)
            except PushFailed as err:
                pending = err.replicas
                raise

        await self._retry.call(attempt, lambda _: f"weight push of version {version} failed")
        self.published = self._kept(update)
        return report

    def _resolved(self) -> set[str]:
        """Every address the `generation` names resolve to now."""
        return {a for name in self.settings.generation for a in resolve(name)}

    async def _adopt_new_replicas(self) -> None:
        """Replicas behind the headless Service that were not there at connect() (the autoscaler's)
        get this push and generate from the next step on. One that caught up from a peer holds
        the last version, so its first push is a delta. None is dropped: one that is restarting
        is out of DNS for a while."""
        s = self.settings
        try:
            resolved = await asyncio.to_thread(self._resolved)
        except OSError as err:
            log.warning("cannot resolve the generation replicas (%s); pushing to the known ones", err)
            return
        for address in sorted(resolved - set(self.replicas)):
            log.info("generation replica %s joined; it gets this push and generates from the next step", address)
            self.replicas.append(address)
            self.generators.append(learner_client(AsyncGenerationClient, address, s))
            self._close_sender()  # a new group of every replica for the next broadcast

    def _kept(self, update: Update) -> Snapshot:
        """What is remembered of a published version: its manifest, and its tensors when kept."""
        snapshot = update.snapshot
        return snapshot if self.keep_tensors else Snapshot(snapshot.version, {}, snapshot.manifest)

    def _send_in_band(self, replicas: list[str], update: Update, report: PushReport) -> None:
        """Raises PushFailed naming the replicas that did not take the push."""
        results = send_update(replicas, update, self.settings.rpc_timeout_s, retries=False, **self._credentials)
        self._count(results, update, report)
        failed = [r for r in results if not r.ok]
        if failed:
            codes = [r.error.code() for r in failed]
            code = next((c for c in codes if c not in RETRYABLE), codes[0])
            raise PushFailed(code, "; ".join(f"{r.address}: {failure(r.error)}" for r in failed),
                             [r.address for r in failed])

    @staticmethod
    def _count(results: list[ReplicaResult], update: Update, report: PushReport) -> None:
        for result in results:
            refused = result.delta_refused
            if refused is not None and refused.code() != grpc.StatusCode.FAILED_PRECONDITION:  # not a base it lacks
                log.warning("%s refused the delta push (%s); it got the full push", result.address, failure(refused))
            if result.ok:
                report.sent_bytes += result.response.received_bytes
                report.full_bytes += update.full.sent_bytes
                if result.delta:
                    report.delta_replicas.append(result.address)

    def _send_collective(self, replicas: list[str], update: Update, report: PushReport) -> None:
        """One broadcast to every replica of `replicas`. A failed one leaves the group out of step
        (and a restarted replica's workers were never in it), so it raises PushFailed naming the
        replicas still below `version`; their retry makes a new group of them, and the next push
        one of all the replicas again."""
        try:
            if self._sender is None:
                self._sender = self._new_sender(replicas)
            self._sender.push(update.snapshot.tensors, update.snapshot.version, update.full.manifest)
            report.sent_bytes += update.full.sent_bytes * len(replicas)
            report.full_bytes += update.full.sent_bytes * len(replicas)
        except (grpc.RpcError, RuntimeError) as err:
            self._close_sender()
            below = [a for a in self.replicas if self._served_version(a) < update.snapshot.version]
            if below:  # whatever failed, a new group of these replicas is the retry
                raise PushFailed(grpc.StatusCode.UNAVAILABLE, failure(err) if isinstance(err, grpc.RpcError)
                                 else str(err), below) from None
            return
        if replicas != self.replicas:
            self._close_sender()

    def _new_sender(self, replicas: list[str]) -> CollectiveSender:
        clients = [self._client(a) for a in replicas]
        return CollectiveSender(clients, self.settings.collective_host(replicas[0]), 0,
                                min(self.settings.rpc_timeout_s, 300.0))

    def _close_sender(self) -> None:
        if self._sender is not None:
            for client in self._sender.clients:
                client.close()
            self._sender.close()
            self._sender = None

    def _served_version(self, address: str) -> int:
        """The policy version a replica serves; -1 while it cannot be reached."""
        with self._client(address) as client:
            try:
                return client.model_info().policy_version
            except grpc.RpcError:
                return -1

    async def repair(self, client: AsyncGenerationClient) -> None:
        """A replica that came back serving an older version (it restarted) gets the last published
        weights. Raises the replica's gRPC error; the caller retries."""
        if self.published is None:  # version 0: a restarted replica serves it from disk too
            return
        published = self.published
        served = (await client.model_info()).policy_version
        if served >= published.version:
            return
        log.warning("generation replica %s serves policy version %d, not %d: pushing the weights again",
                    client.address, served, published.version)
        # Sync mode keeps no tensors: nothing trains while rollouts are collected, the policy is them.
        # (Async mode keeps them: the policy trains meanwhile, and under FSDP2 its ranks are busy.)
        if published.tensors:
            tensors = published.tensors
            adapter = published.manifest.lora_adapter if published.manifest.HasField("lora_adapter") else None
        else:
            tensors, adapter = self.weights()
        full = Update(published, full_push(tensors, published.version, published, adapter), None)  # digests reused
        result, = await asyncio.to_thread(send_update, [client.address], full, self.settings.rpc_timeout_s,
                                          retries=False, **self._credentials)
        if not result.ok:
            raise result.error
