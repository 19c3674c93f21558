"""The PPO math against values worked out by hand (the arithmetic is in the comments), and against
veRL's own functions (tests/verl_core_algos.py, copied from its source) on the same random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_mesh.services.learner import ppo

import verl_core_algos as verl


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
    close(ppo.kl_penalty(logp, ref, "k2"), [0.5 * math.log(2) ** 2])  # (log r)^2 / 2
    close(ppo.kl_penalty(logp, ref, "low_var_kl"), [-0.5 + math.log(2)])  # k3 where no clamp bites
    # log r = -30 clamps to -20: e^-20 - 1 + 20 = 19.0..., clamped to 10; k3 itself is unbounded.
    close(ppo.kl_penalty(torch.tensor([0.0]), torch.tensor([-30.0]), "low_var_kl"), [10.0])
    close(ppo.kl_penalty(torch.tensor([0.0]), torch.tensor([-30.0]), "k3"), [29.0])
    with pytest.raises(ValueError, match="unknown KL estimator 'k7'"):
        ppo.kl_penalty(logp, ref, "k7")


def test_token_rewards_put_the_score_on_the_last_response_token():
    rewards = ppo.token_rewards(torch.tensor([2.0]), torch.tensor([[0.1, 0.2, 0.3]]), 0.5,
                                torch.tensor([[1.0, 1.0, 0.0]]))
    close(rewards, [[-0.05, -0.1 + 2.0, 0.0]])  # -0.5 * kl; padding gets nothing


def test_group_advantages():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # GRPO: group 1 mean 2, std 1; group 2 mean 2, std sqrt((4 + 4 + 16) / 2) = sqrt(12).
    s12 = math.sqrt(12) + 1e-4
    close(ppo.group_advantages(scores, 3, "grpo"), [-1 / 1.0001, 0.0, 1 / 1.0001, -2 / s12, -2 / s12, 4 / s12])
    # Dr.GRPO (scale none): only the group mean goes.
    close(ppo.group_advantages(scores, 3, "grpo", "none"), [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])
    # scale batch: the std of all six scores, sqrt((1 + 0 + 1 + 4 + 4 + 16) / 5) = sqrt(5.2).
    s52 = math.sqrt(5.2) + 1e-4
    close(ppo.group_advantages(scores, 3, "grpo", "batch"), [-1 / s52, 0.0, 1 / s52, -2 / s52, -2 / s52, 4 / s52])
    # RLOO: minus the mean of the other two: 1 - 2.5, 2 - 2, 3 - 1.5, 0 - 3, 0 - 3, 6 - 0.
    close(ppo.group_advantages(scores, 3, "rloo"), [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])


def test_reinforce_pp_whitens_discounted_returns_over_the_batch():
    rewards, mask = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = ppo.reinforce_pp(rewards, mask, gamma=1.0)
    close(returns, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
    # Mean 7/5 = 1.4 over the five tokens; unbiased variance (3 * .16 + 2 * .36) / 4 = .3.
    low, high = -0.4 / math.sqrt(0.3 + 1e-8), 0.6 / math.sqrt(0.3 + 1e-8)
    close(advantages, [[low, low, low], [high, high, 0.0]])
    # gamma .5, and an observation token (mask 0) mid-episode is skipped, not a step: .5 * 1 reaches token 0.
    _, returns = ppo.reinforce_pp(torch.tensor([[0.0, 9.0, 1.0]]), torch.tensor([[1.0, 0.0, 1.0]]), gamma=0.5)
    close(returns, [[0.5, 0.0, 1.0]])


def test_overlong_penalty_falls_linearly_over_the_buffer():
    # Limit 10, buffer 4: free up to 6 tokens, then -1/4 per token to -1 at 10.
    close(ppo.overlong_penalty(torch.tensor([3, 6, 8, 10]), 10, 4, 1.0), [0.0, 0.0, -0.5, -1.0])


def test_agg_loss_modes_and_their_micro_batch_parts():
    losses, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    expected = {
        "token-mean": (1 + 2 + 3 + 4) / 4,
        "seq-mean-token-mean": (6 / 3 + 4 / 1) / 2,
        "seq-mean-token-sum": (6 + 4) / 2,
        "seq-mean-token-sum-norm": (6 / 4 + 4 / 4) / 2,  # horizon 4
    }
    for mode, value in expected.items():
        close(ppo.agg_loss(losses, mask, mode, horizon=4), value)
        # Each row alone, counted against the whole batch: the parts sum to the whole.
        parts = [ppo.agg_loss(losses[i:i + 1], mask[i:i + 1], mode, tokens=mask.sum(), sequences=2, horizon=4)
                 for i in range(2)]
        close(sum(parts), value)
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'mean'"):
        ppo.agg_loss(losses, mask, "mean")


def test_only_token_mean_over_the_mini_batch_keeps_the_gradient_whatever_the_split():
    """The trainer's micro-batch losses are agg_loss parts counted against the whole mini-batch: their
    gradient is the same for 1 or 4 micro-batches. The mean of each micro-batch's own token mean (what
    the learner did before) weighs a token of a short response more, and changes with the split."""
    lengths = torch.tensor([1, 2, 30, 60, 5, 8, 40, 3])
    mask = (torch.arange(60)[None, :] < lengths[:, None]).float()
    targets = torch.randn(8, 60, generator=torch.Generator().manual_seed(0))

    def gradient(parts: int, old: bool) -> torch.Tensor:
        weight = torch.tensor(0.5, requires_grad=True)
        for rows in torch.arange(8).chunk(parts):
            losses = (weight - targets[rows]) ** 2
            if old:
                loss = ppo.masked_mean(losses, mask[rows]) / parts
            else:
                loss = ppo.agg_loss(losses, mask[rows], "token-mean", tokens=mask.sum())
            loss.backward()
        return weight.grad

    torch.testing.assert_close(gradient(4, old=False), gradient(1, old=False))
    assert not torch.allclose(gradient(4, old=True), gradient(1, old=True), rtol=1e-2)
    torch.testing.assert_close(gradient(1, old=True), gradient(1, old=False))  # the same for one micro-batch


def test_ppo_loss_clips_higher_than_lower_and_dual_clips_negative_advantages():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 4.0]]))
    advantages, mask = torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3)
    losses, stats = ppo.policy_loss(new, old, advantages, mask, "ppo", clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0)
    # 1.5, A=1: max(-1.5, -1.28) = -1.28 (clipped high); 0.5, A=1: max(-.5, -.8) = -.5 (ratio below 1 - .2 is
    # left: it is pessimistic already); 4, A=-1: max(4, 1.28) = 4, dual-clipped to 3 * 1.
    close(losses, [[-1.28, -0.5, 3.0]])
    close(stats["clipfrac"], 1 / 3)
    close(stats["clipfrac_lower"], 1 / 3)
    close(stats["approx_kl"], 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(4) ** 2) / 3)
    weighted, _ = ppo.policy_loss(new, old, advantages, mask, "ppo", 0.2, 0.28, weights=torch.tensor([[0.5, 1, 1]]))
    close(weighted, [[-0.64, -0.5, 4.0]])  # no dual clip without clip_ratio_c


def test_gspo_clips_the_sequence_ratio_and_its_gradient_reaches_every_token():
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[4.0, 1.0], [4.0, 1.0]])).requires_grad_()
    advantages, mask = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), torch.ones(2, 2)
    losses, stats = ppo.policy_loss(new, old, advantages, mask, "gspo", clip_low=0.2, clip_high=0.2)
    # The geometric mean of (4, 1) is 2 on both rows. A=+1: max(-2, -1.2) = -1.2, clipped (no gradient);
    # A=-1: max(2, 1.2) = 2, and d(2)/d log p_t = 2 on each token.
    close(losses.detach(), [[-1.2, -1.2], [2.0, 2.0]])
    losses.sum().backward()
    close(new.grad, [[0.0, 0.0], [2.0, 2.0]])
    close(stats["clipfrac"], 0.5)


def test_cispo_weighs_reinforce_by_the_clipped_ratio():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.9]])).requires_grad_()
    losses, stats = ppo.policy_loss(new, old, torch.tensor([[1.0, -2.0]]), torch.ones(1, 2), "cispo", 0.2, 0.2)
    # Weights clip(1.5) = 1.2 and clip(.9) = .9, held fixed: loss = -w * A * log p, gradient -w * A.
    close(losses.detach(), [[-1.2 * math.log(1.5), 1.8 * math.log(0.9)]])
    losses.sum().backward()
    close(new.grad, [[-1.2, 1.8]])
    close(stats["clipfrac"], 0.5)


def test_value_loss_clips_around_the_old_values():
    mask = torch.ones(1, 1)
    losses, stats = ppo.value_loss(torch.tensor([[1.5]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]), mask, 0.2)
    # clipped value 1.2: max((1.5 - 2)^2, (1.2 - 2)^2) = .64, times 0.5.
    close(losses, [[0.32]])
    close(stats["clipfrac"], 1.0)


def test_rollout_correction_truncates_or_masks_per_token_and_per_sequence():
    sampler = torch.zeros(2, 2)
    learner = torch.log(torch.tensor([[3.0, 0.5], [9.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    weights, keep = ppo.rollout_correction(learner, sampler, mask, "tis", "token", 0.5, 2.0)
    close(weights, [[2.0, 0.5], [2.0, 0.0]])  # min(ratio, 2); padding 0
    close(keep, mask.tolist())
    weights, keep = ppo.rollout_correction(learner, sampler, mask, "mis", "token", 0.5, 2.0)
    close(keep, [[0.0, 1.0], [0.0, 0.0]])  # 3 and 9 fall outside [.5, 2]
    close(weights, [[0.0, 0.5], [0.0, 0.0]])
    # Per sequence: geometric means sqrt(3 * .5) = 1.2247 (kept) and 9 (its one token: masked).
    weights, keep = ppo.rollout_correction(learner, sampler, mask, "mis", "sequence", 0.5, 2.0)
    close(keep, [[1.0, 1.0], [0.0, 0.0]])
    close(weights, [[math.sqrt(1.5), math.sqrt(1.5)], [0.0, 0.0]])


def test_mismatch_metrics():
    sampler, learner = torch.zeros(2, 2), torch.log(torch.tensor([[2.0, 1.0], [1.0, 7.0]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    metrics = ppo.mismatch_metrics(learner, sampler, mask)
    close(metrics["kl"], -math.log(2) / 3)  # mean of log p_sampler - log p_learner over 3 tokens
    close(metrics["k3_kl"], (2 - math.log(2) - 1) / 3)
    close(metrics["chi2_token"], (4 + 1 + 1) / 3 - 1)
    close(metrics["chi2_seq"], (4 + 1) / 2 - 1)  # (2 * 1)^2 and 1^2
    close(metrics["ratio_max"], 2.0)
    close(metrics["ratio_min"], 1.0)


# --- against veRL's own functions, on random inputs -----------------------------------------------


def _random(seed: int = 0, rows: int = 8, tokens: int = 12):
    """Log-probs of a learner, an old policy and a sampler near one another, advantages, and a mask
    of responses of different lengths (each at least one token)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, tokens, generator=g) * 3
    new = old + 0.3 * torch.randn(rows, tokens, generator=g)
    sampler = old + 0.4 * torch.randn(rows, tokens, generator=g)
    advantages = torch.randn(rows, tokens, generator=g)
    lengths = torch.randint(1, tokens + 1, (rows,), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).float()
    return new, old, sampler, advantages, mask


def _both(ours, theirs, inputs):
    """Loss and gradient with respect to the new log-probs, of ours and of veRL's."""
    out = []
    for fn in (ours, theirs):
        new = inputs.clone().requires_grad_()
        loss = fn(new)
        loss.backward()
        out.append((loss.detach(), new.grad))
    return out


def test_agg_loss_equals_verl():
    _, _, _, losses, mask = _random()
    for mode in ppo.LOSS_AGG_MODES:
        ours = ppo.agg_loss(losses, mask, mode, horizon=12)
        # veRL divides seq-mean-token-sum-norm's token sums by the constant alone (its sequence mean comes
        # from scaling by 1 / micro-batches); TRL's dr_grpo and ours divide by the sequences too.
        scale = 12 * 8 if mode == "seq-mean-token-sum-norm" else None
        close(ours, float(verl.agg_loss(losses, mask, mode, loss_scale_factor=scale)))
    # Over 2 ranks veRL scales a rank's part by dp_size against the global token count: so do we (trainer).
    part = ppo.agg_loss(losses[:3], mask[:3], "token-mean", tokens=mask.sum())
    close(2 * part, float(verl.agg_loss(losses[:3], mask[:3], "token-mean", dp_size=2, batch_num_tokens=mask.sum())))


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_loss_equals_verl_vanilla(dual_clip):
    new, old, _, advantages, mask = _random(1)
    config = verl.ActorConfig(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                              clip_ratio_c=dual_clip or 1e9)  # veRL always dual-clips: at c=1e9 it never bites
    (ours, our_grad), (theirs, their_grad) = _both(
        lambda lp: ppo.agg_loss(ppo.policy_loss(lp, old, advantages, mask, "ppo", 0.2, 0.28, dual_clip)[0],
                                mask, "token-mean"),
        lambda lp: verl.compute_policy_loss_vanilla(old, lp, advantages, mask, "token-mean", config)[0], new)
    close(ours, float(theirs))
    torch.testing.assert_close(our_grad, their_grad)


def test_gspo_and_cispo_losses_equal_verl():
    new, old, _, advantages, mask = _random(2)
    sequence_advantages = advantages[:, :1].expand_as(advantages)  # GSPO's advantages are per sequence
    config = verl.ActorConfig(clip_ratio=0.2, clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    (ours, our_grad), (theirs, their_grad) = _both(
        lambda lp: ppo.agg_loss(ppo.policy_loss(lp, old, sequence_advantages, mask, "gspo", 3e-4, 4e-4)[0],
                                mask, "seq-mean-token-mean"),
        lambda lp: verl.compute_policy_loss_gspo(old, lp, sequence_advantages, mask, config=config)[0], new)
    close(ours, float(theirs))
    torch.testing.assert_close(our_grad, their_grad)
    config = verl.ActorConfig(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
    (ours, our_grad), (theirs, their_grad) = _both(
        lambda lp: ppo.agg_loss(ppo.policy_loss(lp, old, advantages, mask, "cispo", 0.2, 0.28)[0], mask,
                                "token-mean"),
        lambda lp: verl.compute_policy_loss_cispo(old, lp, advantages, mask, "token-mean", config)[0], new)
    close(ours, float(theirs))
    torch.testing.assert_close(our_grad, their_grad)


def test_value_loss_and_kl_estimators_equal_verl():
    new, old, _, returns, mask = _random(3)
    ours = ppo.agg_loss(ppo.value_loss(new, old, returns, mask, 0.2)[0], mask, "token-mean")
    close(ours, float(verl.compute_value_loss(new, returns, old, mask, 0.2)[0]))
    for our_name, their_name in (("k1", "k1"), ("k2", "k2"), ("low_var_kl", "low_var_kl"), ("k3", "k3")):
        torch.testing.assert_close(ppo.kl_penalty(new, old, our_name), verl.kl_penalty_forward(new, old, their_name))


def test_advantages_equal_verl():
    g = torch.Generator().manual_seed(4)
    _, _, _, _, mask = _random(4, rows=12)
    scores = torch.randint(0, 3, (12,), generator=g).float()
    token_scores = ppo.token_rewards(scores, torch.zeros_like(mask), 0.0, mask)
    index = [i // 4 for i in range(12)]  # three groups of four
    for scale, by_std in (("group", True), ("none", False)):
        theirs, _ = verl.compute_grpo_outcome_advantage(token_scores.clone(), mask, index, epsilon=1e-4,
                                                        norm_adv_by_std_in_grpo=by_std)
        close(ppo.group_advantages(scores, 4, "grpo", scale)[:, None] * mask, theirs.tolist())
    rewards = token_scores + 0.1 * torch.randn(mask.shape, generator=g) * mask  # a KL penalty on every token
    for gamma in (1.0, 0.9):
        ours, our_returns = ppo.reinforce_pp(rewards, mask, gamma)
        theirs, their_returns = verl.compute_reinforce_plus_plus_outcome_advantage(rewards, mask,
                                                                                   verl.AlgoConfig(gamma))
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(our_returns, their_returns)


def test_rollout_correction_equals_verl():
    _, learner, sampler, _, mask = _random(5)
    log_ratio = learner - sampler
    ours, _ = ppo.rollout_correction(learner, sampler, mask, "tis", "token", 0.5, 2.0)
    theirs, _ = verl.compute_rollout_correction_weights(log_ratio, mask, "token", 2.0)
    torch.testing.assert_close(ours, theirs)
    # mis masks as veRL's rejection sampling with the symmetric band [1/2, 2] on token_k1 / seq_mean_k1
    # (the sequence's mean log-ratio: its geometric-mean ratio); the masked fraction is not zero here.
    for level, option in (("token", "token_k1"), ("sequence", "seq_mean_k1")):
        _, keep = ppo.rollout_correction(learner, sampler, mask, "mis", level, 0.5, 2.0)
        theirs, _ = verl.compute_rollout_rejection_mask(log_ratio, mask, option, 2.0)
        torch.testing.assert_close(keep, theirs)
        assert 0 < keep.sum() < mask.sum()
    metrics = ppo.mismatch_metrics(learner, sampler, mask)
    theirs = verl.compute_offpolicy_metrics(learner, sampler, mask)
    for name in ("kl", "k3_kl", "chi2_token", "chi2_seq"):
        assert float(metrics[name]) == pytest.approx(theirs[name], rel=1e-5), name


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
