"""The reward-model losses against hand computations (docs/methods.md#reward-models)."""

from __future__ import annotations

import math

import pytest
import torch

from visalign.rm.bt import bt_loss
from visalign.rm.gaussian import gaussian_bt_loss, gaussian_win_probability
from visalign.rm.losses import LOSSES, LossParams, PairRewards, check_ties, get_loss
from visalign.rm.ties import bt_ties_loss, rao_kupper_log_probs, soli_ties_loss
from visalign.rm.verdict import pairwise_yes_no_ce_loss, yes_no_ce_loss, yes_no_log_odds


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bt_loss_is_minus_log_sigmoid_of_the_margin_gap_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.5, -1.0])
    margin = 0.25
    by_hand = [-math.log(sigmoid(c - r - margin)) for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)]
    assert bt_loss(chosen, rejected, margin=margin).item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    # Per-pair margins and label smoothing, also by hand.
    margins = torch.tensor([0.0, 1.0, 2.0])
    eps = 0.1
    d = [c - r - m for c, r, m in zip(chosen.tolist(), rejected.tolist(), margins.tolist(), strict=True)]
    by_hand = [-((1 - eps) * math.log(sigmoid(x)) + eps * math.log(sigmoid(-x))) for x in d]
    assert bt_loss(chosen, rejected, margin=margins, label_smoothing=eps).item() == pytest.approx(
        sum(by_hand) / 3, rel=1e-6)
    assert bt_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        bt_loss(chosen, rejected, label_smoothing=0.5)


def test_rao_kupper_probabilities_sum_to_one_and_match_the_formula():
    a, b, kappa = torch.tensor([1.3, -0.2, 0.0]), torch.tensor([0.1, 0.4, 0.0]), 0.7
    win, loss, tie = (t.exp() for t in rao_kupper_log_probs(a, b, kappa))
    torch.testing.assert_close(win + loss + tie, torch.ones(3))
    for i in range(3):
        d = a[i].item() - b[i].item()
        assert win[i].item() == pytest.approx(sigmoid(d - kappa), rel=1e-6)
        assert tie[i].item() == pytest.approx(1 - sigmoid(d - kappa) - sigmoid(-d - kappa), rel=1e-5)
    # A tie is most likely when the rewards are equal.
    assert tie[2] > tie[0] and tie[2] > tie[1]
    with pytest.raises(ValueError, match="kappa"):
        rao_kupper_log_probs(a, b, -0.1)


def test_bt_ties_gives_ties_positive_likelihood_and_reduces_to_bt_without_ties():
    a, b = torch.tensor([0.0, 0.3]), torch.tensor([0.0, -0.4])
    tie = torch.tensor([True, False])
    value = bt_ties_loss(a, b, tie, kappa=1.0)
    assert math.isfinite(value.item())
    # The tie's likelihood is positive and larger than plain BT gives (zero mass on ties).
    _, _, log_tie = rao_kupper_log_probs(a, b, 1.0)
    assert 0 < log_tie[0].exp().item() < 1
    assert rao_kupper_log_probs(a, b, 0.0)[2][0].exp().item() < 1e-9
    # No ties and κ = 0: exactly BT.
    no_tie = torch.zeros(2, dtype=torch.bool)
    assert bt_ties_loss(a, b, no_tie, kappa=0.0).item() == pytest.approx(bt_loss(a, b).item(), rel=1e-6)
    # With κ > 0 and no ties it is BT with margin κ: a decided pair must win by more than the tie band.
    assert bt_ties_loss(a, b, no_tie, kappa=0.5).item() == pytest.approx(bt_loss(a, b, margin=0.5).item(), rel=1e-6)
    # Gradient of a tie pulls the two rewards together.
    x = torch.tensor([1.0], requires_grad=True)
    bt_ties_loss(x, torch.tensor([0.0]), torch.tensor([True])).backward()
    assert x.grad.item() > 0  # descending moves x towards 0


def test_soli_ties_by_hand():
    a, b, tie = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5]), torch.tensor([False, True])
    m = 0.1
    decided = -math.log(sigmoid(1.0 - m))
    tied = -math.log(sigmoid(-m)) - math.log(sigmoid(-m))
    assert soli_ties_loss(a, b, tie, margin=m).item() == pytest.approx((decided + tied) / 2, rel=1e-6)


def test_gaussian_bt_by_hand_and_sigma_discounts_a_wrong_ranking():
    mu_a, mu_b = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 0.0])
    ls_a, ls_b = torch.tensor([0.0, math.log(2.0)]), torch.tensor([math.log(0.5), 0.0])
    phi = [0.5 * (1 + math.erf(z / math.sqrt(2))) for z in (0.5 / math.sqrt(1 + 0.25), -1.0 / math.sqrt(4 + 1))]
    expected = -(math.log(phi[0]) + math.log(phi[1])) / 2
    assert gaussian_bt_loss(mu_a, ls_a, mu_b, ls_b).item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(gaussian_win_probability(mu_a, ls_a, mu_b, ls_b), torch.tensor(phi), rtol=1e-5,
                               atol=1e-6)
    # σ-weight term by hand: λ·(log σ_a + log σ_b)/2, mean over pairs.
    lam = 0.3
    reg = lam * ((0.0 + math.log(0.5)) + (math.log(2.0) + 0.0)) / 2 / 2
    assert gaussian_bt_loss(mu_a, ls_a, mu_b, ls_b, sigma_weight=lam).item() == pytest.approx(expected + reg,
                                                                                              rel=1e-5)
    # On a wrongly ranked pair, a larger σ lowers the loss: the head can say "unsure" instead of "wrong".
    wrong_sure = gaussian_bt_loss(torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([0.0]),
                                  torch.tensor([-2.0]))
    wrong_unsure = gaussian_bt_loss(torch.tensor([-2.0]), torch.tensor([1.0]), torch.tensor([0.0]),
                                    torch.tensor([1.0]))
    assert wrong_unsure < wrong_sure
    assert gaussian_bt_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3)).item() == \
        pytest.approx(math.log(2), rel=1e-6)


def test_yes_no_losses_read_the_yes_and_no_mass():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    logp = torch.log_softmax(logits, dim=-1)
    yes, no = [0, 1], [2]
    p = logp.exp()
    p_yes, p_no = p[:, 0] + p[:, 1], p[:, 2]
    answers = torch.tensor([True, False])
    expected = -(math.log(p_yes[0]) + math.log(p_no[1])) / 2
    assert yes_no_ce_loss(logp, answers, yes, no).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(yes_no_log_odds(logp, yes, no), torch.log(p_yes / p_no))
    both = pairwise_yes_no_ce_loss(logp, logp.flip(0), answers, yes, no)
    hand = (yes_no_ce_loss(logp, answers, yes, no) + yes_no_ce_loss(logp.flip(0), ~answers, yes, no)) / 2
    assert both.item() == pytest.approx(hand.item())


def test_loss_table_unknown_names_and_ties():
    assert {"bt", "bt-ties", "soli-ties", "gaussian-bt", "yes-no", "pairwise-yes-no"} <= set(LOSSES)
    with pytest.raises(ValueError, match=r"Unknown reward-model loss 'bt-tie'.*close: \['bt-ties'"):
        get_loss("bt-tie")
    r = PairRewards(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([False, True]))
    assert get_loss("bt-ties").fn(r, LossParams(kappa=0.5)).item() == pytest.approx(
        bt_ties_loss(r.a, r.b, r.tie, kappa=0.5).item())
    with pytest.raises(ValueError, match=r"1 tie pair\(s\) \(rows \[7\]\).*bt-ties"):
        check_ties(get_loss("bt"), [False, True], rows=[3, 7])
    check_ties(get_loss("bt-ties"), [True])
    with pytest.raises(ValueError, match="uncertainty head"):
        get_loss("gaussian-bt").fn(r, LossParams())
    with pytest.raises(ValueError, match="kappa"):
        LossParams(kappa=-1.0)
