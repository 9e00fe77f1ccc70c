"""DiffusionNFT (docs/methods.md#nft): the optimality map, parity of the x0-space loss with the official
velocity-space formula, a zero gradient when every reward is equal, a step toward positive samples (away from
negative ones) that is exactly the scaled denoising gradient, and the EMA sampling policy the engine samples with."""

from __future__ import annotations

import pytest
import torch

from tests.objectives.conftest import GradRecorder, make_batch, make_context
from visalign.generators import load_generator
from visalign.objectives.base import build_objective
from visalign.objectives.forward_process import draw_noised
from visalign.objectives.nft import nft_loss, optimality
from visalign.objectives.sampling_policy import SamplingPolicy


@pytest.fixture(scope="module")
def adapter(bright_sd_path):
    adapter = load_generator(bright_sd_path)
    adapter.train_full()
    return adapter


def _params(adapter):
    return {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}


def _flat(grads, names):
    return torch.cat([grads[n].flatten() for n in names])


def test_optimality_maps_clipped_advantages_to_unit_interval():
    advantages = torch.tensor([-12.0, -5.0, -1.0, 0.0, 2.5, 5.0, 9.0])
    expected = torch.tensor([0.0, 0.0, 0.4, 0.5, 0.75, 1.0, 1.0])
    torch.testing.assert_close(optimality(advantages, 5.0), expected)


def test_x0_space_loss_equals_the_official_velocity_space_loss_for_flow():
    """For rectified flow (x̂0 = x_t − t·v) our loss on x0 estimates is term by term the reference implementation's
    loss on velocities (NVlabs/DiffusionNFT train_nft_sd3.py, restated here in its own variables)."""
    torch.manual_seed(0)
    x0, xt = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    forward_prediction, old_prediction = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95]).view(-1, 1, 1, 1)
    r = torch.tensor([0.0, 0.3, 0.5, 1.0])
    for beta in (1.0, 0.3):
        positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction
        implicit_negative_prediction = (1.0 + beta) * old_prediction - beta * forward_prediction
        x0_prediction = xt - t * positive_prediction
        weight = (x0_prediction.double() - x0.double()).abs().mean(dim=(1, 2, 3), keepdim=True).clip(min=1e-5)
        positive_loss = ((x0_prediction - x0) ** 2 / weight).mean(dim=(1, 2, 3))
        negative_x0_prediction = xt - t * implicit_negative_prediction
        weight = (negative_x0_prediction.double() - x0.double()).abs().mean(dim=(1, 2, 3), keepdim=True).clip(1e-5)
        negative_loss = ((negative_x0_prediction - x0) ** 2 / weight).mean(dim=(1, 2, 3))
        official = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
        ours = nft_loss(xt - t * forward_prediction, xt - t * old_prediction, x0, r, beta)
        torch.testing.assert_close(ours, official.float(), rtol=1e-5, atol=1e-6)


def test_gradient_is_zero_when_every_reward_is_equal(adapter):
    """Equal rewards → zero advantages → r = 1/2 everywhere: at θ = θ_old (the first step) the positive and negative
    terms cancel, so the step is zero; unequal rewards on the same rollout give a clearly non-zero one."""
    rollout = adapter.rollout(["a red cube", "two blue circles"], images_per_prompt=3, steps=3, guidance=1.0,
                              eta=0.0, seed=2)
    params = _params(adapter)
    norms = {}
    for label, rewards in (("equal", torch.full((6,), 0.4)), ("unequal", torch.tensor([.1, .9, .4, .2, .8, .5]))):
        recorder = GradRecorder(params)
        metrics = build_objective("nft").update(make_batch(rollout, rewards),
                                                make_context(adapter, [0, 1], recorder, seed=1))
        norms[label] = float(_flat(recorder.grads[0], params).norm())
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert norms["unequal"] > 1e-3
    assert norms["equal"] < 1e-6 * norms["unequal"], norms


@pytest.mark.parametrize("advantage", [5.0, -5.0])
def test_step_moves_the_prediction_toward_a_positive_sample_and_away_from_a_negative(adapter, advantage):
    """One sample with r = 1 (A = +5) or r = 0 (A = −5): the NFT gradient is ±a_max·|J|/mean|ε̂ − ε| times the
    gradient of the sample's own ε-MSE at the same (t, ε), with |J| = sqrt(1−ᾱ_t)/sqrt(ᾱ_t) the x0-per-ε scale of
    the ε-prediction conversion; a small step along −gradient lowers (r = 1) or raises (r = 0) that error."""
    rollout = adapter.rollout(["a red cube"], images_per_prompt=2, steps=3, guidance=1.0, eta=0.0, seed=5)
    params = _params(adapter)
    names = list(params)
    keep = torch.tensor([True, False])
    batch = make_batch(rollout, torch.tensor([0.3, 0.7]), keep=keep)
    batch.advantages = torch.tensor([advantage, 0.0])
    recorder = GradRecorder(params)
    build_objective("nft").update(batch, make_context(adapter, [0, 1], recorder, seed=7))
    got = _flat(recorder.grads[0], names)

    # Replay the objective's draw: (t, ε) for the one active sample, from the same seeded generator.
    x0, cond = rollout.latents[[0], -1], rollout.condition.select([0])
    noised = draw_noised(adapter, x0, rollout, [0, 1], "rollout", torch.Generator().manual_seed(7))
    pred = adapter.training_prediction(noised, cond)
    mse = ((pred.float() - noised.target) ** 2).mean()
    direct = _flat(dict(zip(names, torch.autograd.grad(mse, list(params.values())), strict=True)), names)
    acp = adapter.pipeline.scheduler.alphas_cumprod[noised.timesteps].float()
    jacobian = ((1 - acp).sqrt() / acp.sqrt()).item()
    scale = 5.0 * (1.0 if advantage > 0 else -1.0) * jacobian / float((pred.detach() - noised.target).abs().mean())
    assert float((got - scale * direct).norm() / got.norm()) < 1e-3

    with torch.no_grad():
        saved = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.sub_(1e-3 * recorder.grads[0][n] / got.norm())
        after = ((adapter.training_prediction(noised, cond).float() - noised.target) ** 2).mean()
        for n, p in params.items():
            p.copy_(saved[n])
    assert (after < mse) if advantage > 0 else (after > mse)


def test_sampling_policy_is_an_ema_with_a_ramped_decay():
    p = torch.nn.Parameter(torch.zeros(3))
    policy = SamplingPolicy(ramp=0.1, max_decay=0.25)
    policy.start({"w": p})
    with torch.no_grad():
        p.fill_(1.0)
    assert policy.update({"w": p}, steps_taken=2) == pytest.approx(0.2)
    torch.testing.assert_close(policy.weights["w"], torch.full((3,), 0.8))
    with torch.no_grad():
        p.fill_(2.0)
    assert policy.update({"w": p}, steps_taken=5) == pytest.approx(0.25)  # capped
    torch.testing.assert_close(policy.weights["w"], torch.full((3,), 0.25 * 0.8 + 0.75 * 2.0))
    with policy.active({"w": p}):
        torch.testing.assert_close(p.detach(), policy.weights["w"])
    torch.testing.assert_close(p.detach(), torch.full((3,), 2.0))
    assert SamplingPolicy(0.1, 0.0).on_policy and SamplingPolicy(0.1, 0.0).weights is None


def test_old_predictions_come_from_the_sampling_policy(adapter):
    """With a lagging old policy (θ_old ≠ θ) equal rewards no longer cancel: the loss pulls θ back toward θ_old, so
    the step is non-zero; the engine samples with ``sampling_weights()``, the old weights."""
    rollout = adapter.rollout(["a red cube"], images_per_prompt=2, steps=3, guidance=1.0, eta=0.0, seed=3)
    params = _params(adapter)
    objective = build_objective("nft", {"old_decay_ramp": 0.5, "old_decay_max": 0.9})
    objective.policy.start(params)
    with torch.no_grad():
        objective.policy.weights = {n: w + 1e-2 * torch.randn_like(w) for n, w in objective.policy.weights.items()}
    recorder = GradRecorder(params)
    objective.update(make_batch(rollout, torch.full((2,), 0.5)), make_context(adapter, [0], recorder, seed=2))
    assert float(_flat(recorder.grads[0], params).norm()) > 1e-4
    assert objective.sampling_weights() is objective.policy.weights


def test_bad_params_name_the_field():
    with pytest.raises(ValueError, match="beta"):
        build_objective("nft", {"beta": 0.0})
    with pytest.raises(ValueError, match="noise_levels"):
        build_objective("nft", {"noise_levels": "uniform"})
    with pytest.raises(ValueError, match="max_decay"):
        build_objective("nft", {"old_decay_max": 1.0})


@pytest.mark.parametrize("name", ["nft", "awm"])
def test_trainer_runs_two_iterations_changing_every_weight_and_checkpoints_the_sampling_policy(
        name, bright_sd_path, prompt_file, tmp_path):
    """Through the real Trainer with the deterministic sampler (η = 0, no log-probs): finite losses, every trainable
    weight moves, nft's rollouts are sampled with its θ_old, and its sampling policy (EMA θ_old and its step count)
    is saved and restored by a resume."""
    from tests.objectives.conftest import train_overrides
    from visalign.train.checkpoint import latest_checkpoint, load_checkpoint
    from visalign.train.config import load_train_config
    from visalign.train.loop import Trainer

    overrides = train_overrides(bright_sd_path, prompt_file, tmp_path / "run", name, iterations=2) + [
        "model.resolution=8", "sample.eta=0.0"]
    trainer = Trainer(load_train_config(None, overrides))
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    sampled_with_old = []
    make_batch_now = trainer.source.next

    def recording_next():  # which weights the engine holds while the source samples
        old = trainer.objective.sampling_weights()
        sampled_with_old.append(None if old is None else
                                all(torch.equal(p.detach(), old[n]) for n, p in trainer.params.items()))
        return make_batch_now()

    trainer.source.next = recording_next
    trainer.run(resume=False)
    # nft: the first rollout precedes any θ_old; the second is sampled with θ_old. awm is on-policy.
    assert sampled_with_old == ([None, True] if name == "nft" else [None, None])
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.history)
    unchanged = [n for n, p in trainer.params.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, unchanged[:3]
    _, _, extra, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert int(extra["objective.steps"]) == 2
    if name == "nft":
        old = trainer.objective.sampling_weights()
        assert set(old) == set(trainer.params)
        resumed = Trainer(load_train_config(None, overrides))
        assert resumed.resume() and resumed.objective.policy.steps == 2
        for n, w in old.items():
            torch.testing.assert_close(resumed.objective.sampling_weights()[n], w)
            assert not torch.equal(w, trainer.params[n].detach())  # θ_old lags θ
