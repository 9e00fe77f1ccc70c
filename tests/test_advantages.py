"""Per-prompt group advantages (docs/methods.md#grpo) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from visalign.rewards.advantages import AdvantageConfig, group_advantages, group_index

NAN = float("nan")
REWARDS = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0, 8.0])
GROUPS = ["a", "a", "b", "b", "c", "c", "c"]


def close(actual: torch.Tensor, expected: list[float], atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


@pytest.mark.parametrize(("config", "expected"), [
    # a: mean 2, std 1 → ±1/(1 + 1e-4); b: tied → 0; c: mean 4, std sqrt(32/3) = 3.265986 → ±4/3.266086
    (AdvantageConfig(), [-0.999900, 0.999900, 0.0, 0.0, -1.224707, 0.0, 1.224707]),
    # ddof 1: a std √2 → ±1/1.414314; c std 4 → ±4/4.0001
    (AdvantageConfig(ddof=1), [-0.707057, 0.707057, 0.0, 0.0, -0.999975, 0.0, 0.999975]),
    (AdvantageConfig(normalize_std=False, clip=None), [-1.0, 1.0, 0.0, 0.0, -4.0, 0.0, 4.0]),
    # one batch std (ddof 0) = 2.415934 for every group
    (AdvantageConfig(global_std=True), [-0.413902, 0.413902, 0.0, 0.0, -1.655606, 0.0, 1.655606]),
    (AdvantageConfig(clip=1.0), [-0.999900, 0.999900, 0.0, 0.0, -1.0, 0.0, 1.0]),
])
def test_group_advantages_match_hand_computed(config, expected):
    close(group_advantages(REWARDS, GROUPS, config).advantages, expected)


def test_zero_variance_and_single_sample_groups_are_zero_and_reported():
    out = group_advantages(torch.tensor([5.0, 5.0, 1.0, 2.0, 7.0]), ["t", "t", "u", "u", "solo"])
    # u: mean 1.5, std 0.5 → ±0.5/0.5001
    close(out.advantages, [0.0, 0.0, -0.999800, 0.999800, 0.0])
    assert out.zero_std.tolist() == [True, True, False, False, True]
    assert out.frac_zero_std == pytest.approx(3 / 5)
    assert out.group_index.tolist() == [0, 0, 1, 1, 2]


def test_tied_floats_count_as_zero_variance_even_with_rounding():
    # The float32 mean of seven 0.7s is 0.7 + 6e-8, so r − mean is rounding noise, not 0; divided by a tiny std it
    # would become ±1. The group must still give exactly 0.
    out = group_advantages(torch.full((7,), 0.7), [0] * 7, AdvantageConfig(eps=0.0))
    assert out.advantages.tolist() == [0.0] * 7 and out.zero_std.all()


def test_nan_rewards_are_left_out_and_get_zero():
    out = group_advantages(torch.tensor([1.0, 3.0, NAN]), ["a", "a", "a"])
    close(out.advantages, [-0.999900, 0.999900, 0.0])
    close(out.group_mean, [2.0, 2.0, 2.0])


def test_group_ids_may_be_prompts_ints_or_a_tensor():
    by_prompt = group_advantages(REWARDS, GROUPS).advantages
    by_tensor = group_advantages(REWARDS, torch.tensor([7, 7, 3, 3, 9, 9, 9])).advantages
    torch.testing.assert_close(by_prompt, by_tensor, atol=0, rtol=0)
    assert group_index(["x", "y", "x"]).tolist() == [0, 1, 0]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="one group id per sample"):
        group_advantages(REWARDS, GROUPS[:-1])
    with pytest.raises(TypeError, match="not a single string"):
        group_index("aab")
    with pytest.raises(ValueError, match="ddof"):
        AdvantageConfig(ddof=2)
    with pytest.raises(ValueError, match="clip"):
        AdvantageConfig(clip=0.0)
