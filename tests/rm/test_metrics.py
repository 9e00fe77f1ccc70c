"""Reward-model evaluation metrics on tiny data with hand-checkable numbers."""

from __future__ import annotations

import math

import pytest
import torch

from visalign.rm.evaluate import PairScores, best_tie_eps, pair_metrics
from visalign.rm.metrics import (
    agreement,
    expected_calibration_error,
    pairwise_accuracy,
    position_swap_bias,
    tie_accuracy,
)


def test_pairwise_accuracy_counts_exact_ties_half_and_skips_tie_pairs():
    a = torch.tensor([1.0, 0.0, 2.0, 5.0])
    b = torch.tensor([0.0, 1.0, 2.0, 0.0])
    assert pairwise_accuracy(a, b) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert pairwise_accuracy(a, b, torch.tensor([False, False, False, True])) == pytest.approx(1.5 / 3)
    with pytest.raises(ValueError, match="non-tie"):
        pairwise_accuracy(a, b, torch.ones(4, dtype=torch.bool))


def test_tie_accuracy_three_way_by_hand():
    gap = torch.tensor([0.05, 1.0, -1.0, 0.5])
    tie = torch.tensor([True, False, False, True])
    # eps 0.1: pair 0 tie (right), 1 a wins (right), 2 b wins (wrong), 3 not a tie (wrong).
    assert tie_accuracy(gap, torch.zeros(4), tie, eps=0.1) == pytest.approx(0.5)
    assert tie_accuracy(gap, torch.zeros(4), tie, eps=0.6) == pytest.approx(0.75)
    assert best_tie_eps(gap, tie) == pytest.approx(0.5)


def test_ece_by_hand_two_bins():
    p = torch.tensor([0.1, 0.2, 0.8, 0.9])
    y = torch.tensor([False, True, True, True])
    # Bins [0, .5): mean p .15, mean y .5 → |.35|·½; [.5, 1]: mean p .85, mean y 1 → |.15|·½. ECE = .25.
    assert expected_calibration_error(p, y, bins=2) == pytest.approx(0.25)
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([True, False]), bins=10) == 0.0


def test_position_swap_bias_and_agreement_by_hand():
    p_ab = torch.tensor([0.9, 0.6, 0.3])
    p_ba = torch.tensor([0.2, 0.7, 0.6])
    swap = position_swap_bias(p_ab, p_ba)
    assert swap["bias"] == pytest.approx(((0.9 + 0.2 - 1) + (0.6 + 0.7 - 1) + (0.3 + 0.6 - 1)) / 3)
    assert swap["consistency"] == pytest.approx(2 / 3)  # pair 1 says "first" both times
    first, second = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([2.0, -1.0, -1.0, 1.0])
    agree = agreement(first, second)
    assert agree["sign"] == pytest.approx(0.75)
    x, y = first - first.mean(), second - second.mean()
    assert agree["pearson"] == pytest.approx(float((x * y).sum() / (x.norm() * y.norm())), rel=1e-6)


def test_pair_metrics_by_hand():
    scores = PairScores(gap=torch.tensor([2.0, -1.0, 0.0, 0.1]), p_ab=torch.tensor([0.8, 0.4, 0.5, 0.5]),
                        p_ba=torch.tensor([0.3, 0.5, 0.5, 0.5]))
    tie = torch.tensor([False, False, True, True])
    out = pair_metrics(scores, tie, tie_eps=0.2, bins=2)
    assert out["pairs"] == 4 and out["ties"] == 2
    assert out["accuracy"] == pytest.approx(0.5)
    s2, s1 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))
    # Both orders of the two decided pairs: p = σ(2), σ(−1), σ(−2), σ(1) against outcomes 1, 1, 0, 0.
    low = [s1, 1 - s2]   # bin [0, .5): outcomes 1 (σ(−1)) and 0 (σ(−2))
    high = [s2, 1 - s1]  # bin [.5, 1]: outcomes 1 (σ(2)) and 0 (σ(1))
    ece = 0.5 * abs(sum(low) / 2 - 0.5) + 0.5 * abs(sum(high) / 2 - 0.5)
    assert out["ece"] == pytest.approx(ece, rel=1e-5)
    assert out["predicted_tie_rate"] == pytest.approx(0.5)
    assert out["tie_accuracy"] == pytest.approx(0.75)  # pair 1 wrong (b wins), the rest right
    assert out["swap_bias"] == pytest.approx((0.1 - 0.1 + 0.0 + 0.0) / 4)


def test_rao_kupper_nll_and_fitted_kappa():
    from visalign.rm.evaluate import fit_kappa, rao_kupper_nll

    gap = torch.tensor([3.0, 0.1, -0.2, 2.0])
    tie = torch.tensor([False, True, True, False])
    k = 1.0
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    hand = -(math.log(s(3 - k)) + math.log(1 - s(0.1 - k) - s(-0.1 - k)) + math.log(1 - s(-0.2 - k) - s(0.2 - k))
             + math.log(s(2 - k))) / 4
    assert rao_kupper_nll(gap, tie, k) == pytest.approx(hand, rel=1e-5)
    best = fit_kappa(gap, tie)
    assert all(rao_kupper_nll(gap, tie, best) <= rao_kupper_nll(gap, tie, other) + 1e-9 for other in (0.1, 1.0, 5.0))
