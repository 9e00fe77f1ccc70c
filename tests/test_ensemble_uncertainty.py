"""Ensemble and uncertainty wrappers over offline rule scorers, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from visalign.scorers import ScoreBatch, get_scorer


def close(actual: torch.Tensor, expected: list[float], atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.float(), torch.tensor(expected), atol=atol, rtol=0)


def grey(*levels: float, size: int = 8) -> torch.Tensor:
    return torch.stack([torch.full((3, size, size), v) for v in levels])


def grey_and_red() -> ScoreBatch:
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    # members (brightness, saturation, contrast): grey 0.6 → (0.6, 0, 0); red → (0.299, 1, 0)
    return ScoreBatch(prompts=["g", "r"], media=torch.cat([grey(0.6), red]))


@pytest.mark.parametrize(("aggregation", "expected"), [
    ("mean", [0.2, 1.299 / 3]),
    ("median", [0.0, 0.299]),
    ("min", [0.0, 0.0]),
    # mean − Var: grey 0.2 − 0.08; red 0.433 − ((0.299 − 0.433)² + 0.567² + 0.433²) / 3 = 0.433 − 0.175645
    ({"kind": "mean-minus-var", "lam": 1.0}, [0.12, 0.257355]),
])
def test_ensemble_aggregations(aggregation, expected):
    out = get_scorer("ensemble-color", params={"aggregation": aggregation})(grey_and_red())
    close(out.reward, expected, atol=1e-4)
    close(out.extras["members"], [[0.6, 0.0, 0.0], [0.299, 1.0, 0.0]], atol=1e-4)


def test_ensemble_disagreement_is_member_std():
    out = get_scorer("ensemble-color")(grey_and_red())
    # population std of (0.6, 0, 0) = sqrt(0.08); of (0.299, 1, 0) = sqrt(0.175645)
    close(out.extras["disagreement"], [math.sqrt(0.08), math.sqrt(0.175645)], atol=1e-4)


def test_ensemble_is_differentiable_only_if_every_member_is():
    assert get_scorer("ensemble-color").differentiable
    mixed = get_scorer("ensemble-color", params={"members": ["brightness", "jpeg-compressibility"]})
    assert not mixed.differentiable
    batch = ScoreBatch(prompts=["a"], media=grey(0.5).requires_grad_(True))
    with pytest.raises(ValueError, match="not differentiable"):
        mixed(batch, grad=True)
    assert mixed(batch).extras["members"].shape == (1, 2)


def test_ensemble_config_errors():
    with pytest.raises(ValueError, match="at least two"):
        get_scorer("ensemble-color", params={"members": ["brightness"]})
    bad = get_scorer("ensemble-color", params={"members": ["brightness", {"id": "saturation"}]})
    with pytest.raises(ValueError, match="'scorer' \\(required\\)"):
        bad(ScoreBatch(prompts=["a"], media=grey(0.5)))


def split_image(size: int = 16) -> torch.Tensor:
    img = torch.zeros(1, 3, size, size)
    img[..., size // 2:] = 1.0  # left half black, right half white: crops at different offsets differ in brightness
    return img


def test_augment_mode_weights_stable_samples_up():
    scorer = get_scorer("uncertainty-color", params={"noise_std": 0.0})
    batch = ScoreBatch(prompts=["flat", "split"], media=torch.cat([grey(0.5, size=16), split_image()]))
    out = scorer(batch)
    torch.testing.assert_close(out.reward, get_scorer("brightness")(batch).reward, atol=0, rtol=0)  # base reward
    u = out.extras["uncertainty"]
    assert u[0] < 1e-10 < 1e-4 < u[1]  # a flat image looks the same in every crop
    # U / mean(U) = [0, 2] → w ∝ [1, e^−2], mean 1 → [2/(1 + e^−2), 2e^−2/(1 + e^−2)]
    close(out.extras["weight"], [1.761594, 0.238406], atol=1e-4)


def test_augment_mode_uncertainty_does_not_depend_on_batch_mates():
    scorer = get_scorer("uncertainty-color", params={"normalize": "none"})
    media = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    batch = ScoreBatch(prompts=["a", "b", "c"], media=media)
    together = scorer(batch).extras["uncertainty"]
    alone = torch.cat([scorer(batch.select([i])).extras["uncertainty"] for i in range(3)])
    torch.testing.assert_close(alone, together, atol=1e-9, rtol=0)
    assert (together > 0).all()
    torch.testing.assert_close(scorer(batch).extras["uncertainty"], together, atol=0, rtol=0)


def test_ensemble_mode_uses_member_variance():
    scorer = get_scorer("uncertainty-color", params={"base": "ensemble-color", "mode": "ensemble",
                                                     "normalize": "none"})
    out = scorer(ScoreBatch(prompts=["a", "b"], media=grey(0.6, 0.3)))
    close(out.extras["uncertainty"], [0.08, 0.02], atol=1e-5)  # Var of (0.6, 0, 0) and (0.3, 0, 0)
    # exp(−[0.08, 0.02]) = [0.923116, 0.980199], divided by their mean 0.951658
    close(out.extras["weight"], [0.970009, 1.029991], atol=1e-5)
    close(out.reward, [0.2, 0.1], atol=1e-5)
    with pytest.raises(ValueError, match="extras\\['members'\\]"):
        get_scorer("uncertainty-color", params={"mode": "ensemble"})(ScoreBatch(prompts=["a"], media=grey(0.5)))


def group_batch(levels, prompts=("p1", "p2", "p3", "p4"), groups=("x", "x", "y", "y")) -> ScoreBatch:
    metadata = None if groups is None else [{"group": g} for g in groups]
    return ScoreBatch(prompts=list(prompts), media=grey(*levels), metadata=metadata)


def test_group_mode_with_running_mean_and_state_round_trip():
    params = {"mode": "group", "normalize": "running-mean", "tau": 0.5}
    scorer = get_scorer("uncertainty-color", params=params)
    out = scorer(group_batch([0.2, 0.4, 0.5, 0.5]))
    close(out.extras["uncertainty"], [0.01, 0.01, 0.0, 0.0])  # Var of {0.2, 0.4}; {0.5, 0.5} agrees
    # running mean starts at the batch mean 0.005 → U_norm = [2, 2, 0, 0]; exp(−U_norm/0.5) / mean
    close(out.extras["weight"], [0.035972, 0.035972, 1.964028, 1.964028], atol=1e-5)
    assert scorer.state_dict()["running_mean"] == pytest.approx(0.005)
    resumed = get_scorer("uncertainty-color", params=params)
    resumed.load_state_dict(scorer.state_dict())
    second = group_batch([0.2, 0.6, 0.5, 0.5])  # U = [0.04, 0.04, 0, 0], batch mean 0.02
    torch.testing.assert_close(resumed(second).extras["weight"], scorer(second).extras["weight"], atol=0, rtol=0)
    assert scorer.state_dict()["running_mean"] == pytest.approx(0.9 * 0.005 + 0.1 * 0.02)


def test_group_mode_falls_back_to_prompts():
    scorer = get_scorer("uncertainty-color", params={"mode": "group", "normalize": "none"})
    out = scorer(group_batch([0.2, 0.4, 0.5, 0.5], prompts=["x", "x", "y", "y"], groups=None))
    close(out.extras["uncertainty"], [0.01, 0.01, 0.0, 0.0])


def test_uncertainty_config_errors():
    with pytest.raises(ValueError, match="mode 'bogus'"):
        get_scorer("uncertainty-color", params={"mode": "bogus"})
    with pytest.raises(ValueError, match="num_views"):
        get_scorer("uncertainty-color", params={"num_views": 1})
    with pytest.raises(ValueError, match="running_mean"):
        get_scorer("uncertainty-color").load_state_dict({})
