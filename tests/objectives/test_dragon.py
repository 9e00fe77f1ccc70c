"""DRAGON: D+/D− construction, the Diffusion-DPO and Diffusion-KTO surrogates, and the step-0 identities.

On a tiny SD pipeline with a fresh LoRA (θ = reference exactly), the paired (DPO) loss of the first step is log 2
and the unpaired (KTO) loss is 0.5 with ``z0 = 0``; both still give a non-zero gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.objectives.conftest import GradRecorder, make_batch, make_context
from visalign.generators import LoraSpec, load_generator
from visalign.objectives.base import build_objective
from visalign.objectives.common import diffusion_kto_loss, kto_reference_point
from visalign.objectives.diffusion_dpo import diffusion_dpo_loss
from visalign.objectives.dragon import best_worst_pairs, median_split

GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_best_worst_pairs_per_group_with_deterministic_ties_and_dropped_samples():
    rewards = torch.tensor([0.5, 0.9, 0.9, 0.2, 0.2, 0.7])
    winners, losers = best_worst_pairs(rewards, GROUPS, torch.ones(6))
    assert winners.tolist() == [1, 5] and losers.tolist() == [0, 3]  # ties → lower index
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])  # dropped samples cannot be chosen
    winners, losers = best_worst_pairs(rewards, GROUPS, weights)
    assert winners.tolist() == [2] and losers.tolist() == [0]  # group 1 left: 0.2 vs 0.2 is no preference


def test_median_split_puts_strictly_above_median_in_d_plus():
    index, desirable = median_split(torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.6]), torch.ones(6))
    assert index.tolist() == list(range(6))
    assert desirable.tolist() == [False, True, False, True, False, True]  # torch median of 6 = the lower middle 0.3
    _, tied = median_split(torch.full((4,), 0.5), torch.ones(4))
    assert not tied.any()


def test_dpo_loss_matches_hand_computation_and_is_log2_at_reference():
    model_w, model_l = torch.tensor([0.30, 0.50]), torch.tensor([0.40, 0.20])
    ref_w, ref_l = torch.tensor([0.35, 0.45]), torch.tensor([0.38, 0.25])
    loss, inside = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=10.0)
    expected_inside = torch.tensor([-5.0 * ((0.30 - 0.35) - (0.40 - 0.38)), -5.0 * ((0.50 - 0.45) - (0.20 - 0.25))])
    torch.testing.assert_close(inside, expected_inside)
    torch.testing.assert_close(loss, -torch.log(torch.sigmoid(expected_inside)))
    at_ref, _ = diffusion_dpo_loss(ref_w, ref_l, ref_w, ref_l, beta=5000.0)
    assert at_ref.tolist() == [pytest.approx(math.log(2), abs=1e-7)] * 2


def test_kto_loss_matches_hand_computation():
    model = torch.tensor([0.2, 0.5, 0.3, 0.6], dtype=torch.float64)
    ref = torch.tensor([0.4, 0.4, 0.5, 0.5], dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False])
    loss, z0 = diffusion_kto_loss(model, ref, desirable, beta=3.0, lambda_desirable=1.0, lambda_undesirable=2.0)
    g = [0.2, -0.1, 0.2, -0.1]
    z = max(sum(g) / 4, 0.0)  # 0.05
    sig = [1 / (1 + math.exp(-s * 3.0 * (gi - z))) for gi, s in zip(g, [1, 1, -1, -1], strict=True)]
    expected = [1 * (1 - sig[0]), 1 * (1 - sig[1]), 2 * (1 - sig[2]), 2 * (1 - sig[3])]
    assert float(z0) == pytest.approx(z)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    # The reference point is clamped at 0: when θ is worse than the reference on average, z0 = 0.
    _, z_neg = diffusion_kto_loss(ref + 0.3, ref, desirable, beta=3.0)
    assert float(z_neg) == 0.0


def test_kto_micro_batch_uses_the_whole_batch_reference_point():
    """With micro-batches, z0 is the whole batch's (docs/methods.md#dragon), passed in: the first half alone has mean g
    0.05 (z0 0.05), the whole batch 0.0 (clamped), and the loss must be the one at z0 = 0."""
    model = torch.tensor([0.2, 0.5, 0.8, 0.9], dtype=torch.float64)
    ref = torch.tensor([0.4, 0.4, 0.5, 0.5], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    whole = kto_reference_point(model, ref)
    assert float(whole) == 0.0
    half_alone, z_alone = diffusion_kto_loss(model[:2], ref[:2], desirable[:2], beta=3.0)
    half_batch, z_batch = diffusion_kto_loss(model[:2], ref[:2], desirable[:2], beta=3.0, z0=whole)
    assert float(z_alone) == pytest.approx(0.05) and float(z_batch) == 0.0
    g = [0.2, -0.1]
    expected = [1 - 1 / (1 + math.exp(-3.0 * g[0])), 1 - 1 / (1 + math.exp(3.0 * g[1]))]
    torch.testing.assert_close(half_batch, torch.tensor(expected, dtype=torch.float64))
    assert not torch.allclose(half_alone, half_batch)


# ---------------------------------------------------------------- on the tiny pipeline


@pytest.fixture(scope="module")
def adapter(bright_sd_path):
    adapter = load_generator(bright_sd_path)
    adapter.add_lora(LoraSpec(rank=4, alpha=4.0))  # gaussian A, zero B: θ = base exactly until the first step
    return adapter


@pytest.fixture(scope="module")
def rollout(adapter):
    return adapter.rollout(["a red cube", "two blue circles"], images_per_prompt=3, steps=2, guidance=1.0, eta=1.0,
                           seed=5)


def named(adapter):
    return {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}


def test_paired_step_zero_loss_is_log2_with_a_gradient(adapter, rollout):
    recorder = GradRecorder(named(adapter))
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1, 0.4])
    metrics = build_objective("dragon", {"mode": "paired", "reference": "base"}).update(
        make_batch(rollout, rewards), make_context(adapter, [0], recorder))
    assert metrics["pairs"] == 2 and metrics["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["implicit_acc"] == 0.0 and metrics["grad_norm"] > 0
    assert metrics["positive_reward"] == pytest.approx(0.8) and metrics["negative_reward"] == pytest.approx(0.15)


def test_paired_gradient_is_the_dpo_gradient_on_best_and_worst_with_shared_draws(adapter, rollout):
    """At θ = ref, ∇L = (β/4)·∇[ℓ_θ(x_w) − ℓ_θ(x_l)] averaged over pairs, with (t, ε) shared within each pair."""
    params = named(adapter)
    recorder = GradRecorder(params)
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1, 0.4])
    beta = 50.0
    build_objective("dragon", {"beta": beta}).update(make_batch(rollout, rewards),
                                                     make_context(adapter, [0], recorder, seed=3))
    g = torch.Generator().manual_seed(3)
    x0 = rollout.latents[:, -1]
    winners, losers = [1, 3], [0, 4]
    model_w = adapter.denoising_loss(x0[winners], rollout.condition.select(winners), generator=g)
    model_l = adapter.denoising_loss(x0[losers], rollout.condition.select(losers), timesteps=model_w.timesteps,
                                     noise=model_w.noise)
    surrogate = (beta / 4) * (model_w.loss - model_l.loss).mean()  # d(−log σ(x))/dx = −1/2 at x = 0
    direct = torch.autograd.grad(surrogate, list(params.values()))
    flat = torch.cat([recorder.grads[0][n].flatten() for n in params])
    flat_direct = torch.cat([d.flatten() for d in direct])
    assert flat_direct.norm() > 0
    assert float((flat - flat_direct).norm() / flat_direct.norm()) < 1e-4


def test_unpaired_step_zero_kto_loss_is_one_half_and_z0_is_zero(adapter, rollout):
    recorder = GradRecorder(named(adapter))
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1, 0.4])  # median 0.4: D+ = {0.9, 0.5, 0.7}
    metrics = build_objective("dragon", {"mode": "unpaired", "reference": "old"}).update(
        make_batch(rollout, rewards), make_context(adapter, [0], recorder))
    assert metrics["positives"] == 3 and metrics["negatives"] == 3
    assert metrics["z0"] == 0.0 and metrics["loss"] == pytest.approx(0.5, abs=1e-7)
    assert metrics["grad_norm"] > 0


def test_unpaired_micro_batches_share_one_reference_point(adapter, rollout):
    # 6 samples in micro-batches of 2: one extra no-grad pass gives the batch z0; θ = old at the pass start → 0.
    recorder = GradRecorder(named(adapter))
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1, 0.4])
    metrics = build_objective("dragon", {"mode": "unpaired", "reference": "old", "micro_batch": 2}).update(
        make_batch(rollout, rewards), make_context(adapter, [0], recorder))
    # Micro-batches of 2 vs the reference's batch of 6 differ by float rounding only (g ~ 1e-5, not exactly 0).
    assert len(recorder.grads) == 3 and metrics["z0"] < 1e-5
    assert metrics["loss"] == pytest.approx(0.5, abs=1e-3)


def test_full_finetune_base_reference_is_a_frozen_copy_of_the_first_weights(bright_sd_path):
    """Without LoRA, reference='base' is the weights at the first update: the loss starts at log 2, the reference
    MSE stays the base model's after θ moves (no re-snapshot), and every reference pass hands θ back unchanged."""
    full = load_generator(bright_sd_path)
    full.train_full()
    params = named(full)
    rollout = full.rollout(["a red cube", "two blue circles"], images_per_prompt=2, steps=2, guidance=1.0, eta=1.0,
                           seed=7)
    base = {n: p.detach().clone() for n, p in params.items()}
    moves = torch.Generator().manual_seed(0)
    deltas = []

    def perturb():  # stands in for the optimizer step: θ leaves the reference
        with torch.no_grad():
            for p in params.values():
                delta = 1e-2 * torch.randn(p.shape, generator=moves)
                deltas.append(delta)
                p.add_(delta)

    recorder = GradRecorder(params, perturb=perturb)
    objective = build_objective("dragon", {"reference": "base", "beta": 50.0})
    batch = make_batch(rollout, torch.tensor([0.1, 0.9, 0.8, 0.2]))
    first = objective.update(batch, make_context(full, [0], recorder, seed=1))
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7) and first["grad_norm"] > 0
    second = objective.update(batch, make_context(full, [0], recorder, seed=1))  # same (t, ε) draws
    assert second["ref_mse"] == pytest.approx(first["ref_mse"], rel=1e-6)
    assert abs(second["model_mse"] - second["ref_mse"]) > 1e-6
    names = list(params)
    for i, name in enumerate(names):  # θ = base + both perturbations: the reference swap restored every tensor
        expected = base[name] + deltas[i] + deltas[len(names) + i]
        torch.testing.assert_close(params[name].detach(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        build_objective("dragon", {"mode": "set"})
