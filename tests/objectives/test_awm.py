"""AWM (docs/methods.md#awm): with a constant advantage its first step is exactly that constant times the
pre-training (denoising) gradient at the same (t, ε); the advantage's sign and size weight each sample; the surrogate
ratio is taken against the loss before the update's first step, so the PPO clip acts on later micro-batches."""

from __future__ import annotations

import pytest
import torch

from tests.objectives.conftest import GradRecorder, make_batch, make_context
from visalign.generators import load_generator
from visalign.objectives.base import build_objective
from visalign.objectives.forward_process import draw_noised


@pytest.fixture(scope="module")
def adapter(bright_sd_path):
    adapter = load_generator(bright_sd_path)
    adapter.train_full()
    return adapter


def _params(adapter):
    return {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}


def _flat(grads, names):
    return torch.cat([grads[n].flatten() for n in names])


def _denoising_gradient(adapter, rollout, index, noised, weights):
    """∇ mean_i weights_i · ℓ_i, ℓ the adapter's own denoising loss at the replayed (t, ε)."""
    params = _params(adapter)
    loss = adapter.denoising_loss(rollout.latents[index, -1], rollout.condition.select(index),
                                  timesteps=noised.timesteps, noise=noised.noise).loss
    grads = torch.autograd.grad((loss * weights).mean(), list(params.values()))
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("constant", [0.7, -2.0])
def test_constant_advantage_gives_the_pretraining_gradient_up_to_scale(adapter, constant):
    rollout = adapter.rollout(["a red cube", "two blue circles"], images_per_prompt=2, steps=3, guidance=1.0,
                              eta=0.0, seed=4)
    params = _params(adapter)
    batch = make_batch(rollout, torch.tensor([0.1, 0.5, 0.3, 0.9]))
    batch.advantages = torch.full((4,), constant)
    recorder = GradRecorder(params)
    metrics = build_objective("awm").update(batch, make_context(adapter, [0, 1], recorder, seed=9))
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-5) and metrics["clipfrac"] == 0.0
    got = _flat(recorder.grads[0], params)
    noised = draw_noised(adapter, rollout.latents[:, -1], rollout, [0, 1], "rollout",
                         torch.Generator().manual_seed(9))
    direct = _denoising_gradient(adapter, rollout, [0, 1, 2, 3], noised, torch.ones(4))
    assert float((got - constant * direct).norm() / got.norm()) < 1e-3


def test_advantages_weight_each_sample_and_their_sign_flips_its_term(adapter):
    """Group advantages (A, −A per group of two): the step is ∇ mean_i A_i·ℓ_i, not the unweighted loss's."""
    rollout = adapter.rollout(["a red cube", "two blue circles"], images_per_prompt=2, steps=3, guidance=1.0,
                              eta=0.0, seed=6)
    params = _params(adapter)
    batch = make_batch(rollout, torch.tensor([0.2, 0.8, 0.6, 0.1]))
    recorder = GradRecorder(params)
    build_objective("awm").update(batch, make_context(adapter, [0, 1], recorder, seed=3))
    got = _flat(recorder.grads[0], params)
    noised = draw_noised(adapter, rollout.latents[:, -1], rollout, [0, 1], "rollout",
                         torch.Generator().manual_seed(3))
    weighted = _denoising_gradient(adapter, rollout, [0, 1, 2, 3], noised, batch.advantages)
    plain = _denoising_gradient(adapter, rollout, [0, 1, 2, 3], noised, torch.ones(4))
    assert float((got - weighted).norm() / got.norm()) < 1e-3
    assert float((got - plain).norm() / got.norm()) > 0.5


def test_the_ratio_is_taken_against_the_loss_before_any_step(adapter):
    """Two micro-batches, the first optimizer step perturbs θ: the second micro-batch's ratio exp(ℓ_old − ℓ_θ) is
    then off 1 (ℓ_old was computed before the step), so a tight clip zeroes that step, while a wide one clips
    nothing. Recomputing ℓ_old after the step would make the ratio 1 and both steps equal."""
    rollout = adapter.rollout(["a red cube"], images_per_prompt=4, steps=3, guidance=1.0, eta=0.0, seed=8)
    params = _params(adapter)

    def perturb():
        with torch.no_grad():
            for p in params.values():
                p.add_(1e-2 * torch.randn_like(p))

    grads, clipped = {}, {}
    for clip in (1e-4, 10.0):
        saved = {n: p.detach().clone() for n, p in params.items()}
        recorder = GradRecorder(params, perturb=perturb)
        torch.manual_seed(0)
        batch = make_batch(rollout, torch.tensor([0.1, 0.9, 0.4, 0.6]))
        batch.advantages = torch.full((4,), -1.0)  # every sample pushed away from: a worse θ is what PPO clips
        metrics = build_objective("awm", {"clip_range": clip, "micro_batch": 2}).update(
            batch, make_context(adapter, [0], recorder, seed=1))
        grads[clip] = _flat(recorder.grads[1], params)
        clipped[clip] = metrics["clipfrac"]
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    # Noise on every weight raises the denoising error (ρ < 1 − ε); for A < 0 that is the side PPO clips.
    assert clipped[10.0] == 0.0 and clipped[1e-4] == pytest.approx(0.5)  # half the steps: the second micro-batch
    assert float(grads[10.0].norm()) > 1e-4
    assert float(grads[1e-4].norm()) < 1e-3 * float(grads[10.0].norm())


def test_bad_params_name_the_field():
    with pytest.raises(ValueError, match="clip_range"):
        build_objective("awm", {"clip_range": 0.0})
    with pytest.raises(ValueError, match="inner_epochs"):
        build_objective("awm", {"inner_epochs": 0})
