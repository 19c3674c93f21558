"""The PPO learner: one step is rollouts -> reference and values -> advantages -> PPO epochs -> push.

`Trainer.run()` loops over the steps; `Trainer.train(rollouts)` is the PPO update itself and
needs no service. Policy version k is the policy after step k (version 0: the initial policy
every replica loaded at start) — plus an offset when the learner finds the replicas at other
versions (it resumed from a checkpoint older than their last push, or they restarted): it
then pushes its weights above their versions, which only go up, and counts on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from rlhf_mesh.clients.channel import client_credentials
from rlhf_mesh.clients.generation import AsyncGenerationClient, GenerationClient
from rlhf_mesh.clients.reward import AsyncRewardClient
from rlhf_mesh.clients.weights import CollectiveSender, push_to_replicas, resolve
from rlhf_mesh.hub import resolve_model
from rlhf_mesh.services.learner import ppo
from rlhf_mesh.services.learner.data import PromptDataset
from rlhf_mesh.services.learner.distributed import World
from rlhf_mesh.services.learner.errors import LearnerError
from rlhf_mesh.services.learner.models import Batch, forward, load_models, make_batch
from rlhf_mesh.services.learner.report import plot, summary
from rlhf_mesh.services.learner.rollouts import RETRYABLE, Collected, Retry, Rollout, collect
from rlhf_mesh.services.learner.settings import LearnerSettings
from rlhf_mesh.weights import TORCH_DTYPES, state_dict_of

log = logging.getLogger(__name__)


def _padded(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def _rng_state() -> dict[str, object]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under output_dir/checkpoints (half-written ones are hidden `.partial`)."""
    done = sorted(p for p in (output_dir / "checkpoints").glob("step-*") if (p / "trainer.pt").is_file())
    return done[-1] if done else None


def _component_means(rollouts: list[Rollout]) -> dict[str, float]:
    """`rewards/<component>_mean` of a composite reward, over the rollouts it applied to."""
    scores: dict[str, list[float]] = {}
    for rollout in rollouts:
        for name, score in rollout.components.items():
            scores.setdefault(name, []).append(score)
    return {f"rewards/{name}_mean": sum(values) / len(values) for name, values in sorted(scores.items())}


class Trainer:
    """Models, optimizer and KL controller of one PPO run, and the loop that drives it."""

    def __init__(self, settings: LearnerSettings) -> None:
        self.settings = s = settings
        self._seed_everything(s.seed)
        self.dataset = PromptDataset.load(s.prompts, s.prompt_field, s.messages_field, s.seed, s.reference_field)
        self.device = World.device(s.device)
        self.world = World.join(self.device, s.dist_timeout_s)
        if s.gradient_accumulation_steps % self.world.size:
            raise LearnerError(f"gradient_accumulation_steps ({s.gradient_accumulation_steps}) must be a multiple "
                               f"of the number of ranks ({self.world.size}): each rank takes as many micro-batches")
        resume = s.resume_from or (latest_checkpoint(s.output_dir) if s.resume else None)
        # Hub ids resolve once, here: a wrong one stops the start with one line (ModelNotFound).
        self.policy_path = resolve_model(s.policy)
        reference = resolve_model(s.reference) if s.reference else None
        critic = (resume / "critic" if resume is not None and (resume / "critic").is_dir()
                  else resolve_model(s.critic) if s.critic else None)
        self.models = load_models(
            str(resume / "policy") if resume is not None else self.policy_path,
            reference or (self.policy_path if resume is not None else None),  # the reference stays the initial policy
            critic, s.value_head, with_critic=s.advantage_estimator == "gae", device=self.device,
        )
        self.parameters = [p for m in (self.models.policy, self.models.critic) if m is not None
                           for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=s.learning_rate, eps=1e-5)
        self.kl_ctl = ppo.KLController(s.kl_coef, s.target_kl, s.kl_horizon)
        self.pad_id = self.models.policy.config.pad_token_id or 0
        self.step = 0  # steps done
        self.version_offset = 0  # policy version = step + offset; connect() moves it above the replicas' versions
        self.history: list[dict[str, float]] = []
        self.replicas = list(s.generation)  # one address per generation replica
        self._generators: list[AsyncGenerationClient] = []
        self._reward: AsyncRewardClient | None = None
        self._sender: CollectiveSender | None = None
        self._credentials = client_credentials(s.client_token_file, s.client_tls_ca, s.client_tls_cert,
                                               s.client_tls_key, s.client_tls_server_name)
        self._push_dtype = torch.float32
        # The last version pushed, with its tensors in async mode (training may be changing the
        # live ones while a restarted replica is repaired); None: read the policy itself.
        self._pushed: tuple[int, dict[str, torch.Tensor] | None] | None = None
        self.max_lag = s.max_policy_lag if s.async_generation else 0
        self._prefetched: asyncio.Task[Collected] | None = None  # next step's rollouts, in async mode
        if resume is not None:
            self._restore(resume)
        # What training runs forward and backward through: the models, or DDP around them.
        self._policy, self._critic = self.world.wrap(self.models.policy), self.world.wrap(self.models.critic)

    def _restore(self, checkpoint: Path) -> None:
        """Optimizer, KL coefficient, step, history and RNG states of a checkpoint (its models are loaded)."""
        state = torch.load(checkpoint / "trainer.pt", weights_only=False)
        if self.models.critic is not None and self.models.critic.is_head:
            self.models.critic.load_state_dict(torch.load(checkpoint / "value_head.pt"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.value = state["kl_coef"]
        self.step = state["step"]
        self.history = json.loads((checkpoint / "history.json").read_text())
        if self.world.rank < len(state["rng"]):  # a rank the checkpoint's run did not have keeps its seed
            rng = state["rng"][self.world.rank]
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        log.info("resumed from %s at step %d", checkpoint, self.step)

    @property
    def version(self) -> int:
        """The policy version of the learner's current weights, as the replicas serve it."""
        return self.step + self.version_offset

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # --- services -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the clients; every replica serves the learner's weights when this returns."""
        s = self.settings
        if s.resolve_replicas:  # the replicas behind a headless Service, as they are now
            self.replicas = sorted({a for name in s.generation for a in resolve(name)})
            log.info("generation replicas: %s", ", ".join(self.replicas))
        credentials = self._credentials
        self._generators = [AsyncGenerationClient(a, timeout_s=s.rpc_timeout_s, **credentials) for a in self.replicas]
        self._reward = AsyncRewardClient(s.reward, timeout_s=s.rpc_timeout_s, **credentials)
        try:
            infos = await asyncio.gather(*(g.model_info() for g in self._generators))
            await self._reward.list_models()
        except grpc.aio.AioRpcError as err:
            raise LearnerError(f"cannot use the services {self.replicas} and {s.reward}: "
                               f"{err.code().name}: {err.details()}") from None
        dtypes = {info.dtype for info in infos}
        if len(dtypes) != 1:
            raise LearnerError(f"generation replicas serve different dtypes: {sorted(dtypes)}")
        self._push_dtype = getattr(torch, dtypes.pop())
        if self._push_dtype not in TORCH_DTYPES.values():
            raise LearnerError(f"generation replicas serve {self._push_dtype}, which cannot be pushed")
        if s.weight_transport == "collective":
            self._sender = await asyncio.to_thread(self._new_sender, self.replicas)
        served = [info.policy_version for info in infos]
        if any(v != self.version for v in served):
            # Replicas that moved on (a learner killed after a push and resumed from an older
            # checkpoint) or came back (restarted at 0) serve other weights: push the learner's
            # own, at a version above every served one, before any of them generates.
            self.version_offset = max(served) + 1 - self.step
            log.info("replicas serve policy versions %s; pushing the learner's step-%d weights as version %d",
                     sorted(set(served)), self.step, self.version)
            await asyncio.to_thread(self._push, self.version)
        if self._pushed is None and self.version > 0:  # what a replica that restarts must be given again
            self._pushed = (self.version, self._weights() if self.max_lag else None)

    async def close(self) -> None:
        """Release the clients, and the follower ranks: the run has ended."""
        self.world.broadcast(None)
        self._leave_world()
        if self._prefetched is not None:
            self._prefetched.cancel()
            with contextlib.suppress(asyncio.CancelledError, LearnerError):
                await self._prefetched
        for client in (*self._generators, self._reward):
            if client is not None:
                await client.close()
        self._close_sender()

    def _weights(self) -> dict[str, torch.Tensor]:
        """A copy of the policy's tensors as its checkpoint names them (a tied one once), in the replicas' dtype."""
        return {name: t.to(self._push_dtype, copy=True) for name, t in state_dict_of(self.models.policy).items()}

    def _push(self, version: int) -> None:
        """Every replica serves `version` = the current policy when this returns. Replicas that
        fail while they restart are pushed again, with backoff."""
        tensors = self._weights()
        send = self._send_collective if self.settings.weight_transport == "collective" else self._send_in_band
        retry, replicas = Retry(attempts=self.settings.replica_retries), self.replicas
        for attempt in itertools.count():
            failed = send(replicas, tensors, version)
            if failed is None:
                break
            failure, replicas = failed
            if attempt + 1 >= retry.attempts:
                raise LearnerError(f"weight push of version {version} failed: {failure}")
            log.warning("weight push of version %d failed: %s; retrying in %.0f s", version, failure,
                        retry.backoff(attempt))
            time.sleep(retry.backoff(attempt))
        self._pushed = (version, tensors if self.max_lag else None)

    def _send_in_band(self, replicas: list[str], tensors: dict[str, torch.Tensor],
                      version: int) -> tuple[str, list[str]] | None:
        """None when every replica took the push, else what failed and the replicas to push again.
        A refusal for good raises LearnerError."""
        pushed = push_to_replicas(replicas, tensors, version, self.settings.rpc_timeout_s, **self._credentials)
        failed = [r for r in pushed if not r.ok]
        if not failed:
            return None
        failure = "; ".join(f"{r.address}: {r.error.code().name} {r.error.details()}" for r in failed)
        if any(r.error.code() not in RETRYABLE for r in failed):
            raise LearnerError(f"weight push of version {version} failed: {failure}")
        return failure, [r.address for r in failed]

    def _send_collective(self, replicas: list[str], tensors: dict[str, torch.Tensor],
                         version: int) -> tuple[str, list[str]] | None:
        """None when the broadcast reached every replica, else what failed and the replicas to push
        again: those still below `version`. A failed broadcast leaves the group out of step (and a
        restarted replica's workers were never in it), so the retry makes a new group of them; the
        next push makes one of all the replicas again."""
        try:
            if self._sender is None:
                self._sender = self._new_sender(replicas)
            self._sender.push(tensors, version)
        except (grpc.RpcError, RuntimeError) as err:
            self._close_sender()
            failure = f"{err.code().name} {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
            below = [a for a in self.replicas if self._served_version(a) < version]
            return (failure, below) if below else None
        if replicas != self.replicas:
            self._close_sender()
        return None

    def _new_sender(self, replicas: list[str]) -> CollectiveSender:
        clients = [GenerationClient(a, **self._credentials) for a in replicas]
        return CollectiveSender(clients, self.settings.collective_address, 0, min(self.settings.rpc_timeout_s, 300.0))

    def _close_sender(self) -> None:
        if self._sender is not None:
            for client in self._sender.clients:
                client.close()
            self._sender.close()
            self._sender = None

    def _served_version(self, address: str) -> int:
        """The policy version a replica serves; -1 while it cannot be reached."""
        with GenerationClient(address, timeout_s=self.settings.rpc_timeout_s, **self._credentials) as client:
            try:
                return client.model_info().policy_version
            except grpc.RpcError:
                return -1

    async def _repair(self, client: AsyncGenerationClient) -> None:
        """A replica that came back serving an older version (it restarted) gets the last pushed weights.

        Raises the replica's gRPC error; the caller retries.
        """
        if self._pushed is None:  # version 0: a restarted replica serves it from disk too
            return
        version, tensors = self._pushed
        served = (await client.model_info()).policy_version
        if served >= version:
            return
        log.warning("generation replica %s serves policy version %d, not %d: pushing the weights again",
                    client.address, served, version)
        if tensors is None:  # sync mode: nothing trains while rollouts are collected
            tensors = self._weights()
        result, = await asyncio.to_thread(push_to_replicas, [client.address], tensors, version,
                                          self.settings.rpc_timeout_s, **self._credentials)
        if not result.ok:
            raise result.error

    # --- one step ---------------------------------------------------------------------------

    def _collect(self, step: int) -> asyncio.Task[Collected]:
        """Rollouts for `step` from a policy no older than the staleness bound allows."""
        s = self.settings
        return asyncio.create_task(collect(
            self._generators, self._reward, self.dataset.batch(step, s.batch_size), n=s.num_samples_per_prompt,
            max_tokens=s.response_length, temperature=s.temperature,
            seed=s.seed * 1_000_003 + step * s.rollouts_per_step,
            min_policy_version=max(0, step + self.version_offset - self.max_lag), reward_model=s.reward_model,
            timeout_s=s.rpc_timeout_s, references=self.dataset.batch_references(step, s.batch_size),
            retry=Retry(attempts=s.replica_retries), repair=self._repair,
        ))

    async def run_step(self) -> dict[str, float]:
        """Generate and score, train, push version step+1; returns the step's scalars.

        Async mode starts generating the next step's rollouts before this step trains, so
        they come from the policy this step starts from (one version behind the one they
        train): generation overlaps training, and no rollout is more than max_policy_lag
        versions older than the step that trains on it (the generator enforces it too).
        """
        s = self.settings
        started = time.perf_counter()
        pending = self._prefetched or self._collect(self.step)
        self._prefetched = None
        collected = await pending
        waited = time.perf_counter() - started
        lags = [self.version - r.policy_version_start for r in collected.rollouts]
        if max(lags) > self.max_lag or min(lags) < 0:  # never train on what the bound excludes
            versions = sorted({r.policy_version_start for r in collected.rollouts})
            raise LearnerError(f"rollouts of policy versions {versions} at version {self.version}: "
                               f"outside max_policy_lag={self.max_lag}")
        if s.async_generation and self.step + 1 < s.steps:
            self._prefetched = self._collect(self.step + 1)
        scalars = await asyncio.to_thread(self.train, collected.rollouts)
        pushed = time.perf_counter()
        await asyncio.to_thread(self._push, self.version + 1)
        self.step += 1
        done = time.perf_counter()
        scalars.update({
            "time/generate_s": collected.generate_s, "time/score_s": collected.score_tail_s,
            "time/wait_rollouts_s": waited, "time/push_s": done - pushed, "time/step_s": done - started,
            "charts/samples_per_s": len(collected.rollouts) / (done - started),
            "policy/version": float(self.version),
            "async/lag_mean": sum(lags) / len(lags), "async/lag_max": float(max(lags)),
            **{f"async/lag_{k}_share": lags.count(k) / len(lags) for k in range(self.max_lag + 1)},
        })
        self.history.append({"step": float(self.step), **scalars})
        return scalars

    def train(self, rollouts: list[Rollout]) -> dict[str, float]:
        """The PPO update on one step's rollouts (in prompt, sample order), on every rank."""
        self.world.broadcast(("train", self.step, rollouts))
        return self._train(rollouts)

    def follow(self) -> None:
        """A follower rank: train on the leader's rollouts, send it the RNG states, until the run ends."""
        while (message := self.world.broadcast()) is not None:
            kind, self.step, rollouts = message
            if kind == "train":
                self._train(rollouts)
            else:
                self.world.gather(_rng_state())
        self._leave_world()

    def _leave_world(self) -> None:
        # DDP modules outliving their process group can hang when they are freed.
        self._policy, self._critic = self.models.policy, self.models.critic
        self.world.close()

    def _train(self, rollouts: list[Rollout]) -> dict[str, float]:
        s = self.settings
        began = time.perf_counter()
        batch = make_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                           self.pad_id).to(self.device)
        mask = batch.mask
        scores = torch.tensor([r.score for r in rollouts], device=self.device)
        finished = torch.tensor([r.finished for r in rollouts], device=self.device)
        if s.missing_eos_penalty is not None:
            scores = scores - s.missing_eos_penalty * (~finished).float()
        sampler_logprobs = _padded([r.sampler_logprobs for r in rollouts], mask.shape[1]).to(self.device)

        # Log-probs of the learner's own policy anchor the ratio; the reference gives the KL.
        # Each rank computes its micro-batches' rows; the sum over ranks fills in the rest.
        with torch.no_grad():
            old_logprobs, ref_logprobs = torch.zeros_like(mask), torch.zeros_like(mask)
            values = torch.zeros_like(mask) if self.models.critic is not None else None
            for rows in self._micro_batches(len(batch))[self.world.rank::self.world.size]:
                old_logprobs[rows], ref_logprobs[rows], value = self._score_rows(batch.select(rows))
                if values is not None:
                    values[rows] = value
            for part in (old_logprobs, ref_logprobs, values):
                if part is not None:
                    self.world.sum(part)
        scored = time.perf_counter()

        kl = ppo.kl_penalty(old_logprobs, ref_logprobs, s.kl_estimator) * mask
        kl_sum = kl.sum(1)
        kl_coef = self.kl_ctl.value
        if s.advantage_estimator == "gae":
            rewards = ppo.token_rewards(scores, kl, kl_coef, mask)
            if s.whiten_rewards:
                rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = ppo.gae(rewards, values, mask, s.gamma, s.lam)
        else:
            sequence = ppo.group_advantages(scores - kl_coef * kl_sum, s.num_samples_per_prompt,
                                            s.advantage_estimator)
            advantages, returns = sequence[:, None] * mask, None
        if s.whiten_advantages:
            advantages = ppo.masked_whiten(advantages, mask)
        weights = None
        if s.tis_cap is not None:
            weights = torch.clamp(torch.exp(old_logprobs - sampler_logprobs), max=s.tis_cap)
        mismatch = (old_logprobs - sampler_logprobs).abs() * mask

        stats = self._ppo_epochs(batch, old_logprobs, values, advantages, returns, weights)
        self.kl_ctl.update(float(kl_sum.mean()), len(rollouts))
        lengths = mask.sum(1)
        return {
            "charts/reward_mean": float(scores.mean()), "charts/reward_std": float(scores.std()),
            "charts/response_length": float(lengths.mean()), "charts/eos_rate": float(finished.float().mean()),
            "objective/kl": float(kl_sum.mean()), "objective/kl_coef": kl_coef,
            "objective/rlhf_reward": float((scores - kl_coef * kl_sum).mean()),
            "sampling/logprob_diff_mean": float(ppo.masked_mean(mismatch, mask)),
            "sampling/logprob_diff_max": float(mismatch.max()),
            **stats,
            "time/reference_values_s": scored - began, "time/train_s": time.perf_counter() - scored,
            **_component_means(rollouts),
        }

    def _micro_batches(self, count: int, order: torch.Tensor | None = None) -> list[torch.Tensor]:
        rows = torch.arange(count) if order is None else order
        return list(rows.split(self.settings.micro_batch_size))

    def _score_rows(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Policy log-probs, reference log-probs and values of a micro-batch (no gradients)."""
        t, critic = self.settings.temperature, self.models.critic
        _, logprobs, hidden = forward(self.models.policy, batch, t, hidden=critic is not None and critic.is_head)
        _, ref_logprobs, _ = forward(self.models.reference, batch, t)
        values = critic(batch, hidden) if critic is not None else None
        return logprobs, ref_logprobs, values

    def _ppo_epochs(self, batch: Batch, old_logprobs: torch.Tensor, old_values: torch.Tensor | None,
                    advantages: torch.Tensor, returns: torch.Tensor | None,
                    weights: torch.Tensor | None) -> dict[str, float]:
        s, policy, critic = self.settings, self._policy, self._critic
        head = self.models.critic is not None and self.models.critic.is_head
        share = s.gradient_accumulation_steps // self.world.size  # micro-batches of a mini-batch per rank
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + self.step)
        record: dict[str, list[torch.Tensor]] = {}

        def note(name: str, value: torch.Tensor) -> None:
            record.setdefault(name, []).append(value.detach())

        for _ in range(s.num_ppo_epochs):
            order = torch.randperm(len(batch), generator=generator)
            for mini in order.split(len(batch) // s.num_mini_batches):
                self.optimizer.zero_grad(set_to_none=True)
                mine = self._micro_batches(len(batch), mini)[self.world.rank * share:(self.world.rank + 1) * share]
                for i, rows in enumerate(mine):
                    with self.world.accumulating([policy, critic], last=i == share - 1):
                        micro = batch.select(rows.to(self.device))
                        mask = micro.mask
                        logits, logprobs, hidden = forward(policy, micro, s.temperature, hidden=head)
                        pg_loss, pg = ppo.policy_loss(logprobs, old_logprobs[rows], advantages[rows], mask,
                                                      s.cliprange, None if weights is None else weights[rows])
                        entropy = ppo.masked_mean(ppo.entropy(logits), mask)
                        loss = pg_loss - s.ent_coef * entropy
                        if critic is not None:
                            vf_loss, vf = ppo.value_loss(critic(micro, hidden), old_values[rows], returns[rows],
                                                         mask, s.cliprange_value)
                            loss = loss + s.vf_coef * vf_loss
                            note("losses/value_loss", vf_loss)
                            note("losses/value_clipfrac", vf["clipfrac"])
                        (loss / share).backward()  # and DDP averages over the ranks: the mean of all micro-batches
                    note("losses/policy_loss", pg_loss)
                    note("losses/approx_kl", pg["approx_kl"])
                    note("losses/clipfrac", pg["clipfrac"])
                    note("losses/ratio", pg["ratio"])
                    note("objective/entropy", entropy)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, s.max_grad_norm)
                note("losses/grad_norm", grad_norm)
                self.optimizer.step()
        # Each scalar's mean over every micro-batch of every rank.
        names = sorted(record)
        totals = self.world.sum(torch.tensor([[float(torch.stack(record[n]).sum()), len(record[n])] for n in names],
                                             dtype=torch.float64, device=self.device))
        return {name: total / count for name, (total, count) in zip(names, totals.tolist(), strict=True)}

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write the run's state under output_dir/checkpoints/step-N, atomically (write, fsync, rename)."""
        from transformers import AutoTokenizer

        root = self.settings.output_dir / "checkpoints"
        final = root / f"step-{self.step:06d}"
        partial = root / f".{final.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.models.policy.save_pretrained(partial / "policy")
        AutoTokenizer.from_pretrained(self.policy_path).save_pretrained(partial / "policy")
        critic = self.models.critic
        if critic is not None and critic.is_head:
            torch.save(critic.state_dict(), partial / "value_head.pt")
        elif critic is not None:
            critic.model.save_pretrained(partial / "critic")
        self.world.broadcast(("rng", self.step, None))
        torch.save({
            "step": self.step, "optimizer": self.optimizer.state_dict(), "kl_coef": self.kl_ctl.value,
            "rng": self.world.gather(_rng_state()),  # one per rank
        }, partial / "trainer.pt")
        (partial / "history.json").write_text(json.dumps(self.history))
        for path in partial.rglob("*"):
            if path.is_file():
                with path.open("rb") as f:
                    os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        directory = os.open(root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return final

    # --- the run ----------------------------------------------------------------------------

    def finish(self) -> tuple[Path | None, str]:
        """Plot and summary of the run so far, written under output_dir."""
        out = self.settings.output_dir
        table = summary(self.history)
        (out / "summary.txt").write_text(table + "\n")
        (out / "history.json").write_text(json.dumps(self.history, indent=1))
        return (plot(self.history, out / "ppo.png") if self.history else None), table
