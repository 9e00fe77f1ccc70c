"""PRDP: the reward-difference regression (pure function) and the objective on a tiny SD pipeline.

Unit tests pin the loss (exactly zero at a perfect fit, positive and hand-computable otherwise, no cross-prompt
pairs, the proximal max); pipeline tests check the round-start identity (anchor = old: s = 0, so the loss is
mean(Δr²) with a non-zero gradient) and that the two-pass backward gives the gradient of the loss written directly
with every step's graph kept.
"""

from __future__ import annotations

import pytest
import torch

from tests.objectives.conftest import GradRecorder, make_batch, make_context
from visalign.generators import load_generator
from visalign.objectives.base import build_objective
from visalign.objectives.common import within_group_pairs
from visalign.objectives.prdp import rdp_loss

GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])
# Dyadic rewards and β = 0.5 keep every difference exactly representable, so "zero" means 0.0, not ≈ 0.
REWARDS = torch.tensor([0.25, 0.5, 1.0, 0.125, 0.75, 0.375])


def test_rdp_loss_is_exactly_zero_when_implicit_rewards_predict_scaled_reward_differences():
    offsets = torch.tensor([3.0, 3.0, 3.0, -7.0, -7.0, -7.0])  # log Z(c): arbitrary per prompt, cancels in pairs
    s = REWARDS / 0.5 + offsets
    terms = rdp_loss(s, REWARDS, GROUPS, beta=0.5)
    assert terms.loss.item() == 0.0
    assert terms.target.numel() == 6  # 3 pairs per group of 3


def test_rdp_loss_is_positive_otherwise_and_matches_a_hand_computation():
    s = REWARDS / 0.5
    s[1] += 0.5  # sample 1 over-predicts: pairs (0,1) and (1,2) are off by 0.5, the rest exact
    terms = rdp_loss(s, REWARDS, GROUPS, beta=0.5)
    assert terms.loss.item() == pytest.approx(2 * 0.5**2 / 6)
    random_s = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = REWARDS.double()
    expected = torch.stack([((r[a] - r[b]) / 10 - (random_s[a] - random_s[b])) ** 2
                            for a, b in [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]]).mean()
    torch.testing.assert_close(rdp_loss(random_s, r, GROUPS, beta=10).loss, expected)


def test_pairs_never_cross_prompts():
    a, b = within_group_pairs(torch.tensor([0, 1, 0, 1, 2]))
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 2), (1, 3)]
    # A per-prompt shift of s (or of the rewards) changes nothing; a cross-prompt pair would feel it.
    s = torch.randn(6, generator=torch.Generator().manual_seed(1))
    base = rdp_loss(s, REWARDS, GROUPS, beta=2.0).loss
    shifted = rdp_loss(s + 5.0 * GROUPS, REWARDS - 0.3 * GROUPS, GROUPS, beta=2.0).loss
    torch.testing.assert_close(shifted, base)


def test_weights_drop_pairs_and_scale_them():
    s = torch.zeros(6)
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    terms = rdp_loss(s, REWARDS, GROUPS, beta=1.0, weights=weights)
    assert terms.target.numel() == 4  # sample 2 dropped: (0,1) and group 1's three pairs
    expected = torch.tensor([(0.25 - 0.5) ** 2, (0.125 - 0.75) ** 2, (0.125 - 0.375) ** 2, (0.75 - 0.375) ** 2])
    torch.testing.assert_close(terms.loss, expected.mean())
    halved = rdp_loss(s, REWARDS, GROUPS, beta=1.0, weights=weights * 0.5)
    torch.testing.assert_close(halved.loss, terms.loss * 0.25)


def test_proximal_branch_takes_the_pessimistic_max():
    s = REWARDS / 0.5
    same = rdp_loss(s, REWARDS, GROUPS, beta=0.5, s_proximal=s.clone())
    assert same.loss.item() == 0.0 and not same.clipped.any()
    s_prox = s.clone()
    s_prox[0] -= 1.0  # the clipped implicit reward of sample 0 misses the target by 1 in its two pairs
    terms = rdp_loss(s, REWARDS, GROUPS, beta=0.5, s_proximal=s_prox)
    assert terms.loss.item() == pytest.approx(2 * 1.0 / 6)
    assert terms.clipped.tolist() == [True, True, False, False, False, False]


# ---------------------------------------------------------------- on the tiny pipeline


@pytest.fixture(scope="module")
def adapter(bright_sd_path):
    adapter = load_generator(bright_sd_path)
    adapter.train_full()
    return adapter


@pytest.fixture(scope="module")
def rollout(adapter):
    return adapter.rollout(["a red cube", "two blue circles"], images_per_prompt=3, steps=2, guidance=1.0, eta=1.0,
                           seed=3)


def named(adapter):
    return {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}


def test_round_start_loss_is_mean_squared_scaled_reward_difference_with_nonzero_gradient(adapter, rollout):
    rewards = torch.tensor([0.2, 0.5, 0.9, 0.4, 0.1, 0.3])
    beta = 0.1
    recorder = GradRecorder(named(adapter))
    objective = build_objective("prdp", {"beta": beta, "anchor": "old"})
    metrics = objective.update(make_batch(rollout, rewards), make_context(adapter, [0, 1], recorder))
    diffs = [(rewards[a] - rewards[b]) / beta for a, b in [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]]
    assert metrics["loss"] == pytest.approx(float(torch.stack(diffs).pow(2).mean()), rel=1e-6)
    assert metrics["implicit_reward_abs"] == 0.0 and metrics["pairs"] == 6
    assert len(recorder.grads) == 1 and metrics["grad_norm"] > 0
    # A small step along −grad must lower the loss (true log-densities are steep: s moves by ~1e4 per unit step).
    with torch.no_grad():
        for n, p in named(adapter).items():
            p.sub_(1e-5 * recorder.grads[0][n] / metrics["grad_norm"])
        s = (adapter.step_log_prob(rollout, [0, 1], reduction="sum") - rollout.log_probs_sum).sum(1)
        for n, p in named(adapter).items():
            p.add_(1e-5 * recorder.grads[0][n] / metrics["grad_norm"])
    from visalign.objectives.prdp import rdp_loss as loss_fn

    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert loss_fn(s, rewards, groups, beta).loss.item() < metrics["loss"]


def test_two_pass_backward_equals_the_direct_gradient_away_from_theta_old(adapter, rollout):
    """Second inner step (θ ≠ θ_old, proximal clipping active): the gradient equals autograd on the full loss."""
    rewards = torch.tensor([0.2, 0.5, 0.9, 0.4, 0.1, 0.3])
    params = named(adapter)
    saved = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(5)
    noise = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in params.items()}

    def perturb():
        with torch.no_grad():
            for n, p in params.items():
                p.add_(noise[n])

    recorder = GradRecorder(params, perturb)
    clip = 0.5
    objective = build_objective("prdp", {"beta": 0.1, "clip_range": clip, "inner_steps": 2})
    try:
        objective.update(make_batch(rollout, rewards), make_context(adapter, [0, 1], recorder))
        two_pass = recorder.grads[1]
        # Direct: every step's graph kept, the proximal loss written out (params still at the perturbed point;
        # perturb() ran after step 2 as well, so undo that one).
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(noise[n])
        current = adapter.step_log_prob(rollout, [0, 1], reduction="sum")
        old = rollout.log_probs_sum
        s = (current - old).sum(1)
        s_prox = (current - old).clamp(-clip, clip).sum(1)
        loss = rdp_loss(s, rewards, torch.tensor([0, 0, 0, 1, 1, 1]), 0.1, s_proximal=s_prox).loss
        direct = torch.autograd.grad(loss, list(params.values()))
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    assert float(loss) > 0
    # Gradients of true log-densities are large (~1e5) and float32 sums cancel: compare relative L2 error.
    flat_two_pass = torch.cat([two_pass[name].flatten() for name in params])
    flat_direct = torch.cat([ref.flatten() for ref in direct])
    assert float((flat_two_pass - flat_direct).norm() / flat_direct.norm()) < 1e-4


def test_reference_anchor_needs_lora(adapter, rollout):
    objective = build_objective("prdp", {"anchor": "reference"})
    with pytest.raises(ValueError, match="lora_rank"):
        objective.update(make_batch(rollout, torch.rand(6)), make_context(adapter, [0], GradRecorder(named(adapter))))


def test_bad_params_name_the_field():
    with pytest.raises(ValueError, match="anchor"):
        build_objective("prdp", {"anchor": "ema"})
