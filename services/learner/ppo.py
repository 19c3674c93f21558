"""The PPO math, top to bottom, as pure functions of tensors.

Shapes: `[B, T]` for per-token quantities of B responses padded to T tokens; `mask` is 1 on
response tokens (up to and including EOS) and 0 on padding, and in a multi-turn episode also 0
on the environment's tokens between the policy's turns (they are not actions). Masked positions
never contribute to a mean, a variance or a loss. Losses are per-token matrices that
`agg_loss` turns into a scalar. Names follow TRL and veRL (`kl_coef`, `cliprange`,
`loss_agg_mode`, `gamma`, `lam`); each function is checked against hand-computed values and
the peers' own functions in tests/test_ppo_math.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SAFE_LOG_RATIO = 20.0  # exp(±20) bounds every importance ratio before it is used or measured


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask is 1."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the positions where mask is 1."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = masked_mean((values - mean) ** 2, mask)
    return variance * count / (count - 1).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over masked positions; with shift_mean=False the mean is kept."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def agg_loss(losses: torch.Tensor, mask: torch.Tensor, mode: str, tokens: torch.Tensor | float | None = None,
             sequences: torch.Tensor | float | None = None, horizon: int | None = None) -> torch.Tensor:
    """One scalar from per-token losses, weighing tokens as `mode` says (veRL's names):

    token-mean: every token of the mini-batch alike (DAPO); seq-mean-token-mean: every sequence
    alike, its tokens averaged (GRPO's paper); seq-mean-token-sum: sequences alike, tokens summed;
    seq-mean-token-sum-norm: tokens summed over a constant `horizon` (Dr.GRPO: the length limit).
    `tokens` and `sequences` are the counts of the whole mini-batch (default: these rows', the
    rows with a token in the loss; every row for seq-mean-token-sum-norm), so that the parts of a
    mini-batch split into micro-batches (and ranks) sum to its loss.
    """
    if mode == "token-mean":
        total = mask.sum() if tokens is None else torch.as_tensor(tokens, dtype=losses.dtype)
        return (losses * mask).sum() / total.clamp(min=1)
    lengths = mask.sum(-1)
    per_sequence = (losses * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        per_sequence = per_sequence / lengths.clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        if horizon is None:
            raise ValueError("seq-mean-token-sum-norm needs the constant horizon (the length limit)")
        per_sequence = per_sequence / horizon
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown loss_agg_mode {mode!r}: one of {', '.join(LOSS_AGG_MODES)}")
    if sequences is None:
        sequences = mask.shape[0] if mode == "seq-mean-token-sum-norm" else (lengths > 0).sum()
    count = torch.as_tensor(sequences, dtype=losses.dtype)
    return per_sequence.sum() / count.clamp(min=1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman,
    "Approximating KL divergence"): with log r = log q - log p,

    k1 = -log r (unbiased, can be negative); k2 = (log r)^2 / 2 (its gradient is the KL's);
    k3 = (r - 1) - log r (unbiased, never negative); low_var_kl = k3 with log r clamped to
    ±20 and the estimate to [-10, 10], as veRL computes it.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    if estimator == "low_var_kl":
        log_ratio = log_ratio.clamp(-SAFE_LOG_RATIO, SAFE_LOG_RATIO)
        return (torch.expm1(log_ratio) - log_ratio).clamp(-10, 10)
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1, k2, k3 or low_var_kl")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """-kl_coef * KL on every response token, plus the sequence score on its last (policy) token."""
    rewards = -kl_coef * kl * mask
    last = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_length - buffer tokens, then falling linearly
    to -penalty at max_length."""
    exceeded = lengths.float() - (max_length - buffer)
    return torch.clamp(-exceeded / buffer * penalty, max=0.0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns (advantages, returns = advantages + values).

    The value after the last response token is 0 (the episode ends there); masked positions
    are skipped, not steps: padding gives no values from beyond a response's end, and an
    episode's observation tokens pass the next policy token's value and advantage through.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        step = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * running
        running = torch.where(step, advantage, running)
        next_value = torch.where(step, values[:, t], next_value)
        advantages[:, t] = advantage * mask[:, t]
    return advantages, advantages + values


def reinforce_pp(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): the discounted return of every token, whitened over the whole batch;
    returns (advantages, returns). Masked positions are skipped like GAE's."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        returns[:, t] = running * mask[:, t]
    return masked_whiten(returns, mask), returns


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, scale: str = "group") -> torch.Tensor:
    """Critic-free sequence advantages for `group_size` consecutive samples of one prompt.

    grpo: score - group mean, divided by the std + 1e-4 of the group (`scale` group: Shao et al.
    2024), of the whole batch (batch) or by nothing (none: Dr.GRPO, Liu et al. 2025).
    rloo: score - mean of the other samples of the group (Ahmadian et al. 2024).
    """
    groups = scores.view(-1, group_size)
    if estimator == "grpo":
        advantages = groups - groups.mean(1, keepdim=True)
        if scale == "group":
            advantages = advantages / (groups.std(1, keepdim=True) + 1e-4)
        elif scale == "batch":
            advantages = advantages / (scores.std() + 1e-4)
        elif scale != "none":
            raise ValueError(f"unknown scale_rewards {scale!r}: use group, batch or none")
    elif estimator == "rloo":
        advantages = groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    else:
        raise ValueError(f"unknown group estimator {estimator!r}: use 'grpo' or 'rloo'")
    return advantages.reshape(-1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                kind: str = "ppo", clip_low: float = 0.2, clip_high: float = 0.2, clip_ratio_c: float | None = None,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy losses (for `agg_loss`), with approx_kl, clipfrac and the mean ratio.

    ppo: the clipped surrogate with the ratio in [1 - clip_low, 1 + clip_high] (DAPO's clip-higher
    when they differ) and, with `clip_ratio_c`, dual-clip (Ye et al. 2019: a negative advantage's
    loss bounded by clip_ratio_c * |A|). gspo: the same clip on the sequence's geometric-mean ratio,
    whose gradient flows through every token (Zheng et al. 2025; aggregate seq-mean-token-mean).
    cispo: REINFORCE on every token with the clipped ratio as a fixed weight (MiniMax-M1 2025).
    `weights` (per token, no gradient) rescale the losses: the rollout correction's.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-SAFE_LOG_RATIO, SAFE_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    stats = {"approx_kl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
             "ratio": masked_mean(ratio.detach(), mask)}
    if kind == "gspo":
        sequence = masked_mean(log_ratio, mask, dim=-1).detach()[:, None]
        ratio = torch.exp((logprobs - logprobs.detach() + sequence).clamp(max=10.0))
    if kind in ("ppo", "gspo"):
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        losses = torch.max(unclipped, clipped)
        stats["clipfrac"] = masked_mean((clipped > unclipped).float().detach(), mask)
        if clip_ratio_c is not None and kind == "ppo":
            bound = -advantages * clip_ratio_c
            stats["clipfrac_lower"] = masked_mean(((losses > bound) & (advantages < 0)).float().detach(), mask)
            losses = torch.where(advantages < 0, torch.min(losses, bound), losses)
    elif kind == "cispo":
        clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()
        losses = -clipped * advantages * logprobs
        stats["clipfrac"] = masked_mean((clipped != ratio.detach()).float(), mask)
    else:
        raise ValueError(f"unknown policy_loss {kind!r}: use ppo, gspo or cispo")
    if weights is not None:
        losses = losses * weights
    return losses, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped value losses 0.5 * max((v - R)^2, (clip(v, v_old ± c) - R)^2), with clipfrac."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    stats = {"clipfrac": masked_mean((clipped > unclipped).float().detach(), mask)}
    return 0.5 * torch.max(unclipped, clipped), stats


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def rollout_correction(learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: str, level: str, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights for the gap between the sampler's policy and the learner's, and the mask
    of what stays in the loss; returns (weights, keep), no gradient.

    The ratio is p_learner / p_sampler per token (`level` token) or the sequence's geometric
    mean of it (sequence), broadcast to its tokens. tis: weight min(ratio, high), keep all
    (truncated importance sampling); mis: weight the ratio where it lies in [low, high], else 0
    and out of the loss (masked importance sampling, IcePop's band).
    """
    log_ratio = ((learner_logprobs - sampler_logprobs) * mask).clamp(-SAFE_LOG_RATIO, SAFE_LOG_RATIO)
    if level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=-1)[:, None].expand_as(mask)
    elif level != "token":
        raise ValueError(f"unknown rollout correction level {level!r}: use token or sequence")
    ratio = torch.exp(log_ratio)
    if mode == "tis":
        return ratio.clamp(max=high) * mask, mask.clone()
    if mode == "mis":
        keep = ((ratio >= low) & (ratio <= high)).to(mask.dtype) * mask
        return ratio * keep, keep
    raise ValueError(f"unknown rollout correction {mode!r}: use tis or mis")


def mismatch_metrics(learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the sampler's policy is from the learner's on the sampled tokens (veRL's names):
    k1 and k3 estimates of KL(sampler || learner) per token, the χ² divergence per token
    (E[ρ²] - 1) and per sequence (E[(Πρ)²] - 1), and the largest token ratio ρ."""
    log_ratio = ((learner_logprobs - sampler_logprobs) * mask).clamp(-SAFE_LOG_RATIO, SAFE_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    return {
        "kl": masked_mean(-log_ratio, mask),
        "k3_kl": masked_mean(ratio - log_ratio - 1, mask),
        "chi2_token": masked_mean(ratio**2, mask) - 1,
        "chi2_seq": torch.exp(2 * log_ratio.sum(-1).clamp(-SAFE_LOG_RATIO, SAFE_LOG_RATIO)).mean() - 1,
        "ratio_max": (ratio * mask).max(),
        "ratio_min": torch.where(mask > 0, ratio, math.inf).min() if mask.any() else torch.ones((), device=mask.device),
    }


@dataclass
class KLController:
    """kl_coef, fixed or adapted towards `target` (Ziegler et al. 2019): the coefficient
    moves by at most 20% × steps/horizon per update, up when KL is above target."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
