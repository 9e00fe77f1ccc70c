"""Aggregations against hand-computed values: nan-aware weighted sum, GDPO, Pareto, WCO, UWO, mean, median."""

from __future__ import annotations

import pytest
import torch

from visalign.registry import UnknownIdError
from visalign.rewards.advantages import group_advantages
from visalign.rewards.aggregate import build_aggregation, list_aggregations, pareto_mask

NAN = float("nan")


def close(actual: torch.Tensor, expected: list[float], atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0, equal_nan=True)


def test_registry_lists_every_aggregation():
    assert set(list_aggregations()) == {"weighted-sum", "mean", "median", "worst-case", "min", "mean-minus-var",
                                        "gdpo", "pareto", "sum_then_normalize", "normalize_then_sum"}


def test_trl_names_of_the_two_multi_reward_modes_are_the_weighted_sum_and_gdpo():
    from visalign.rewards.aggregate import Gdpo, WeightedSum

    assert type(build_aggregation("sum_then_normalize")) is WeightedSum
    assert type(build_aggregation("normalize_then_sum")) is Gdpo


@pytest.mark.parametrize(("spec", "rewards", "weights", "expected"), [
    # all present: 0.2·1 + 0.4·3 = 1.4; one NaN: 0.2·1 rescaled by Σ|w| / Σ_present |w| = 4 / 1 → 0.8; none: NaN
    ("weighted-sum", [[0.2, 0.4], [0.2, NAN], [NAN, NAN]], [1.0, 3.0], [1.4, 0.8, NAN]),
    ("mean", [[0.2, 0.4], [0.2, NAN], [NAN, NAN]], [1.0, 3.0], [0.35, 0.2, NAN]),
    # even count → mean of the two middle values ([4, 2] → 3); zero-weight column dropped in the last row set
    ("median", [[1.0, 5.0, 2.0], [4.0, NAN, 2.0], [NAN, NAN, NAN]], [1.0, 1.0, 1.0], [2.0, 3.0, NAN]),
    ("median", [[1.0, 5.0, 2.0]], [1.0, 0.0, 1.0], [1.5]),
    ("worst-case", [[1.0, 5.0, 2.0], [4.0, NAN, 2.0], [NAN, NAN, NAN]], [1.0, 1.0, 1.0], [1.0, 2.0, NAN]),
    ("min", [[1.0, 5.0, 2.0], [4.0, NAN, 2.0]], [1.0, 1.0, 1.0], [1.0, 2.0]),
    # mean 2, population var 1 → 2 − 0.5·1; a single present value has var 0
    ({"kind": "mean-minus-var", "lam": 0.5}, [[1.0, 3.0], [2.0, NAN]], [1.0, 1.0], [1.5, 2.0]),
    ({"kind": "mean-minus-var", "lam": 2.0}, [[0.0, 1.0, 2.0]], [1.0, 1.0, 1.0], [1.0 - 2.0 * 2 / 3]),
])
def test_aggregation_matches_hand_computed(spec, rewards, weights, expected):
    out = build_aggregation(spec)(torch.tensor(rewards), torch.tensor(weights))
    close(out.total, expected)
    assert out.advantages is None and out.keep is None


def test_gdpo_differs_from_group_normalising_the_summed_reward_when_sums_tie():
    # Group a: totals 1·0 + 2·1 = 2 and 1·2 + 2·0 = 2 tie, so summed-then-normalised gives no signal.
    # Group b: reward 1 ties (5, 5), reward 2 differs.
    rewards = torch.tensor([[0.0, 1.0], [2.0, 0.0], [5.0, 0.0], [5.0, 1.0]])
    weights = torch.tensor([1.0, 2.0])
    groups = ["a", "a", "b", "b"]
    out = build_aggregation("gdpo")(rewards, weights, groups)
    close(out.total, [2.0, 2.0, 5.0, 7.0])
    plain = group_advantages(out.total, groups).advantages
    close(plain, [0.0, 0.0, -0.999900, 0.999900])
    # Per reward, per group (ddof 1, eps 1e-4): group a r1 = [0, 2] → ∓1/(√2 + 1e-4) = ∓0.707057,
    # r2 = [1, 0] → ±0.5/(√0.5 + 1e-4) = ±0.707007; group b r1 tied → 0, r2 → ∓0.707007.
    # Weighted: [−0.707057 + 1.414014, 0.707057 − 1.414014, −1.414014, 1.414014] = [0.706957, −0.706957, ∓1.414014]
    # Batch: mean 0, std (ddof 1) = sqrt((2·0.706957² + 2·1.414014²) / 3) = 1.290793 → divide by 1.290893.
    close(out.advantages, [0.547650, -0.547650, -1.095378, 1.095378], atol=1e-4)
    close(out.extras["per_reward_advantage"][:2], [[-0.707057, 0.707007], [0.707057, -0.707007]])


def test_gdpo_falls_back_without_groups_or_with_one_active_term():
    rewards = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert build_aggregation("gdpo")(rewards, torch.tensor([1.0, 2.0])).advantages is None
    assert build_aggregation("gdpo")(rewards, torch.tensor([1.0, 0.0]), ["a", "a"]).advantages is None


def test_gdpo_skips_nan_rewards_in_group_statistics():
    rewards = torch.tensor([[0.0, 1.0], [2.0, NAN], [4.0, 0.0]])
    out = build_aggregation("gdpo")(rewards, torch.tensor([1.0, 1.0]), ["a", "a", "a"])
    assert torch.isfinite(out.advantages).all()
    # reward 2 over the present [1, 0]: ±0.707007; sample 2 gets only reward 1's z-score (0 after centring → 0)
    close(out.extras["per_reward_advantage"][:, 1], [0.707007, NAN, -0.707007])


def test_pareto_mask_on_hand_example():
    # a=(1,1) b=(2,0) c=(0,2) d=(.5,.5) dominated by a; e ties a (kept); f=(2, NaN) dominated by b (NaN is worst)
    rewards = torch.tensor([[1, 1], [2, 0], [0, 2], [0.5, 0.5], [1, 1], [2, NAN]])
    assert pareto_mask(rewards).tolist() == [True, True, True, False, True, False]


def test_pareto_uses_weight_signs_and_ignores_zero_weights():
    pareto = build_aggregation("pareto")
    pq = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert pareto(pq, torch.tensor([1.0, 1.0])).keep.tolist() == [False, True]
    assert pareto(pq, torch.tensor([1.0, -1.0])).keep.tolist() == [True, True]  # lower r2 is better: a trade-off
    out = pareto(torch.tensor([[1.0, 5.0], [2.0, 0.0]]), torch.tensor([1.0, 0.0]))
    assert out.keep.tolist() == [False, True]
    close(out.total, [1.0, 2.0])
    assert float(out.extras["pareto_fraction"]) == 0.5


def test_ensemble_rules_keep_gradients():
    r = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    build_aggregation({"kind": "mean-minus-var", "lam": 1.0})(r).total.sum().backward()
    # d/dr_m (mean − Var) = 1/M − 2(r_m − mean)/M
    close(r.grad, [[1 / 3 + 2 / 3, 1 / 3, 1 / 3 - 2 / 3]])
    r.grad = None
    build_aggregation("median")(r).total.sum().backward()
    close(r.grad, [[0.0, 1.0, 0.0]])


def test_bad_inputs_raise_helpful_errors():
    with pytest.raises(UnknownIdError, match="Did you mean 'pareto'"):
        build_aggregation("paretto")
    with pytest.raises(ValueError, match="one weight per term"):
        build_aggregation("weighted-sum")(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="not all zero"):
        build_aggregation("weighted-sum")(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[B, M\]"):
        build_aggregation("mean")(torch.zeros(3))
    with pytest.raises(ValueError, match="lam >= 0"):
        build_aggregation({"kind": "mean-minus-var", "lam": -1.0})
