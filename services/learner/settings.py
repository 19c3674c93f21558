"""Settings of the PPO learner (env prefix RLHF_MESH_LEARNER_): one flat set, TRL's names.

`rlhf-mesh train --config ppo.yaml` and `rlhf-mesh serve learner --config ppo.yaml` read
the same file; flags override it (`--kl-coef 0.1`).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FilePath, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from rlhf_mesh.settings import ServiceSettings, old_name_of, warn_renamed

log = logging.getLogger(__name__)


class LearnerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_MESH_LEARNER_")

    port: int = Field(50053, ge=0, le=65535, description="gRPC port of the LearnerService (0 picks a free one)")

    # Models.
    policy: str = Field(description="Hugging Face causal LM folder: the initial policy")
    reference: str | None = Field(None, description="reference model folder; default: a frozen copy of the policy")
    critic: str | None = Field(
        None, description="value model folder (*ForSequenceClassification weights, one label; e.g. the reward "
        "model's); default: initialised from the policy"
    )
    value_head: bool = Field(False, description="critic as a linear head on the policy instead of a separate model")
    resume_from: Path | None = Field(
        None, description="checkpoint folder (output_dir/checkpoints/step-N) to go on from: its policy, critic, "
        "optimizer, KL coefficient, step, history and RNG states"
    )
    resume: bool = Field(
        True, description="without resume_from, go on from the newest complete checkpoint in output_dir, if any "
        "(rerunning the command of a killed learner continues it)"
    )
    device: str = Field("cpu", description="torch device of the learner, e.g. cpu or cuda (under torchrun: each "
                        "rank's own GPU)")
    dist_timeout_s: float = Field(
        86400.0, gt=0, description="under torchrun: how long a rank waits for the others (the follower ranks wait "
        "out generation and pauses)"
    )

    # Services.
    generation: list[str] = Field(min_length=1, description="GenerationService HOST:PORT; repeat for replicas")
    resolve_replicas: bool = Field(
        False, description="take every address a generation name resolves to as a replica (a headless Service)"
    )
    reward: str | None = Field(None, description="RewardService HOST:PORT (needed unless an environment rewards)")
    reward_model: str = Field("", description="reward model name on the RewardService (default: its default); with "
                              "an environment, also scores each whole episode on the environment service's own")
    environment: str | None = Field(
        None, description="multi-turn episodes of this environment of the EnvironmentService replace single-turn "
        "generation: each row of `prompts` is a task (a JSON object), response_length is per turn"
    )
    environment_service: str | None = Field(
        None, description="EnvironmentService HOST:PORT (with environment, or rollout_source sessions)")
    rollout_source: Literal["prompts", "sessions"] = Field(
        "prompts", description="prompts: sample the prompt dataset (or run its tasks in the environment); sessions: "
        "train on sessions agent programs and users ran on the replicas' OpenAI-compatible ports and closed with a "
        "reward, collected by the EnvironmentService (batch_size episodes a step, each its own group)"
    )
    sessions_wait_s: float = Field(
        3600.0, gt=0, description="rollout_source sessions: how long a step waits for batch_size sessions to close"
    )
    max_turns: int | None = Field(None, ge=1, description="model turns per episode (default: the service's)")
    max_episode_tokens: int | None = Field(
        None, ge=2, description="tokens per episode, prompt included (default: the service's)"
    )
    weight_transport: Literal["grpc", "collective"] = Field(
        "grpc", description="weight pushes in-band over gRPC, or by gloo broadcast with gRPC control"
    )
    collective_address: str | None = Field(
        None, description="collective transport: this host's address as the generation workers reach it (the gloo "
        "group's store); default: the address of this host's route to the first replica (127.0.0.1 when it is local)"
    )
    weight_delta: bool = Field(
        True, description="grpc transport: push only what changed since the last push (XOR + zstd per tensor) to "
        "replicas that hold it, the full weights to the others; keeps one copy of the pushed weights"
    )
    rpc_timeout_s: float = Field(600.0, gt=0, description="deadline of each Generate, Score and push call")
    services_wait_s: float = Field(
        300.0, gt=0, description="how long the learner waits at start for the reward service and every generation "
        "replica to serve (they may still be loading their models)"
    )
    replica_retries: int = Field(
        6, ge=1, description="tries of a Generate or Score call that fails while a replica restarts (backoff 1 s, "
        "doubling to 30 s); Generate moves on to the next replica, re-pushing the weights to one that restarted"
    )
    # How the learner calls the services (the CLI's --token-file, --tls-ca, ...); tls_cert, tls_key and
    # tls_client_ca are its own server's.
    services_token_file: FilePath | None = Field(
        None, description="bearer token of the learner's calls (roles generate + admin on generation, score on reward)"
    )
    services_tls_ca: FilePath | None = Field(None, description="PEM CA of the services' certificates; turns TLS on")
    services_tls_cert: FilePath | None = Field(None, description="PEM client certificate, for mutual TLS")
    services_tls_key: FilePath | None = Field(None, description="PEM private key of services_tls_cert")
    services_tls_server_name: str | None = Field(
        None, description="name the services' certificates carry, when not the address's host (resolve_replicas "
        "dials IPs)"
    )
    client_token_file: FilePath | None = old_name_of("services_token_file")
    client_tls_ca: FilePath | None = old_name_of("services_tls_ca")
    client_tls_cert: FilePath | None = old_name_of("services_tls_cert")
    client_tls_key: FilePath | None = old_name_of("services_tls_key")
    client_tls_server_name: str | None = old_name_of("services_tls_server_name")

    # Prompts.
    prompts: Path | None = Field(None, description="prompt dataset: .jsonl or .parquet (needed unless "
                                 "rollout_source is sessions)")
    prompt_field: str = Field("prompt", description="column with the prompt text")
    messages_field: str | None = Field(None, description="column with chat messages; used instead of prompt_field")
    reference_field: str | None = Field(
        None, description="column with each prompt's reference answer, sent with its samples to the reward service "
        "(the `reference` of reward functions such as math)"
    )
    eval_prompts: Path | None = Field(
        None, description="held-out prompts (same fields as `prompts`): sampled and scored every eval_steps steps, "
        "logged as eval/*"
    )
    eval_steps: int = Field(0, ge=0, description="evaluate every N steps (0: never)")
    eval_before_training: bool = Field(
        False, description="with eval_steps, also evaluate the starting policy before the first step (logged as step 0)"
    )
    eval_kl: bool = Field(
        True, description="log eval/kl, the held-out samples' KL to the reference (a forward pass of the policy and "
        "the reference over every one; none at kl_coef 0: there is no reference)"
    )
    eval_temperature: float | None = Field(
        None, ge=0, description="sampling temperature of the evaluation (0: greedy, the most likely answer); "
        "default: temperature"
    )

    # Rollouts.
    steps: int = Field(10, ge=1, description="PPO steps (policy versions 1..steps)")
    batch_size: int = Field(16, ge=1, description="prompts per step")
    num_samples_per_prompt: int = Field(1, ge=1, description="responses per prompt (the group of GRPO/RLOO)")
    response_length: int = Field(32, ge=1, description="most tokens per response")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; the learner's log-probs use it too")
    async_generation: bool = Field(
        False, description="generate the next step's rollouts while this step trains (off-policy by one version)"
    )
    max_policy_lag: int = Field(
        1, ge=1, description="async: rollouts are at most this many policy versions older than the step using them"
    )
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="subtracted from the score of a response cut at response_length without EOS"
    )

    # Memory levers.
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype: bfloat16 / float16 run every forward and backward pass under autocast, "
        "with float32 weights and optimizer state (float16 with loss scaling); the frozen reference is stored in it"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the policy's and critic's activations in the backward pass: less memory, "
        "one more forward"
    )
    padding_free: bool = Field(
        True, description="run every pass on packed rows (the sequences one after another, position ids restarting "
        "at each) instead of padded ones; where the attention implementation would not keep packed sequences apart, "
        "the learner says so and pads"
    )
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="cut micro-batches by tokens (prompt + response) instead of rows: each within this "
        "budget (a longer sequence alone), the ranks given near-equal token sums; gradient_accumulation_steps is then "
        "unused"
    )
    logprobs_chunk_size: int = Field(
        1024, ge=0, description="apply the LM head to this many response tokens at a time (recomputed in backward), "
        "so that the logits never exist whole; 0: the model's own logits at every position"
    )
    fsdp: bool = Field(
        False, description="under torchrun: shard the policy, reference and critic over the ranks with FSDP2 "
        "(fully_shard per decoder layer) instead of a full copy on each rank (DDP)"
    )
    use_peft: bool = Field(
        False, description="train a LoRA adapter of the policy (PEFT) instead of its weights; the reference is the "
        "policy with the adapter disabled"
    )
    lora_publish: Literal["merged", "adapter"] = Field(
        "merged", description="what a LoRA policy's pushes send: the merged full weights (to any replica) or the "
        "adapter alone (to replicas started with enable_lora; in-band)"
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (the update is alpha / r * B A)")
    lora_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on the LoRA input in the PPO epochs' passes (never when log-probs are "
        "recomputed for the ratio)"
    )
    lora_target_modules: list[str] | None = Field(
        None, description="module names to adapt, or [all-linear]; default: PEFT's for the architecture"
    )

    # PPO (TRL's and veRL's names).
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = Field(
        "gae", description="gae: critic + GAE; grpo / rloo: critic-free group baselines; reinforce_pp: REINFORCE++, "
        "critic-free returns whitened over the batch"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="grpo: divide each advantage by its group's score std (group), the batch's (batch) or "
        "nothing (none: Dr.GRPO)"
    )
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate (policy and critic)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lr_scheduler_type: str = Field(
        "constant", description="learning-rate schedule over the run's optimizer steps (transformers' get_scheduler: "
        "constant, linear, cosine, constant_with_warmup, ...)"
    )
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of warm-up (when set, warmup_ratio is ignored)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the run's optimizer steps spent warming up")
    num_ppo_epochs: int = Field(4, ge=1, description="passes over each step's rollouts")
    num_mini_batches: int = Field(1, ge=1, description="optimizer steps per epoch")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per mini-batch")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = \
        Field("token-mean", description="how the policy, value, KL and entropy terms weigh tokens: token-mean (every "
              "token of a mini-batch alike, whatever the micro-batches and ranks), seq-mean-token-mean (every "
              "response alike), seq-mean-token-sum, seq-mean-token-sum-norm (token sums over response_length: "
              "Dr.GRPO)")
    policy_loss: Literal["ppo", "gspo", "cispo"] = Field(
        "ppo", description="ppo: clipped surrogate; gspo: clipped sequence-level ratio (aggregated "
        "seq-mean-token-mean); cispo: REINFORCE weighted by the clipped ratio"
    )
    kl_coef: float = Field(0.05, ge=0, description="KL coefficient (initial value when adaptive); 0: no reference "
                           "model is loaded or run")
    kl_estimator: Literal["k1", "k2", "k3", "low_var_kl"] = Field(
        "k1", description="per-token KL estimator: k1, k2, k3, or low_var_kl (k3 clamped, as veRL)"
    )
    use_kl_loss: bool = Field(
        False, description="put the KL to the reference in the loss (kl_coef times its aggregate) instead of "
        "subtracting it from the rewards"
    )
    target_kl: float | None = Field(None, gt=0, description="adapt kl_coef towards this KL per response; None: fixed")
    kl_horizon: int = Field(10000, ge=1, description="adaptive KL horizon, in samples")
    cliprange: float = Field(0.2, gt=0, description="policy ratio clip (both sides unless cliprange_low/high)")
    cliprange_low: float | None = Field(None, gt=0, lt=1, description="the ratio's lower clip 1 - cliprange_low")
    cliprange_high: float | None = Field(
        None, gt=0, description="the ratio's upper clip 1 + cliprange_high (DAPO's clip-higher: 0.28)"
    )
    clip_ratio_c: float | None = Field(
        None, gt=1, description="dual-clip PPO: a negative advantage's loss is at most clip_ratio_c * |A| (e.g. 3)"
    )
    cliprange_value: float = Field(0.2, gt=0, description="value clip")
    vf_coef: float = Field(0.1, ge=0, description="value loss coefficient")
    ent_coef: float = Field(0.0, ge=0, description="entropy bonus coefficient")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    whiten_rewards: bool = Field(False, description="whiten token rewards (scale only) before GAE")
    whiten_advantages: bool | None = Field(
        None, description="whiten advantages over the step's tokens (default: yes, but not with scale_rewards batch "
        "or none, whose scale is the point, nor reinforce_pp, which whitens its own)"
    )

    # What is trained on.
    filter_groups: str | None = Field(
        None, description="dynamic sampling (DAPO): drop the groups whose samples all scored the same on this "
        "metric (`score`, the reward service's raw score, or a composite's component, e.g. math) and sample more "
        "prompts until batch_size groups are kept"
    )
    max_sampling_rounds: int = Field(
        3, ge=1, description="filter_groups: rounds of sampling per step at most; a batch still short after them is "
        "filled with dropped groups that train nothing"
    )
    overlong_buffer_len: int | None = Field(
        None, ge=1, description="DAPO's soft overlong penalty: a response longer than response_length minus this "
        "loses up to overlong_penalty, linearly"
    )
    overlong_penalty: float = Field(1.0, ge=0, description="the overlong penalty at response_length")
    mask_truncated: bool = Field(
        False, description="responses cut at the length limit (no EOS) give no loss (DAPO's overlong filtering)"
    )
    rollout_correction: Literal["mis", "tis", "none"] = Field(
        "mis", description="correct for the gap between the sampler's policy (its streamed log-probs) and the "
        "learner's: mis masks the loss outside [rollout_correction_min, rollout_correction_max] and weighs it by "
        "the ratio inside; tis weighs it by min(ratio, rollout_correction_max); none: off"
    )
    rollout_correction_level: Literal["sequence", "token"] = Field(
        "sequence", description="the ratio p_learner / p_sampler per token, or each response's geometric mean of it"
    )
    rollout_correction_max: float = Field(2.0, gt=0, description="upper bound of the ratio (truncation or mask)")
    rollout_correction_min: float | None = Field(
        None, gt=0, lt=1, description="mis: lower bound of the ratio (default 1 / rollout_correction_max)"
    )
    rollout_correction_bypass: bool = Field(
        False, description="use the sampler's log-probs as the old policy of the PPO ratio and skip the learner's "
        "old-log-prob pass (the ratio then corrects the gap itself; no mask or weight)"
    )
    tis_cap: float | None = Field(
        None, gt=0, exclude=True, description="deprecated: rollout_correction tis, rollout_correction_level token, "
        "rollout_correction_max CAP"
    )
    seed: int = Field(0, description="prompt order, sampling seeds and torch")

    # Output.
    output_dir: Path = Field(Path("runs/learner"), description="TensorBoard logs, checkpoints, plot and summary")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        ["tensorboard"], description="where every step's scalars go (the same names everywhere); W&B offline: "
        "WANDB_MODE=offline"
    )
    wandb_project: str = Field("rlhf-mesh", description="W&B project of the run")
    run_name: str | None = Field(None, description="W&B run name (default: W&B's)")
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end and on request)")
    log_samples_steps: int = Field(
        10, ge=0, description="every N steps, log_samples samples (prompt, response, score, components, advantage, "
        "finish, policy versions) to output_dir/samples.jsonl, TensorBoard and W&B (0: never)"
    )
    log_samples: int = Field(4, ge=1, description="samples logged each log_samples_steps steps")
    start_paused: bool = Field(False, description="serve learner: load, connect, then wait for Resume")
    linger_s: float = Field(
        10.0, ge=0, description="serve learner: how long the server keeps answering after the run ends"
    )

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        from transformers import SchedulerType

        known = sorted({t.value for t in SchedulerType} - {"reduce_lr_on_plateau"})  # that one needs a metric
        if value not in known:
            raise ValueError(f"unknown schedule {value!r}; one of {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> LearnerSettings:
        rollouts = self.batch_size * self.num_samples_per_prompt
        micro = self.num_mini_batches * self.gradient_accumulation_steps
        if rollouts % micro:
            raise ValueError(
                f"batch_size * num_samples_per_prompt ({rollouts}) must be divisible by "
                f"num_mini_batches * gradient_accumulation_steps ({micro})"
            )
        if self.use_peft and self.reference is not None:
            raise ValueError("use_peft: the reference is the policy with its adapter disabled; leave reference unset")
        if self.lora_publish == "adapter" and not (self.use_peft and self.weight_transport == "grpc"):
            raise ValueError("lora_publish adapter needs use_peft and weight_transport grpc")
        if self.eval_steps and self.eval_prompts is None:
            raise ValueError("eval_steps needs eval_prompts")
        if self.advantage_estimator in ("grpo", "rloo") and self.num_samples_per_prompt < 2:
            raise ValueError(f"advantage_estimator {self.advantage_estimator} needs num_samples_per_prompt >= 2")
        if self.advantage_estimator != "gae" and (self.critic or self.value_head):
            raise ValueError(f"advantage_estimator {self.advantage_estimator} is critic-free: drop critic/value_head")
        if self.critic and self.value_head:
            raise ValueError("critic and value_head exclude each other: a separate value model or a head")
        if self.resume_from is not None and not (self.resume_from / "trainer.pt").is_file():
            raise ValueError(f"resume_from: {self.resume_from} is not a checkpoint (no trainer.pt)")
        if (self.environment is None) != (self.environment_service is None) and self.rollout_source == "prompts":
            raise ValueError("environment and environment_service go together")
        if self.reward is None and self.environment is None and self.rollout_source == "prompts":
            raise ValueError("reward: give the RewardService's HOST:PORT (only an environment or sessions run may go "
                             "without)")
        if self.policy_loss == "gspo" and "loss_agg_mode" in self.model_fields_set \
                and self.loss_agg_mode != "seq-mean-token-mean":
            log.warning("policy_loss gspo aggregates seq-mean-token-mean (its ratio is per sequence): "
                        "loss_agg_mode %s is not used", self.loss_agg_mode)
        if self.use_kl_loss and self.kl_estimator == "k1":
            raise ValueError("use_kl_loss: set kl_estimator to k2, k3 or low_var_kl (k1's gradient in the loss is 0 "
                             "in expectation)")
        if self.rollout_correction == "mis" and self.correction_min >= self.rollout_correction_max:
            raise ValueError(f"rollout_correction_min ({self.correction_min}) must be below rollout_correction_max "
                             f"({self.rollout_correction_max})")
        if self.loss_agg_mode == "seq-mean-token-sum-norm" and self.environment is not None \
                and self.max_episode_tokens is None:
            raise ValueError("loss_agg_mode seq-mean-token-sum-norm with an environment divides by a constant: set "
                             "max_episode_tokens")
        if self.filter_groups is not None and self.num_samples_per_prompt < 2:
            raise ValueError("filter_groups needs num_samples_per_prompt >= 2 (a group's scores must vary)")
        if self.overlong_buffer_len is not None and self.overlong_buffer_len >= self.response_length:
            raise ValueError(f"overlong_buffer_len ({self.overlong_buffer_len}) must be below response_length "
                             f"({self.response_length})")
        if self.overlong_buffer_len is not None and self.environment is not None:
            raise ValueError("overlong_buffer_len shapes single-turn responses; an episode's length is the "
                             "environment's (max_turns, max_episode_tokens)")
        if self.use_kl_loss and self.kl_coef == 0:
            raise ValueError("use_kl_loss needs kl_coef > 0 (its coefficient)")
        if self.rollout_source == "sessions":
            self._check_sessions()
        elif self.prompts is None:
            raise ValueError("prompts: give the prompt dataset (only rollout_source sessions goes without)")
        if self.prompts is not None and self.prompts.suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"prompts: {self.prompts} is neither .jsonl nor .parquet")
        return self

    def credentials(self) -> dict[str, Any]:
        """The `tls` and `token` arguments of the learner's clients."""
        from rlhf_mesh.clients.channel import client_credentials

        return client_credentials(self.services_token_file, self.services_tls_ca, self.services_tls_cert,
                                  self.services_tls_key, self.services_tls_server_name)

    def collective_host(self, replica: str) -> str:
        """collective_address, or the local address this host's route to `replica` (HOST:PORT) leaves from:
        the one a replica on another host reaches back."""
        if self.collective_address:
            return self.collective_address
        host, _, port = replica.rpartition(":")
        try:
            found = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)
            family, _, _, _, address = min(found, key=lambda a: a[0] != socket.AF_INET)  # IPv4 where there is one
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(address)  # a UDP connect sends nothing: it only picks the route
                return probe.getsockname()[0]
        except (OSError, ValueError) as err:
            raise RuntimeError(f"collective_address: no route to {replica} to take this host's address from ({err}); "
                               "set collective_address") from None

    def _check_sessions(self) -> None:
        """What rollout_source sessions needs: sessions are single episodes, rewarded already."""
        if self.environment_service is None or self.environment is not None:
            raise ValueError("rollout_source sessions: give environment_service (the sessions come through it), "
                             "and no environment")
        if self.num_samples_per_prompt != 1 or self.advantage_estimator in ("grpo", "rloo") \
                or self.filter_groups is not None:
            raise ValueError("rollout_source sessions: every session is its own group; use num_samples_per_prompt "
                             "1 with advantage_estimator reinforce_pp or gae, and no filter_groups")
        if self.eval_steps and self.reward is None:
            raise ValueError("rollout_source sessions: the evaluation samples eval_prompts and scores them on reward")

    @model_validator(mode="after")
    def _tis_cap_is_truncation(self) -> LearnerSettings:
        if self.tis_cap is not None:
            named = {"rollout_correction", "rollout_correction_level", "rollout_correction_max"} & self.model_fields_set
            if named:
                raise ValueError(f"tis_cap is the deprecated form of the rollout correction: drop it or "
                                 f"{', '.join(sorted(named))}")
            warn_renamed("tis_cap: CAP", "rollout_correction: tis, rollout_correction_level: token, "
                         "rollout_correction_max: CAP")
            self.rollout_correction, self.rollout_correction_level = "tis", "token"
            self.rollout_correction_max, self.tis_cap = self.tis_cap, None
        return self

    @property
    def uses_reference(self) -> bool:
        """Whether a reference model is loaded and run: only for a KL term (kl_coef > 0)."""
        return self.kl_coef > 0

    @property
    def whitens_advantages(self) -> bool:
        if self.whiten_advantages is None:
            return not (self.advantage_estimator == "reinforce_pp" or
                        (self.advantage_estimator == "grpo" and self.scale_rewards != "group"))
        return self.whiten_advantages

    @property
    def correction_min(self) -> float:
        """mis: the lower bound of the ratio."""
        return 1.0 / self.rollout_correction_max if self.rollout_correction_min is None else self.rollout_correction_min

    @property
    def clip_low(self) -> float:
        return self.cliprange if self.cliprange_low is None else self.cliprange_low

    @property
    def clip_high(self) -> float:
        return self.cliprange if self.cliprange_high is None else self.cliprange_high

    @property
    def loss_aggregation(self) -> str:
        """The loss_agg_mode in force: GSPO's sequence ratio is averaged per sequence."""
        return "seq-mean-token-mean" if self.policy_loss == "gspo" else self.loss_agg_mode

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run: what the learning-rate schedule spans."""
        return self.steps * self.num_ppo_epochs * self.num_mini_batches

    @property
    def adapter_pushes(self) -> bool:
        """A LoRA policy published as its adapter alone (else a LoRA policy goes merged)."""
        return self.use_peft and self.lora_publish == "adapter"

    @property
    def rollouts_per_step(self) -> int:
        return self.batch_size * self.num_samples_per_prompt

    @property
    def micro_batch_size(self) -> int:
        return self.rollouts_per_step // (self.num_mini_batches * self.gradient_accumulation_steps)
