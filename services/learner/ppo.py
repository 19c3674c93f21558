"""The PPO math, top to bottom, as pure functions of tensors.

Shapes: `[B, T]` for per-token quantities of B responses padded to T tokens; `mask` is 1 on
response tokens (up to and including EOS) and 0 on padding, and in a multi-turn episode also 0
on the environment's tokens between the policy's turns (they are not actions). Masked positions
never contribute to a mean, a variance or a loss. Names follow TRL (`kl_coef`, `cliprange`,
`cliprange_value`, `gamma`, `lam`); each function is checked against hand-computed values
in tests/test_ppo_math.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1 = log p - log q (unbiased, can be negative); k3 = (r - 1) - log r with r = q/p
    (unbiased, never negative, lower variance). Schulman, "Approximating KL divergence".
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1' or 'k3'")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """-kl_coef * KL on every response token, plus the sequence score on its last (policy) token."""
    rewards = -kl_coef * kl * mask
    last = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


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


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """Critic-free sequence advantages for `group_size` consecutive samples of one prompt.

    grpo: (score - group mean) / (group std + 1e-4) (Shao et al. 2024).
    rloo: score - mean of the other samples of the group (Ahmadian et al. 2024).
    """
    groups = scores.view(-1, group_size)
    if estimator == "grpo":
        advantages = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    elif estimator == "rloo":
        advantages = groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    else:
        raise ValueError(f"unknown group estimator {estimator!r}: use 'grpo' or 'rloo'")
    return advantages.reshape(-1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss, with approx_kl and clipfrac.

    `weights` (per token) rescales the loss: truncated importance sampling between the
    sampler's and the learner's distributions.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    losses = torch.max(unclipped, clipped)
    if weights is not None:
        losses = losses * weights
    stats = {
        "approx_kl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
        "clipfrac": masked_mean((clipped > unclipped).float().detach(), mask),
        "ratio": masked_mean(ratio.detach(), mask),
    }
    return masked_mean(losses, mask), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, v_old ± c) - R)^2), with clipfrac."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    stats = {"clipfrac": masked_mean((clipped > unclipped).float().detach(), mask)}
    return 0.5 * masked_mean(torch.max(unclipped, clipped), mask), stats


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


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
