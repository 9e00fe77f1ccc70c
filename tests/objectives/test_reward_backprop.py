"""Reward backprop (DRaFT-K, AlignProp, ReFL; docs/methods.md#reward-backprop): the re-run tail replays the rollout,
its gradient is the sampler's true derivative (finite differences), gradient confinement per mode, and the Trainer
raises the reward with it."""

from __future__ import annotations

import pytest
import torch

from tests.objectives.conftest import PROMPTS, GradRecorder, make_batch, make_context, train_overrides
from visalign.generators import load_generator
from visalign.objectives.base import build_objective
from visalign.objectives.reward_backprop import (
    RewardBackpropParams,
    _gaussian,
    differentiable_tail,
    refl_step,
)
from visalign.train.config import load_train_config
from visalign.train.loop import Trainer


def brightness(media: torch.Tensor, prompts: list[str], metadata=None) -> torch.Tensor:
    """Mean pixel value ``[B]``, differentiable (what ``ctx.reward`` returns)."""
    return media.float().flatten(1).mean(1)


@pytest.fixture(scope="module")
def adapter(bright_sd_path):
    adapter = load_generator(str(bright_sd_path))
    adapter.train_full()
    return adapter


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_tail_replays_the_rollout(adapter, eta):
    """Re-running every step with a graph lands on the rollout's own latents and decodes to its own media."""
    rollout = adapter.rollout(PROMPTS, images_per_prompt=2, steps=3, guidance=1.0, eta=eta, seed=5, height=8, width=8)
    final = differentiable_tail(adapter, rollout, 0)
    assert final.requires_grad
    torch.testing.assert_close(final.detach(), rollout.latents[:, -1].float(), atol=1e-6, rtol=0)
    media = adapter.decode(final, grad=True)
    torch.testing.assert_close(media.detach(), rollout.media, atol=1e-5, rtol=0)


def test_gradient_matches_finite_differences(adapter):
    """η = 0: the full tail's autograd derivative of the mean brightness along a random direction of one weight equals
    the central difference of fresh deterministic rollouts at θ ± h·v."""
    param = adapter.denoiser.conv_out.weight
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(param.shape, generator=g)
    direction /= direction.norm()

    def rollout():
        return adapter.rollout(PROMPTS, images_per_prompt=2, steps=3, guidance=1.0, eta=0.0, seed=11, height=8,
                               width=8)

    r = rollout()
    adapter.denoiser.zero_grad(set_to_none=True)
    brightness(adapter.decode(differentiable_tail(adapter, r, 0), grad=True), r.prompts).mean().backward()
    analytic = float((param.grad * direction).sum())
    h = 1e-2
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            param.add_(sign * h * direction)
        values.append(float(brightness(rollout().media, r.prompts).mean()))
        with torch.no_grad():
            param.sub_(sign * h * direction)
    numeric = (values[0] - values[1]) / (2 * h)
    adapter.denoiser.zero_grad(set_to_none=True)
    assert abs(numeric) > 1e-4, "the direction must move the reward for the comparison to mean anything"
    assert analytic == pytest.approx(numeric, rel=0.05)


@pytest.mark.parametrize(("name", "params", "grad_calls"), [
    ("draft", {"k": 1}, 1),
    ("draft", {"k": 2}, 2),
    ("draft", {"k": 0}, 4),  # full DRaFT: every step
    ("refl", {"refl_range": [0.5, 1.0]}, 1),
])
def test_only_the_chosen_steps_carry_gradient(adapter, name, params, grad_calls):
    """Gradient confinement: count the denoiser calls made with grad enabled during one update."""
    rollout = adapter.rollout(PROMPTS, images_per_prompt=2, steps=4, guidance=1.0, eta=0.0, seed=3, height=8, width=8)
    batch = make_batch(rollout, brightness(rollout.media, rollout.prompts))
    calls = []
    hook = adapter.denoiser.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    named = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    recorder = GradRecorder(named)
    ctx = make_context(adapter, [], recorder)
    ctx.reward = brightness
    objective = build_objective(name, {**params, "checkpoint_steps": False})
    try:
        metrics = objective.update(batch, ctx)
    finally:
        hook.remove()
    assert sum(calls) == grad_calls
    assert metrics["grad_steps"] == grad_calls
    assert any(bool(g.abs().sum() > 0) for g in recorder.grads[0].values())
    if name == "draft":  # the re-run chain scores the rollout's own samples (ReFL scores a one-step x0 estimate)
        assert metrics["reward_grad_mean"] == pytest.approx(float(batch.rewards.mean()), abs=1e-5)


def test_checkpointed_steps_give_the_same_gradient(adapter):
    rollout = adapter.rollout(PROMPTS, images_per_prompt=2, steps=3, guidance=1.0, eta=0.0, seed=4, height=8, width=8)
    grads = []
    for use_checkpoint in (False, True):
        adapter.denoiser.zero_grad(set_to_none=True)
        media = adapter.decode(differentiable_tail(adapter, rollout, 0, use_checkpoint=use_checkpoint), grad=True)
        brightness(media, rollout.prompts).mean().backward()
        grads.append(adapter.denoiser.conv_out.weight.grad.clone())
    adapter.denoiser.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)


def test_truncation_draws_stay_in_range():
    g = torch.Generator().manual_seed(0)
    p = RewardBackpropParams(backprop="gaussian")
    starts = [_gaussian(50, p, g) for _ in range(200)]
    assert min(starts) >= 1 and max(starts) < 50
    assert 40 <= sum(starts) / len(starts) <= 44  # AlignProp's N(42, 5) on 50 steps
    q = RewardBackpropParams(backprop="refl", refl_range=[0.75, 1.0])
    assert {refl_step(40, q, g) for _ in range(300)} == set(range(30, 40))  # ReFL's m ∈ [30, 39] of 40


@pytest.mark.parametrize(("params", "match"), [
    ({"backprop": "last"}, "last-k"),
    ({"k": -1}, "k >= 0"),
    ({"refl_range": [0.9, 0.5]}, "refl_range"),
])
def test_bad_params_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        build_objective("reward-backprop", params)


def test_trainer_rejects_a_reward_without_gradients(bright_sd_path, prompt_file, tmp_path):
    overrides = train_overrides(bright_sd_path, prompt_file, tmp_path / "run", "draft", iterations=1)
    overrides += ["reward.terms=[{scorer: shapes-oracle, weight: 1.0}]"]
    with pytest.raises(ValueError, match="shapes-oracle"):
        Trainer(load_train_config(None, overrides))


def _eval_brightness(trainer: Trainer) -> float:
    s = trainer.config.sample
    rollout = trainer.adapter.rollout(PROMPTS, images_per_prompt=16, steps=s.steps, guidance=s.guidance, eta=0.0,
                                      seed=4321, height=8, width=8)
    return float(rollout.media.mean())


@pytest.mark.parametrize("name", ["draft", "alignprop", "refl"])
def test_trainer_raises_the_reward_and_its_negation_lowers_it(name, bright_sd_path, prompt_file, tmp_path):
    """Deterministic sampling (η = 0) with a zero-weight monitor term beside the reward: the paired brightness of a
    fixed batch rises with the reward and falls with its negation."""
    gains = {}
    params = {"draft": {"k": 0}, "alignprop": {}, "refl": {"grad_scale": 1.0, "reward_cap": 1.0}}[name]
    for label, weight in (("reward", 1.0), ("negated", -1.0)):
        overrides = train_overrides(bright_sd_path, prompt_file, tmp_path / label, name, iterations=8, lr=3e-4,
                                    params=params)
        overrides += ["sample.eta=0.0", "model.resolution=8",
                      f"reward.terms=[{{scorer: brightness, weight: {weight}}}, "
                      "{scorer: jpeg-compressibility, weight: 0.0, name: monitor}]"]
        trainer = Trainer(load_train_config(None, overrides))
        before = _eval_brightness(trainer)
        summary = trainer.run(resume=False)
        gains[label] = _eval_brightness(trainer) - before
        assert summary["iterations"] == 8
    assert gains["reward"] > 0.005 and gains["negated"] < -0.005, gains


def test_uncertainty_weights_scale_each_samples_gradient(adapter):
    """The loss is linear in the per-sample weights: grad(w = a) + grad(w = b) = grad(w = a + b) = 3·grad(ones)."""
    rollout = adapter.rollout(PROMPTS, images_per_prompt=2, steps=3, guidance=1.0, eta=0.0, seed=9, height=8, width=8)
    rewards = brightness(rollout.media, rollout.prompts)
    named = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}

    def grad(weights: list[float]) -> torch.Tensor:
        recorder = GradRecorder(named)
        ctx = make_context(adapter, [], recorder)
        ctx.reward = brightness
        build_objective("draft", {"k": 0}).update(make_batch(rollout, rewards, weights=torch.tensor(weights)), ctx)
        return recorder.grads[0]["conv_out.weight"]

    a, b = grad([1.0, 2.0, 1.0, 2.0]), grad([2.0, 1.0, 2.0, 1.0])
    torch.testing.assert_close(a + b, 3 * grad([1.0, 1.0, 1.0, 1.0]), atol=1e-8, rtol=1e-4)
    assert not torch.allclose(a, b)  # the weights do change which sample's gradient counts more
