"""The text objectives' pure losses against hand computation (docs/methods.md#text-core)."""

from __future__ import annotations

import math

import pytest
import torch

from visalign.text.losses import (
    LOSS_TYPES,
    best_of_n,
    best_of_n_kl_bound,
    clipped_token_loss,
    dpo_loss,
    k3_kl,
    rloo_advantages,
    token_nll,
)


def test_rloo_baseline_leaves_the_sample_out():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 4.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = rloo_advantages(rewards, groups)
    # group 0: baselines (0+.5+.5)/3, (1+.5+.5)/3, (1+0+.5)/3, (1+0+.5)/3; group 1 of two: the other sample
    expected = [1 - 1 / 3, 0 - 2 / 3, 0.5 - 0.5, 0.5 - 0.5, 2 - 4, 4 - 2]
    torch.testing.assert_close(adv, torch.tensor(expected))
    # = G/(G−1)·(r − mean_g): the identity in docs/methods.md#text-core
    torch.testing.assert_close(adv[:4], 4 / 3 * (rewards[:4] - rewards[:4].mean()))


def test_rloo_drops_samples_outside_keep_from_members_and_baselines():
    rewards = torch.tensor([1.0, 0.0, 9.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1])
    adv = rloo_advantages(rewards, groups, keep=torch.tensor([True, True, False, True]))
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))  # the lone sample of group 1 has no baseline


def test_best_of_n_picks_each_groups_argmax_and_breaks_ties_by_the_seed():
    rewards = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.2, 0.7, 0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    keep = torch.ones(8, dtype=torch.bool)
    keep[1] = False  # a dropped sample never wins, whatever its reward
    picks = [best_of_n(rewards, groups, keep, torch.Generator().manual_seed(s)).tolist() for s in range(20)]
    for p in picks:
        assert p[0] == 2 and p[1] in (3, 5) and p[2] in (6, 7)
    assert {p[1] for p in picks} == {3, 5}  # ties are broken both ways across seeds
    assert picks[0] == best_of_n(rewards, groups, keep, torch.Generator().manual_seed(0)).tolist()
    assert best_of_n_kl_bound(1) == 0.0 and best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)


def test_dpo_is_log_two_at_the_reference_and_follows_the_margin():
    lp = torch.tensor([-3.0, -7.5])
    loss, h = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))
    assert torch.all(h == 0)
    loss, h = dpo_loss(torch.tensor([-2.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-4.0]), 0.5)
    assert float(h) == pytest.approx(0.5 * ((-2 + 3) - (-5 + 4)))
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    robust, _ = dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.1, label_smoothing=0.2,
                         loss_type="robust")
    assert float(robust) == pytest.approx(math.log(2) * (0.8 - 0.2) / 0.6)


def test_clipped_token_loss_and_its_clip_masks():
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))
    adv = torch.tensor([1.0, -1.0])
    loss, low, high = clipped_token_loss(new, old, adv, 0.2, 0.28)
    # A > 0: min(ρA, clip(ρ)A) → ρ clipped at 1.28 above, unclipped 0.5 below; A < 0: −min(−ρ, −clip(ρ)) = max(ρ, clip)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, -0.5], [1.5, 0.8]]))
    assert high.tolist() == [[True, False], [False, False]] and low.tolist() == [[False, False], [False, True]]


def test_loss_types_normalise_as_trl_does():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(LOSS_TYPES["grpo"](per_token, mask, 8, 4.0)) == pytest.approx((3 / 3 + 2 / 1) / 2)
    assert float(LOSS_TYPES["bnpo"](per_token, mask, 8, 4.0)) == pytest.approx(5 / 4)
    assert float(LOSS_TYPES["dr_grpo"](per_token, mask, 8, 4.0)) == pytest.approx(5 / (2 * 8))
    assert float(LOSS_TYPES["dapo"](per_token, mask, 8, 10.0)) == pytest.approx(5 / 10)


def test_k3_is_zero_on_policy_and_positive_off_it():
    lp = torch.tensor([[-1.0, -2.0]])
    assert torch.all(k3_kl(lp, lp) == 0)
    assert torch.all(k3_kl(lp, lp + torch.tensor([[0.3, -0.3]])) > 0)
    torch.testing.assert_close(token_nll(lp, torch.tensor([[1.0, 0.0]])), torch.tensor([1.0]))
