"""RewardSpec over real registered rule scorers and plain callables: values, advantages, NaN, metrics, state."""

from __future__ import annotations

import pickle

import pytest
import torch

from visalign.rewards.advantages import AdvantageConfig
from visalign.rewards.spec import RewardOutput, RewardSpec
from visalign.scorers import ScoreBatch

NAN = float("nan")


class MeanRed:
    """Mean of the red channel; a plain callable reward (a class so it pickles)."""

    def __call__(self, media: torch.Tensor, prompts: list[str], **kwargs) -> torch.Tensor:
        return media[:, 0].mean(dim=(1, 2))


class FromMetadata:
    """Reads ``metadata[i][key]``; None abstains. Lets a test put exact rewards through the real scoring path."""

    def __init__(self, key: str):
        self.key = key
        self.__name__ = key

    def __call__(self, media: torch.Tensor, prompts: list[str], metadata=None, **kwargs) -> list[float | None]:
        return [m[self.key] for m in metadata]


def colour_batch(prompts=("p", "p")) -> ScoreBatch:
    grey = torch.full((3, 8, 8), 0.2)  # brightness 0.2, saturation 0, red 0.2
    red = torch.zeros(3, 8, 8)
    red[0] = 1.0  # brightness = Rec. 601 red weight 0.299, saturation 1, red 1
    return ScoreBatch(prompts=list(prompts), media=torch.stack([grey, red]))


def metadata_batch(rows: list[dict], prompts: list[str]) -> ScoreBatch:
    return ScoreBatch(prompts=prompts, media=torch.zeros(len(rows), 3, 4, 4), metadata=rows)


def close(actual: torch.Tensor, expected: list[float], atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.float(), torch.tensor(expected), atol=atol, rtol=0, equal_nan=True)


def test_weighted_sum_over_rule_scorers_and_a_callable():
    spec = RewardSpec.from_config([
        "brightness",
        {"scorer": "saturation", "weight": 0.5},
        {"scorer": MeanRed(), "weight": 2.0, "name": "red"},
    ])
    out = spec(colour_batch())
    assert spec.names == ["brightness", "saturation", "red"]
    close(out.raw["brightness"], [0.2, 0.299])
    close(out.raw["saturation"], [0.0, 1.0])
    close(out.raw["red"], [0.2, 1.0])
    close(out.total, [0.2 + 0.0 + 0.4, 0.299 + 0.5 + 2.0])
    assert out.advantages is None
    assert set(out.extras) >= {"brightness/native", "saturation/native", "red/native"}


def test_group_advantages_and_transforms_per_term():
    spec = RewardSpec.from_config({
        "terms": ["brightness", {"scorer": "saturation", "transform": {"kind": "affine", "lo": 0.0, "hi": 2.0}}],
        "advantage": {"clip": None, "ddof": 0},
    })
    out = spec(colour_batch(), group_ids=["p", "p"])
    close(out.per_scorer["saturation"], [0.0, 0.5])  # transformed
    close(out.raw["saturation"], [0.0, 1.0])  # before the transform, kept for logging
    close(out.total, [0.2, 0.799])
    # two samples, ddof 0: ±(0.2995)/(0.2995 + 1e-4)
    close(out.advantages, [-0.999666, 0.999666])
    assert out.extras["zero_std"].tolist() == [False, False]


def test_nan_term_is_skipped_and_weights_renormalised():
    spec = RewardSpec.from_config([{"scorer": FromMetadata("a"), "weight": 1.0},
                                   {"scorer": FromMetadata("b"), "weight": 3.0}])
    out = spec(metadata_batch([{"a": 0.2, "b": 0.4}, {"a": 0.2, "b": None}, {"a": None, "b": None}], ["x"] * 3),
               group_ids=["x"] * 3)
    close(out.raw["b"], [0.4, NAN, NAN])
    close(out.total, [1.4, 0.8, NAN])  # 0.2·1·(4/1) for the middle one
    # the all-NaN sample is left out of its group and gets advantage 0
    close(out.advantages, [0.999667, -0.999667, 0.0])


def test_gdpo_spec_gives_signal_where_the_weighted_sum_ties():
    rows = [{"r1": 0.0, "r2": 1.0}, {"r1": 2.0, "r2": 0.0}]
    terms = [{"scorer": FromMetadata("r1"), "weight": 1.0}, {"scorer": FromMetadata("r2"), "weight": 2.0}]
    batch = metadata_batch(rows, ["p", "p"])
    summed = RewardSpec.from_config({"terms": terms})(batch, group_ids=batch.prompts)
    gdpo = RewardSpec.from_config({"terms": terms, "aggregation": "gdpo"})(batch, group_ids=batch.prompts)
    close(summed.total, [2.0, 2.0])
    close(summed.advantages, [0.0, 0.0])
    assert summed.metrics()["frac_reward_zero_std"] == 1.0
    # ±0.706957 after weighting, then batch-normalised (ddof 1): ±0.706957 / (0.706957·√2 + 1e-4)
    close(gdpo.advantages, [0.707028, -0.707028], atol=1e-4)


def test_pareto_spec_zeroes_advantages_of_dominated_samples():
    rows = [{"r1": 1.0, "r2": 1.0}, {"r1": 0.5, "r2": 0.5}, {"r1": 2.0, "r2": 0.0}]
    spec = RewardSpec.from_config({"terms": [FromMetadata("r1"), FromMetadata("r2")], "aggregation": "pareto"})
    out = spec(metadata_batch(rows, ["p"] * 3), group_ids=["p"] * 3)
    assert out.extras["keep"].tolist() == [True, False, True]
    close(out.total, [2.0, 1.0, 2.0])
    # totals [2, 1, 2]: mean 5/3, std 0.471405 → the dominated middle sample would get −1.413914; it gets 0
    close(out.advantages, [0.706957, 0.0, 0.706957], atol=1e-4)
    assert out.metrics()["pareto_fraction"] == pytest.approx(2 / 3)


def test_reference_transforms_read_refs_from_argument_or_metadata():
    spec = RewardSpec.from_config([{"scorer": "brightness", "transform": "centred"}])
    batch = colour_batch()
    close(spec(batch, ref_rewards={"brightness": torch.tensor([0.1, 0.3])}).total, [0.1, -0.001])
    batch.metadata = [{"ref_rewards": {"brightness": [0.0, 0.2]}}, {"ref_rewards": {"brightness": [0.3, 0.3]}}]
    close(spec(batch).total, [0.1, -0.001])
    with pytest.raises(ValueError, match="ref_rewards"):
        spec(colour_batch())


def test_metrics_use_trl_names_and_values():
    out = RewardSpec.from_config(["brightness", "saturation"])(colour_batch(["p", "q"]), group_ids=["p", "q"])
    m = out.metrics()
    assert m["reward/brightness/mean"] == pytest.approx(0.2495)
    assert m["reward/brightness/std"] == pytest.approx(0.099 / 2**0.5, abs=1e-6)  # ddof 1 over [0.2, 0.299]
    assert m["reward/saturation/mean"] == pytest.approx(0.5)
    assert m["reward"] == pytest.approx((0.2 + 1.299) / 2)
    assert m["frac_reward_zero_std"] == 1.0  # two groups of one: no preference anywhere
    assert m["reward_std"] == 0.0


def test_grad_reaches_media_through_the_total():
    spec = RewardSpec.from_config(["brightness", {"scorer": "contrast", "weight": 0.5}])
    assert spec.differentiable
    batch = colour_batch()
    batch.media.requires_grad_(True)
    spec(batch, grad=True).total.sum().backward()
    assert batch.media.grad is not None and batch.media.grad.abs().sum() > 0
    assert not RewardSpec.from_config([MeanRed()]).differentiable


def test_running_zscore_state_round_trips_and_spec_pickles():
    config = [{"scorer": "brightness", "transform": "running-zscore"}]
    spec = RewardSpec.from_config(config)
    spec(colour_batch())
    state = spec.state_dict()
    assert state["transforms"]["brightness"]["count"] == 2.0
    resumed = RewardSpec.from_config(config)
    resumed.load_state_dict(state)
    clone = pickle.loads(pickle.dumps(spec))
    nxt = colour_batch()
    expected = spec(nxt).total
    torch.testing.assert_close(resumed(nxt).total, expected, atol=0, rtol=0)
    torch.testing.assert_close(clone(nxt).total, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not a term"):
        resumed.load_state_dict({"transforms": {"saturation": {}}})


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="weigth"):
        RewardSpec.from_config([{"scorer": "brightness", "weigth": 2.0}])
    with pytest.raises(ValueError, match="named 'brightness'"):
        RewardSpec.from_config(["brightness", "brightness"])
    with pytest.raises(ValueError, match="aggregate"):
        RewardSpec.from_config({"terms": ["brightness"], "aggregate": "gdpo"})
    with pytest.raises(KeyError, match="Unknown scorer 'brightnes'"):
        RewardSpec.from_config(["brightnes"])
    with pytest.raises(ValueError, match="one group id per sample"):
        RewardSpec.from_config(["brightness"])(colour_batch(), group_ids=["p"])
    assert isinstance(RewardSpec(terms=["brightness"], advantage=AdvantageConfig(clip=None))(colour_batch()),
                      RewardOutput)
