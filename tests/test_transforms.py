"""Reward transforms against hand-computed values (docs/methods.md#transforms); NaN always passes through."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visalign.registry import UnknownIdError
from visalign.rewards.transforms import build_transform, list_transforms

NAN = float("nan")


def close(actual: torch.Tensor, expected: list[float], atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0, equal_nan=True)


def test_registry_lists_every_transform():
    assert list_transforms() == sorted(
        ["identity", "affine", "running-zscore", "rank", "centred", "log-sigmoid", "par"])


@pytest.mark.parametrize(("spec", "rewards", "reference", "expected"), [
    ("identity", [0.2, NAN, -3.0], None, [0.2, NAN, -3.0]),
    # (r - 2) / (4 - 2), clamped to [0, 1]
    ({"kind": "affine", "lo": 2.0, "hi": 4.0}, [1.0, 3.0, 5.0, NAN], None, [0.0, 0.5, 1.0, NAN]),
    ({"kind": "affine", "lo": 2.0, "hi": 4.0, "clamp": False}, [1.0, 3.0, 5.0], None, [-0.5, 0.5, 1.5]),
    # lo > hi flips the direction: lower raw is better
    ({"kind": "affine", "lo": 4.0, "hi": 2.0}, [2.0, 3.0, 4.0], None, [1.0, 0.5, 0.0]),
    # ties share their mean rank: sorted 1 < 2 = 2 < 3 → ranks 0, 1.5, 1.5, 3, divided by n − 1 = 3
    ("rank", [3.0, 1.0, 2.0, 2.0, NAN], None, [1.0, 0.0, 0.5, 0.5, NAN]),
    ("rank", [7.0, NAN], None, [0.5, NAN]),
    # r − r_ref; a [B, M] reference is averaged over M (NaN reference samples skipped)
    ("centred", [1.0, 2.0, NAN], [0.5, 3.0, 0.0], [0.5, -1.0, NAN]),
    ("centred", [1.0, 2.0], [[0.0, 1.0], [2.0, NAN]], [0.5, 0.0]),
    # log σ(0) = −0.693147, log σ(−2) = −2.126928
    ("log-sigmoid", [1.0, 0.0, NAN], [1.0, 2.0, 0.0], [-0.693147, -2.126928, NAN]),
    # σ(1·(1 − 0)) = 0.731059
    ("par", [1.0], [0.0], [0.731059]),
    # (σ(2·(0 − 0)) + σ(2·(0 − 2))) / 2 = (0.5 + 0.017986) / 2
    ({"kind": "par", "k": 2.0}, [0.0, NAN], [[0.0, 2.0], [0.0, 1.0]], [0.258993, NAN]),
])
def test_transform_matches_hand_computed(spec, rewards, reference, expected):
    transform = build_transform(spec)
    ref = None if reference is None else torch.tensor(reference)
    close(transform(torch.tensor(rewards), ref), expected)


def test_running_zscore_whitens_with_welford_statistics_across_batches():
    z = build_transform("running-zscore")
    # batch 1: mean 2, population std sqrt(2/3) = 0.816497 → ±1/0.816497
    close(z(torch.tensor([1.0, 2.0, 3.0])), [-1.224745, 0.0, 1.224745])
    # batch 2 folds in 4 (NaN skipped): {1, 2, 3, 4} has mean 2.5, std sqrt(1.25) = 1.118034
    close(z(torch.tensor([4.0, NAN])), [1.341641, NAN])
    assert z.state_dict() == pytest.approx({"count": 4.0, "mean": 2.5, "m2": 5.0})


def test_running_zscore_matches_numpy_over_many_batches():
    rng = np.random.default_rng(0)
    z = build_transform("running-zscore")
    seen = []
    for size in (5, 1, 17, 3):
        batch = rng.normal(3.0, 2.0, size)
        seen.extend(batch)
        out = z(torch.tensor(batch, dtype=torch.float32))
    np.testing.assert_allclose(out.numpy(), (batch - np.mean(seen)) / np.std(seen), atol=1e-5)


def test_running_zscore_clip_and_frozen_statistics():
    z = build_transform({"kind": "running-zscore", "clip": 1.0})
    close(z(torch.tensor([1.0, 2.0, 3.0])), [-1.0, 0.0, 1.0])
    frozen = build_transform({"kind": "running-zscore", "update": False})
    frozen.load_state_dict(z.state_dict())
    close(frozen(torch.tensor([2.0 + math.sqrt(2 / 3)])), [1.0])
    assert frozen.state_dict() == z.state_dict()  # update=False did not move the statistics


def test_running_zscore_state_round_trip_resumes_exactly():
    a = build_transform("running-zscore")
    a(torch.tensor([0.5, 1.5, 9.0]))
    b = build_transform("running-zscore")
    b.load_state_dict(a.state_dict())
    nxt = torch.tensor([2.0, -1.0])
    torch.testing.assert_close(b(nxt), a(nxt), atol=0, rtol=0)
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"count": 1.0})


def test_stateless_transforms_reject_state():
    assert build_transform("rank").state_dict() == {}
    with pytest.raises(ValueError, match="stateless"):
        build_transform("rank").load_state_dict({"mean": 1.0})


@pytest.mark.parametrize("kind", ["centred", "log-sigmoid", "par"])
def test_reference_transforms_need_a_reference_of_the_right_length(kind):
    transform = build_transform(kind)
    with pytest.raises(ValueError, match="reference"):
        transform(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="B = 2"):
        transform(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))


def test_differentiable_transforms_pass_gradients():
    r = torch.tensor([0.3, 0.7], requires_grad=True)
    build_transform("log-sigmoid")(r, torch.tensor([0.5, 0.5])).sum().backward()
    # d/dr log σ(r − 0.5) = 1 − σ(r − 0.5)
    close(r.grad, [1 - 1 / (1 + math.exp(0.2)), 1 - 1 / (1 + math.exp(-0.2))])


def test_bad_specs_raise_helpful_errors():
    with pytest.raises(UnknownIdError, match="Did you mean 'rank'"):
        build_transform("rnak")
    with pytest.raises(ValueError, match="lo != hi"):
        build_transform({"kind": "affine", "lo": 1.0, "hi": 1.0})
    with pytest.raises(ValueError, match="Bad parameters"):
        build_transform({"kind": "rank", "temperature": 2.0})
    with pytest.raises(ValueError, match="kind"):
        build_transform({"lo": 0.0})
    with pytest.raises(ValueError, match=r"1-D tensor \[B\]"):
        build_transform("identity")(torch.zeros(2, 2))
