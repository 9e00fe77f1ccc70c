"""Which rollout steps the loop trains on: never a deterministic (NaN log-prob) step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from visalign.train.loop import TrainingError
from visalign.train.sources.online import OnlineSource


def make(fraction: float = 1.0, per_update: int | None = None, eta: float = 1.0, needs_log_probs: bool = True):
    """The online source's state that step selection reads: the sampler config, the seed and the objective's needs."""
    sample = SimpleNamespace(train_fraction=fraction, train_steps_per_update=per_update, eta=eta)
    ctx = SimpleNamespace(config=SimpleNamespace(sample=sample), seed=lambda salt: 7)
    return SimpleNamespace(ctx=ctx, needs=frozenset({"log_probs"}) if needs_log_probs else frozenset())


def rollout(log_probs: torch.Tensor):
    return SimpleNamespace(log_probs=log_probs, num_steps=log_probs.shape[1])


def test_deterministic_last_step_is_left_out():
    lp = torch.zeros(3, 4)
    lp[:, 3] = float("nan")  # DDIM's last step lands on alpha_bar = 1: zero noise, no density
    assert OnlineSource.train_steps(make(), rollout(lp)) == [0, 1, 2]
    lp[1, 1] = float("nan")
    assert OnlineSource.train_steps(make(), rollout(lp)) == [0, 2]


def test_fraction_and_subset_apply_to_finite_steps():
    lp = torch.zeros(2, 10)
    assert OnlineSource.train_steps(make(fraction=0.5), rollout(lp)) == [0, 1, 2, 3, 4]
    picked = OnlineSource.train_steps(make(per_update=3), rollout(lp))
    assert len(picked) == 3 and picked == sorted(picked) and set(picked) <= set(range(10))


def test_no_finite_step_is_a_clear_error():
    with pytest.raises(TrainingError, match="eta"):
        OnlineSource.train_steps(make(eta=0.0), rollout(torch.full((2, 3), float("nan"))))


def test_reward_backprop_needs_no_stochastic_step():
    """Reward backprop samples with η = 0 (no step has a density) and picks its own steps: no error."""
    deterministic = rollout(torch.full((2, 4), float("nan")))
    assert OnlineSource.train_steps(make(eta=0.0, needs_log_probs=False), deterministic) == [0, 1, 2, 3]
