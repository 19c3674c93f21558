"""The PPO update of one learner rank: models, optimizer, KL controller, and their checkpoints.

`Trainer.train(rollouts)` is one step's update and needs no service: log-probs of the policy
and the reference, values, advantages, then the PPO epochs over mini-batches (data-parallel
over the ranks of a torchrun world, with DDP or FSDP2). Rank 0 calls it; the other ranks
`follow()` and train their shares of the same step, and take part in whatever else needs
every rank (under FSDP2: gathering the weights for a push or a checkpoint, the evaluation's
KL). Collecting rollouts and publishing the weights is the run's job (run.py, rollouts.py,
publisher.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor
from transformers import get_scheduler

from rlhf_mesh.hub import resolve_model
from rlhf_mesh.services.learner import ppo
from rlhf_mesh.services.learner.checkpoints import latest_checkpoint, write_atomically
from rlhf_mesh.services.learner.distributed import World
from rlhf_mesh.services.learner.errors import LearnerError
from rlhf_mesh.services.learner.micro_batches import by_tokens
from rlhf_mesh.services.learner.models import (
    Batch,
    forward,
    layout_support,
    load_models,
    lora_dropouts,
    make_batch,
    padded,
    with_lora,
)
from rlhf_mesh.services.learner.rollouts import Rollout, component_means
from rlhf_mesh.services.learner.settings import LearnerSettings
from rlhf_mesh.v1 import generation_pb2
from rlhf_mesh.weights import lora_adapter_of, on_cpu, state_dict_of

log = logging.getLogger(__name__)


def percentiles(name: str, values: torch.Tensor) -> dict[str, float]:
    """`name_p10`, `_p50`, `_p90` and `_max` of `values` (none when it is empty)."""
    if not values.numel():
        return {}
    q = torch.quantile(values.float(), torch.tensor([0.1, 0.5, 0.9]))
    return {f"{name}_p10": float(q[0]), f"{name}_p50": float(q[1]), f"{name}_p90": float(q[2]),
            f"{name}_max": float(values.max())}


def _rng_state() -> dict[str, object]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _whole(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` on CPU, gathered on rank 0 under FSDP2 (each rank must call it); tied
    parameters stay one tensor, so `save_pretrained` writes them once."""
    gathered: dict[int, torch.Tensor] = {}
    tensors = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in gathered:
            gathered[id(tensor)] = on_cpu(tensor)
        tensors[name] = gathered[id(tensor)]
    return tensors


class Trainer:
    """Models, optimizer and KL controller of one rank of a PPO run; `step` counts the updates done."""

    def __init__(self, settings: LearnerSettings) -> None:
        self.settings = s = settings
        self._seed_everything(s.seed)
        self.device = World.device(s.device)
        self.world = World.join(self.device, s.dist_timeout_s)
        if s.max_tokens_per_micro_batch is None and s.gradient_accumulation_steps % self.world.size:
            raise LearnerError(f"gradient_accumulation_steps ({s.gradient_accumulation_steps}) must be a multiple "
                               f"of the number of ranks ({self.world.size}): each rank takes as many micro-batches")
        if s.rollouts_per_step // s.num_mini_batches < self.world.size:
            raise LearnerError(f"a mini-batch of {s.rollouts_per_step // s.num_mini_batches} rollouts cannot be "
                               f"shared by {self.world.size} ranks: fewer num_mini_batches")
        resume = s.resume_from or (latest_checkpoint(s.output_dir) if s.resume else None)
        # Hub ids resolve once, here: a wrong one stops the start with one line (ModelNotFound).
        self.policy_path = resolve_model(s.policy)
        reference = resolve_model(s.reference) if s.reference else None
        critic = (resume / "critic" if resume is not None and (resume / "critic").is_dir()
                  else resolve_model(s.critic) if s.critic else None)
        # bf16 / fp16 compute under autocast, float32 weights and optimizer state: an update of
        # lr 1e-6 relative size is below bf16's resolution (2^-8) and would round away in bf16 weights.
        self.dtype = getattr(torch, s.dtype)
        lora = None
        if s.use_peft:  # a checkpoint holds the adapter alone (PEFT's format): it goes on the initial policy
            lora = functools.partial(with_lora, adapter=str(resume / "policy") if resume is not None else None,
                                     r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout,
                                     target_modules=s.lora_target_modules)
        # FSDP2: every rank keeps a shard of each model (the optimizer is made for the shards). The
        # models load in host memory and each unit moves to the device as it is sharded, so no
        # device ever holds a whole model.
        self.sharded = s.fsdp and self.world.size > 1
        if s.fsdp and not self.sharded:
            log.warning("fsdp: one process, nothing to shard (start the learner under torchrun)")
        self.models = load_models(
            str(resume / "policy") if resume is not None and lora is None else self.policy_path,
            reference or (self.policy_path if resume is not None else None),  # the reference stays the initial policy
            critic, s.value_head, with_critic=s.advantage_estimator == "gae", with_reference=s.uses_reference,
            device=torch.device("cpu") if self.sharded else self.device, reference_dtype=self.dtype,
            gradient_checkpointing=s.gradient_checkpointing, lora=lora,
        )
        critic = self.models.critic
        if resume is not None and critic is not None and critic.is_head:
            critic.load_state_dict(torch.load(resume / "value_head.pt"))
        if self.sharded:
            for module in (self.models.reference, self.models.policy, critic):
                self.world.shard(module, self.device)
        self._trainable = torch.nn.ModuleList([m for m in (self.models.policy, critic) if m is not None])
        self.parameters = [p for p in self._trainable.parameters() if p.requires_grad]  # with LoRA: the adapter's
        self._lora_dropouts = lora_dropouts(self.models.policy)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=s.learning_rate, eps=1e-5, weight_decay=s.weight_decay)
        warmup = s.warmup_steps or math.ceil(s.warmup_ratio * s.optimizer_steps)
        self.scheduler = get_scheduler(s.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=s.optimizer_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.kl_ctl = ppo.KLController(s.kl_coef, s.target_kl, s.kl_horizon)
        self.pad_id = self.models.policy.config.pad_token_id or 0
        self.step = 0  # steps done
        self.history: list[dict[str, float]] = []  # every step's scalars, checkpointed with the run
        self.sequence_advantages: list[float] = []  # the last step's, per rollout: its tokens' mean
        if resume is not None:
            self._restore(resume)
        # What training runs forward and backward through: the (sharded) models, or DDP around them.
        self._policy, self._critic = ((self.models.policy, self.models.critic) if self.sharded else
                                      (self.world.wrap(self.models.policy), self.world.wrap(self.models.critic)))
        # How the passes see the rows: packed and with the LM head on the response tokens in chunks,
        # where these models give the same numbers so; every rank alike (FSDP2's passes are collectives).
        support = layout_support([m for m in (self.models.policy, self.models.reference) if m is not None], critic,
                                 s.padding_free, s.logprobs_chunk_size > 0)
        packs, head_apart = (bool(v) for v in self.world.sum(torch.tensor(support, dtype=torch.float64,
                                                                           device=self.device)) == self.world.size)
        self.packed = packs
        if s.padding_free and not packs:
            log.warning("padding_free: the %s attention of %s does not keep packed sequences apart; padding instead",
                        self.models.policy.config._attn_implementation, type(self.models.policy).__name__)
        self.chunk = s.logprobs_chunk_size if head_apart else 0
        if s.logprobs_chunk_size and not head_apart:
            log.warning("logprobs_chunk_size: the logits of %s are not its LM head's output alone; computing them "
                        "whole", type(self.models.policy).__name__)

    def _restore(self, checkpoint: Path) -> None:
        """Optimizer, KL coefficient, step, history and RNG states of a checkpoint (its models are loaded)."""
        state = torch.load(checkpoint / "trainer.pt", weights_only=False)
        optimizer = state["optimizer"]
        if all(isinstance(p, str) for g in optimizer["param_groups"] for p in g["params"]):
            # By parameter name, whole: it loads on any number of ranks, sharded or not.
            set_optimizer_state_dict(self._trainable, self.optimizer, optimizer,
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        else:  # a checkpoint written before they were named: by position
            self.optimizer.load_state_dict(optimizer)
        if "scheduler" in state:  # a checkpoint written before schedules were: constant, no scaling
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        self.kl_ctl.value = state["kl_coef"]
        self.step = state["step"]
        self.history = json.loads((checkpoint / "history.json").read_text())
        if self.world.rank < len(state["rng"]):  # a rank the checkpoint's run did not have keeps its seed
            rng = state["rng"][self.world.rank]
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        log.info("resumed from %s at step %d", checkpoint, self.step)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def train(self, rollouts: list[Rollout]) -> dict[str, float]:
        """The PPO update on one step's rollouts (in prompt, sample order), on every rank."""
        self.world.broadcast(("train", self.step, rollouts))
        return self._train(rollouts)

    def follow(self) -> None:
        """A follower rank: train on the leader's rollouts, and take part in its evaluations, pushes
        and checkpoints, until the run ends."""
        while (message := self.world.broadcast()) is not None:
            kind, self.step, rollouts = message
            if kind == "train":
                self._train(rollouts)
            elif kind == "kl":
                self._kl(rollouts)
            elif kind == "weights":
                self._push_weights()
            else:
                self._checkpoint_state()
        self._leave_world()

    def close(self) -> None:
        """Release the follower ranks: the run has ended."""
        self.world.broadcast(None)
        self._leave_world()

    def _leave_world(self) -> None:
        # DDP modules outliving their process group can hang when they are freed.
        self._policy, self._critic = self.models.policy, self.models.critic
        self.world.close()

    def _train(self, rollouts: list[Rollout]) -> dict[str, float]:
        s = self.settings
        began = time.perf_counter()
        batch = make_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                           self.pad_id, [r.loss_mask for r in rollouts]).to(self.device)
        mask = batch.mask
        lengths = mask.sum(1)
        scores = torch.tensor([r.score for r in rollouts], device=self.device)
        finished = torch.tensor([r.finished for r in rollouts], device=self.device)
        if s.missing_eos_penalty is not None:
            scores = scores - s.missing_eos_penalty * (~finished).float()
        if s.overlong_buffer_len is not None:
            scores = scores + ppo.overlong_penalty(lengths, s.response_length, s.overlong_buffer_len,
                                                   s.overlong_penalty)
        sampler_logprobs = padded([r.sampler_logprobs for r in rollouts], mask.shape[1]).to(self.device)

        # The learner's own log-probs anchor the ratio (the sampler's in bypass mode); the
        # reference gives the KL. Each rank computes its micro-batches' rows; the sum over ranks
        # fills in the rest.
        with torch.no_grad():
            old_logprobs = torch.zeros_like(mask)
            ref_logprobs = torch.zeros_like(mask) if s.uses_reference else None
            values = torch.zeros_like(mask) if self.models.critic is not None else None
            for rows, mine in self._rank_micro_batches(batch):
                parts = self._score_rows(batch.select(rows))
                if mine:
                    for whole, part in zip((old_logprobs, ref_logprobs, values), parts, strict=True):
                        if part is not None and whole is not None:
                            whole[rows] = part
            for whole in (old_logprobs, ref_logprobs, values):
                if whole is not None:
                    self.world.sum(whole)
        if s.rollout_correction_bypass:
            old_logprobs = sampler_logprobs
        scored = time.perf_counter()

        kl = torch.zeros_like(mask) if ref_logprobs is None else \
            ppo.kl_penalty(old_logprobs, ref_logprobs, s.kl_estimator) * mask
        kl_sum = kl.sum(1)
        kl_coef = self.kl_ctl.value
        reward_kl_coef = 0.0 if s.use_kl_loss else kl_coef
        returns = None
        if s.advantage_estimator == "gae":
            rewards = ppo.token_rewards(scores, kl, reward_kl_coef, mask)
            if s.whiten_rewards:
                rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = ppo.gae(rewards, values, mask, s.gamma, s.lam)
        elif s.advantage_estimator == "reinforce_pp":
            advantages, _ = ppo.reinforce_pp(ppo.token_rewards(scores, kl, reward_kl_coef, mask), mask, s.gamma)
        else:
            sequence = ppo.group_advantages(scores - reward_kl_coef * kl_sum, s.num_samples_per_prompt,
                                            s.advantage_estimator, s.scale_rewards)
            advantages = sequence[:, None] * mask
        if s.whitens_advantages:
            advantages = ppo.masked_whiten(advantages, mask)

        # What the loss sees: no truncated response with mask_truncated, and the rollout
        # correction's weights, its mask taking tokens out of the loss and its denominator.
        trains = torch.tensor([r.trains for r in rollouts], device=self.device)
        loss_mask = mask * trains[:, None] * (finished[:, None] if s.mask_truncated else 1)
        weights, correction = None, {}
        if not s.rollout_correction_bypass:
            correction = {f"rollout_correction/{k}": float(v)
                          for k, v in ppo.mismatch_metrics(old_logprobs, sampler_logprobs, mask).items()}
            if s.rollout_correction != "none":
                weights, keep = ppo.rollout_correction(old_logprobs, sampler_logprobs, mask, s.rollout_correction,
                                                       s.rollout_correction_level, s.correction_min,
                                                       s.rollout_correction_max)
                masked = float(1 - keep.sum() / mask.sum().clamp(min=1))
                if masked > 0.5:
                    log.warning("rollout correction: %.0f%% of the tokens are out of the loss (their sampler's "
                                "policy is too far from the learner's: a sampler at another precision or policy "
                                "version, or a different model)", 100 * masked)
                correction["rollout_correction/masked_fraction"] = masked
                correction["rollout_correction/weight_mean"] = float(ppo.masked_mean(weights, keep))
                loss_mask = loss_mask * keep

        stats = self._ppo_epochs(batch, loss_mask, old_logprobs, ref_logprobs, values, advantages, returns, weights,
                                 sampler_logprobs)
        self.kl_ctl.update(float(kl_sum.mean()), len(rollouts))
        self.sequence_advantages = ppo.masked_mean(advantages, mask, dim=-1).tolist()  # for the logged samples
        kl_scalars = {} if ref_logprobs is None else {
            "objective/kl": float(kl_sum.mean()), "objective/kl_coef": kl_coef,
            "objective/rlhf_reward": float((scores - reward_kl_coef * kl_sum).mean()),
        }
        return {
            "charts/reward_mean": float(scores.mean()), "charts/reward_std": float(scores.std()),
            "charts/response_length": float(lengths.mean()), "charts/eos_rate": float(finished.float().mean()),
            **percentiles("charts/response_length", lengths.cpu()),
            "charts/trained_token_fraction": float(loss_mask.sum() / mask.sum().clamp(min=1)),
            **kl_scalars, **correction, **stats,
            "time/reference_values_s": scored - began, "time/train_s": time.perf_counter() - scored,
            **component_means(rollouts),
        }

    def _micro_batches(self, batch: Batch, rows: torch.Tensor) -> list[torch.Tensor]:
        """This rank's micro-batches of `rows` (rows of `batch`, at least one per rank): its share
        of `micro_batch_size` rows each, or of the micro-batches cut by the token budget."""
        s, rank, size = self.settings, self.world.rank, self.world.size
        if s.max_tokens_per_micro_batch is not None:
            return [rows[part] for part in by_tokens(batch.tokens()[rows].cpu(), s.max_tokens_per_micro_batch,
                                                      size)[rank]]
        micro = rows.split(s.micro_batch_size)
        share = len(micro) // size
        return list(micro[rank * share:(rank + 1) * share])

    def _rank_micro_batches(self, batch: Batch) -> Iterator[tuple[torch.Tensor, bool]]:
        """This rank's micro-batches of a pass without gradients over `batch`, and whether each
        is its own. Under FSDP2 a forward pass is a collective, so every rank makes as many: one
        short of them passes its first micro-batch again and drops what it gives (False)."""
        if self.settings.max_tokens_per_micro_batch is not None and len(batch) >= self.world.size:  # as many each
            yield from ((rows, True) for rows in self._micro_batches(batch, torch.arange(len(batch))))
            return
        micro, size = torch.arange(len(batch)).split(self.settings.micro_batch_size), self.world.size
        end = -(-len(micro) // size) * size if self.sharded else len(micro)
        for i in range(self.world.rank, end, size):
            yield (micro[i], True) if i < len(micro) else (micro[0], False)

    def _score_rows(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Policy log-probs (None in bypass mode: the sampler's stand in), reference log-probs (None
        without a KL term) and values (None critic-free) of a micro-batch, without gradients."""
        s, critic = self.settings, self.models.critic
        head = critic is not None and critic.is_head
        logprobs = hidden = ref_logprobs = values = None
        with self._autocast():  # as in training, so that the first epoch's ratio is 1
            if not s.rollout_correction_bypass or head:
                out = forward(self.models.policy, batch, s.temperature, head, self.packed, self.chunk)
                logprobs, hidden = out.logprobs, out.hidden
            if s.uses_reference:
                ref_logprobs = self._reference_logprobs(batch)
            if critic is not None:
                values = critic(batch, hidden, self.packed)
        return logprobs, ref_logprobs, values

    def _reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """The reference's log-probs: its own model, or with LoRA the policy with the adapter disabled."""
        reference = self.models.reference
        model = reference if reference is not None else self.models.policy
        with contextlib.nullcontext() if reference is not None else model.disable_adapter():
            return forward(model, batch, self.settings.temperature, packed=self.packed, chunk=self.chunk).logprobs

    def kl(self, rollouts: list[Rollout]) -> float:
        """The mean over `rollouts` of their summed per-token KL to the reference (no update)."""
        self.world.broadcast(("kl", self.step, rollouts))
        return self._kl(rollouts)

    def _kl(self, rollouts: list[Rollout]) -> float:
        s = self.settings
        batch = make_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                           self.pad_id, [r.loss_mask for r in rollouts]).to(self.device)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for rows, mine in self._rank_micro_batches(batch):
                micro = batch.select(rows.to(self.device))
                with self._autocast():
                    logprobs = forward(self.models.policy, micro, s.temperature, packed=self.packed,
                                       chunk=self.chunk).logprobs
                    ref_logprobs = self._reference_logprobs(micro)
                if mine:
                    total += (ppo.kl_penalty(logprobs, ref_logprobs, s.kl_estimator) * micro.mask).sum()
        return float(self.world.sum(total)) / len(rollouts)

    def push_weights(self) -> tuple[dict[str, torch.Tensor], generation_pb2.LoraAdapter | None]:
        """What a push of the policy sends: its tensors as its checkpoint names them, or with
        `lora_publish: adapter` its LoRA adapter's and their config; gathered on the leader
        under FSDP2."""
        if self.sharded:
            self.world.broadcast(("weights", self.step, None))
        return self._push_weights()

    def _push_weights(self) -> tuple[dict[str, torch.Tensor], generation_pb2.LoraAdapter | None]:
        policy = self.models.policy
        return lora_adapter_of(policy) if self.settings.adapter_pushes else (state_dict_of(policy), None)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _ppo_epochs(self, batch: Batch, loss_mask: torch.Tensor, old_logprobs: torch.Tensor,
                    ref_logprobs: torch.Tensor | None, old_values: torch.Tensor | None, advantages: torch.Tensor,
                    returns: torch.Tensor | None, weights: torch.Tensor | None,
                    sampler_logprobs: torch.Tensor) -> dict[str, float]:
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + self.step)
        for module in self._lora_dropouts:  # LoRA's dropout acts in these passes only
            module.train()
        try:
            return self._epochs(batch, loss_mask, old_logprobs, ref_logprobs, old_values, advantages, returns,
                                weights, sampler_logprobs, generator)
        finally:
            for module in self._lora_dropouts:
                module.eval()

    def _epochs(self, batch: Batch, loss_mask: torch.Tensor, old_logprobs: torch.Tensor,
                ref_logprobs: torch.Tensor | None, old_values: torch.Tensor | None, advantages: torch.Tensor,
                returns: torch.Tensor | None, weights: torch.Tensor | None, sampler_logprobs: torch.Tensor,
                generator: torch.Generator) -> dict[str, float]:
        """The optimizer steps. Each micro-batch's loss is its part of its mini-batch's loss (the
        counts in agg_loss are the mini-batch's), times the ranks (DDP and FSDP2 average the
        gradients over them): the update is the same however the mini-batch is split."""
        s, policy, critic = self.settings, self._policy, self._critic
        head = self.models.critic is not None and self.models.critic.is_head
        horizon = s.response_length if s.environment is None else s.max_episode_tokens
        record: dict[str, list[torch.Tensor]] = {}
        entropies: list[torch.Tensor] = []

        def note(name: str, value: torch.Tensor) -> None:
            record.setdefault(name, []).append(value.detach())

        for epoch in range(s.num_ppo_epochs):
            order = torch.randperm(len(batch), generator=generator)
            for m, mini in enumerate(order.split(len(batch) // s.num_mini_batches)):
                counted = loss_mask[mini.to(self.device)]
                if not counted.any():  # every token out of the loss: no step (AdamW would still move weights)
                    self.scheduler.step()
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                # Dr.GRPO's normaliser is a constant: every row counts; the other modes count the rows in the loss.
                sequences = len(mini) if s.loss_aggregation == "seq-mean-token-sum-norm" else (counted.sum(1) > 0).sum()
                agg = functools.partial(ppo.agg_loss, mode=s.loss_aggregation, tokens=counted.sum(),
                                        sequences=sequences, horizon=horizon)
                parts: dict[str, torch.Tensor] = {}
                mine = self._micro_batches(batch, mini)
                for i, rows in enumerate(mine):
                    with self.world.accumulating([policy, critic], last=i == len(mine) - 1):
                        micro = batch.select(rows.to(self.device))
                        lm = loss_mask[rows]
                        with self._autocast():  # the models' passes; the losses are float32 (forward's logits are)
                            out = forward(policy, micro, s.temperature, head, self.packed, self.chunk,
                                          entropy_grad=bool(s.ent_coef))
                            logprobs, token_entropy = out.logprobs, out.entropy
                            values = critic(micro, out.hidden, self.packed) if critic is not None else None
                        pg_losses, pg = ppo.policy_loss(logprobs, old_logprobs[rows], advantages[rows], lm,
                                                        s.policy_loss, s.clip_low, s.clip_high, s.clip_ratio_c,
                                                        None if weights is None else weights[rows])
                        terms = {"losses/policy_loss": agg(pg_losses, lm)}
                        terms["objective/entropy"] = agg(token_entropy, lm)
                        loss = terms["losses/policy_loss"] - s.ent_coef * terms["objective/entropy"]
                        if s.use_kl_loss:
                            terms["losses/kl_loss"] = agg(ppo.kl_penalty(logprobs, ref_logprobs[rows],
                                                                         s.kl_estimator), lm)
                            loss = loss + self.kl_ctl.value * terms["losses/kl_loss"]
                        if critic is not None:
                            vf_losses, vf = ppo.value_loss(values, old_values[rows], returns[rows], lm,
                                                           s.cliprange_value)
                            terms["losses/value_loss"] = agg(vf_losses, lm)
                            loss = loss + s.vf_coef * terms["losses/value_loss"]
                            note("losses/value_clipfrac", vf["clipfrac"])
                        self.scaler.scale(loss * self.world.size).backward()
                    for name, term in terms.items():
                        parts[name] = parts.get(name, 0) + term.detach()
                    for name, value in pg.items():
                        note(f"losses/{name}", value)
                    if epoch == 0:  # every k-th: a bounded sample of the step's tokens for the percentiles
                        values = token_entropy.detach()[lm > 0].float().cpu()
                        entropies.append(values[::max(1, len(values) * len(mine) // 65536)])
                        if s.rollout_correction_bypass and m == 0:  # the sampler against the policy before any update
                            for name, value in ppo.mismatch_metrics(logprobs.detach(), sampler_logprobs[rows],
                                                                    micro.mask).items():
                                note(f"rollout_correction/{name}", value)
                for name, total in parts.items():  # this rank's part of the mini-batch's loss
                    note(name, total * self.world.size)  # averaged over the ranks below: their sum
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, s.max_grad_norm)
                if isinstance(grad_norm, DTensor):  # under FSDP2: the norm over every shard, on every rank
                    grad_norm = grad_norm.full_tensor()
                note("losses/grad_norm", grad_norm)
                note("charts/learning_rate", torch.tensor(self.scheduler.get_last_lr()[0]))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
        # Each scalar's mean over every mini-batch (losses) or micro-batch (the rest) of every rank.
        names = sorted(record)
        totals = self.world.sum(torch.tensor([[float(torch.stack(record[n]).sum()), len(record[n])] for n in names],
                                             dtype=torch.float64, device=self.device))
        scalars = {name: total / count for name, (total, count) in zip(names, totals.tolist(), strict=True)}
        gathered = self.world.gather(torch.cat(entropies) if entropies else torch.zeros(0))
        return {**scalars, **percentiles("objective/entropy", torch.cat(gathered))} if gathered else scalars

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write the run's state under output_dir/checkpoints/step-N, atomically."""
        from transformers import AutoTokenizer

        self.world.broadcast(("checkpoint", self.step, None))
        rng, models, optimizer = self._checkpoint_state()
        policy, critic = self.models.policy, self.models.critic

        def write(folder: Path) -> None:
            policy.save_pretrained(folder / "policy", state_dict=models.get("policy"))
            AutoTokenizer.from_pretrained(self.policy_path).save_pretrained(folder / "policy")
            if critic is not None and critic.is_head:
                torch.save(models.get("critic") or critic.state_dict(), folder / "value_head.pt")
            elif critic is not None:
                critic.model.save_pretrained(folder / "critic", state_dict=models.get("critic"))
            torch.save({"step": self.step, "optimizer": optimizer, "kl_coef": self.kl_ctl.value,
                        "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng},
                       folder / "trainer.pt")
            (folder / "history.json").write_text(json.dumps(self.history))

        return write_atomically(self.settings.output_dir / "checkpoints" / f"step-{self.step:06d}", write)

    def _checkpoint_state(self) -> tuple[list[dict[str, object]], dict[str, dict[str, torch.Tensor]], dict]:
        """On every rank, what a checkpoint holds beyond the leader's own state: every rank's RNG
        states, the sharded models gathered whole (none unsharded: they save themselves), and the
        optimizer's state by parameter name (on the leader)."""
        rng = self.world.gather(_rng_state())
        models = {}
        if self.sharded:
            models["policy"] = _whole(self.models.policy)
            critic = self.models.critic
            if critic is not None:
                models["critic"] = _whole(critic if critic.is_head else critic.model)
        optimizer = get_optimizer_state_dict(self._trainable, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return rng, models, optimizer
