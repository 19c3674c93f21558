"""The PPO math against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_mesh.services.learner import ppo


def close(actual: torch.Tensor, expected: list | float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=1e-5)


def test_gae_without_discount_spreads_the_final_reward():
    # gamma = lam = 1: every delta but the last is 0; the last is 1 - 0.5. Returns = A + V = 1.
    advantages, returns = ppo.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3), 1, 1)
    close(advantages, [[0.5, 0.5, 0.5]])
    close(returns, [[1.0, 1.0, 1.0]])


def test_gae_discounts_and_stops_at_the_end_of_each_response():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # Row 0: d2 = 1 - .5 = .5 -> A2 = .5; d1 = .9*.5 - .5 = -.05 -> A1 = -.05 + .45*.5 = .175;
    #        d0 = -.05 -> A0 = -.05 + .45*.175 = .02875.
    # Row 1 (2 tokens; reward 9 and value 7 are padding): A2 = 0; d1 = 2 + .9*0 - 1 = 1 -> A1 = 1;
    #        d0 = .9*1 - 1 = -.1 -> A0 = -.1 + .45*1 = .35.
    close(advantages, [[0.02875, 0.175, 0.5], [0.35, 1.0, 0.0]])
    close(returns, [[0.52875, 0.675, 1.0], [1.35, 2.0, 0.0]])


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(ppo.kl_penalty(logp, ref, "k1"), [math.log(2)])  # log p - log q
    close(ppo.kl_penalty(logp, ref, "k3"), [-0.5 + math.log(2)])  # r = q/p = .5: (r - 1) - log r
    close(ppo.kl_penalty(ref, logp, "k3"), [1.0 - math.log(2)])  # r = 2: 1 - log 2, never negative
    with pytest.raises(ValueError, match="unknown KL estimator 'k2'"):
        ppo.kl_penalty(logp, ref, "k2")


def test_token_rewards_put_the_score_on_the_last_response_token():
    rewards = ppo.token_rewards(torch.tensor([2.0]), torch.tensor([[0.1, 0.2, 0.3]]), 0.5,
                                torch.tensor([[1.0, 1.0, 0.0]]))
    close(rewards, [[-0.05, -0.1 + 2.0, 0.0]])  # -0.5 * kl; padding gets nothing


def test_group_advantages():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # GRPO: group 1 mean 2, std 1; group 2 mean 2, std sqrt((4 + 4 + 16) / 2) = sqrt(12).
    s12 = math.sqrt(12) + 1e-4
    close(ppo.group_advantages(scores, 3, "grpo"), [-1 / 1.0001, 0.0, 1 / 1.0001, -2 / s12, -2 / s12, 4 / s12])
    # RLOO: minus the mean of the other two: 1 - 2.5, 2 - 2, 3 - 1.5, 0 - 3, 0 - 3, 6 - 0.
    close(ppo.group_advantages(scores, 3, "rloo"), [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])


def test_policy_loss_clips_the_ratio_pessimistically():
    old = torch.log(torch.tensor([[0.2, 0.2]]))
    new = old + math.log(1.5)  # ratio 1.5 on both tokens
    advantages, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    loss, stats = ppo.policy_loss(new, old, advantages, mask, cliprange=0.2)
    # A=+1: max(-1.5, -1.2) = -1.2 (clipped); A=-1: max(1.5, 1.2) = 1.5 (not clipped).
    close(loss, (-1.2 + 1.5) / 2)
    close(stats["clipfrac"], 0.5)
    close(stats["approx_kl"], 0.5 * math.log(1.5) ** 2)
    weighted, _ = ppo.policy_loss(new, old, advantages, mask, cliprange=0.2, weights=torch.tensor([[0.5, 1.0]]))
    close(weighted, (-0.6 + 1.5) / 2)


def test_value_loss_clips_around_the_old_values():
    mask = torch.ones(1, 1)
    loss, stats = ppo.value_loss(torch.tensor([[1.5]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]), mask, 0.2)
    # clipped value 1.2: max((1.5 - 2)^2, (1.2 - 2)^2) = .64, times 0.5.
    close(loss, 0.32)
    close(stats["clipfrac"], 1.0)


def test_masked_statistics_ignore_padding():
    values, mask = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    close(ppo.masked_mean(values, mask), 2.0)
    close(ppo.masked_var(values, mask), 1.0)  # unbiased: (1 + 0 + 1) / 2
    close(ppo.masked_whiten(values, mask), [-1.0, 0.0, 1.0, 0.0])
    close(ppo.masked_whiten(values, mask, shift_mean=False), [1.0, 2.0, 3.0, 0.0])


def test_entropy_of_a_uniform_distribution_is_log_n():
    close(ppo.entropy(torch.zeros(2, 4)), [math.log(4)] * 2)


def test_adaptive_kl_controller_moves_at_most_twenty_percent_per_horizon():
    fixed = ppo.KLController(0.1)
    fixed.update(kl=50.0, n_steps=10)
    assert fixed.value == 0.1
    adaptive = ppo.KLController(0.1, target=1.0, horizon=100)
    adaptive.update(kl=2.0, n_steps=10)  # error clipped to +.2: x (1 + .2 * 10/100)
    assert adaptive.value == pytest.approx(0.102)
    adaptive.update(kl=0.5, n_steps=10)  # error -.5 clipped to -.2: x .98
    assert adaptive.value == pytest.approx(0.102 * 0.98)
