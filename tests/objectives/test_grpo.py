"""GRPO / DDPO on a tiny SD pipeline with LoRA: the on-policy identities of docs/methods.md#grpo.

- first inner step: ratio = 1, and the PPO-clip gradient equals the plain policy-gradient estimate −mean(A·∇logp);
- once the policy moves (several inner epochs and micro-batches, a small clip range) some ratios are clipped;
- the KL-to-reference term is exactly 0 at step 0 (fresh LoRA: θ = ref) with beta > 0, and positive after steps.
"""

from __future__ import annotations

import pytest
import torch

from tests.objectives.conftest import GradRecorder, make_batch, make_context
from visalign.generators import LoraSpec, load_generator
from visalign.objectives.base import build_objective
from visalign.objectives.grpo import ppo_clip_loss

STEPS = [0, 1]
REWARDS = torch.tensor([0.1, 0.4, 0.9, 0.3, 0.8, 0.2, 0.5, 0.6])


@pytest.fixture(scope="module")
def adapter(bright_sd_path):
    adapter = load_generator(bright_sd_path)
    adapter.add_lora(LoraSpec(rank=4, alpha=4.0))
    return adapter


@pytest.fixture(scope="module")
def rollout(adapter):
    return adapter.rollout(["a red cube", "two blue circles"], images_per_prompt=4, steps=2, guidance=1.0, eta=1.0,
                           seed=11)


def named(adapter):
    return {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}


class AdamStep:
    """``ctx.optimizer_step`` that really steps: AdamW on the LoRA weights, restored by :meth:`restore`."""

    def __init__(self, params: dict[str, torch.nn.Parameter], lr: float) -> None:
        self.params = params
        self.saved = {n: p.detach().clone() for n, p in params.items()}
        self.optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)

    def __call__(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def restore(self) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.saved[n])


def test_ppo_clip_loss_clips_only_outside_the_trust_region():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    log_ratio = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    loss, gt, lt = ppo_clip_loss(adv, log_ratio, 0.2)
    # max(−A·ρ, −A·clip(ρ)): A>0,ρ=1.5 → −1.2; A>0,ρ=0.5 → −0.5; A<0,ρ=1.5 → 1.5; A<0,ρ=0.5 → 0.8
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert gt.tolist() == [True, False, True, False] and lt.tolist() == [False, True, False, True]


def test_first_inner_step_has_ratio_one_and_the_policy_gradient(adapter, rollout):
    params = named(adapter)
    recorder = GradRecorder(params)
    batch = make_batch(rollout, REWARDS)
    metrics = build_objective("grpo", {"clip_range": 1e-4}).update(batch, make_context(adapter, STEPS, recorder))
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-5) and metrics["clipfrac"] == 0.0
    assert metrics["kl"] == 0.0  # beta = 0: no KL term
    # The plain REINFORCE estimate, −mean_i A_i·∇logp_i, averaged over the trained steps.
    logp = adapter.step_log_prob(rollout, STEPS)
    surrogate = -(batch.advantages[:, None] * logp).mean(0).sum() / len(STEPS)
    direct = torch.autograd.grad(surrogate, list(params.values()), allow_unused=True)
    flat_ppo = torch.cat([recorder.grads[0][n].flatten() for n in params])
    flat_pg = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                         for g, p in zip(direct, params.values(), strict=True)])
    assert flat_pg.norm() > 0
    assert float((flat_ppo - flat_pg).norm() / flat_pg.norm()) < 1e-4


def test_clip_fraction_rises_once_the_policy_moves(adapter, rollout):
    step = AdamStep(named(adapter), lr=1e-2)
    try:
        metrics = build_objective("grpo", {"clip_range": 1e-4, "inner_epochs": 3, "micro_batch": 2}).update(
            make_batch(rollout, REWARDS), make_context(adapter, STEPS, step))
    finally:
        step.restore()
    # 12 optimizer steps; only the very first micro-batch is exactly on-policy.
    assert metrics["clipfrac"] > 0.1
    assert metrics["approx_kl"] > 0


def test_kl_is_exactly_zero_at_step_zero_and_positive_after_steps(adapter, rollout):
    batch = make_batch(rollout, REWARDS)
    recorder = GradRecorder(named(adapter))
    at_start = build_objective("grpo", {"beta": 0.1}).update(batch, make_context(adapter, STEPS, recorder))
    assert at_start["kl"] == 0.0
    step = AdamStep(named(adapter), lr=1e-2)
    try:
        build_objective("grpo", {"beta": 0.1, "inner_epochs": 2}).update(batch, make_context(adapter, STEPS, step))
        after = build_objective("grpo", {"beta": 0.1}).update(batch, make_context(adapter, STEPS,
                                                                                  GradRecorder(named(adapter))))
    finally:
        step.restore()
    assert after["kl"] > 0


def test_dropped_samples_carry_no_gradient(adapter, rollout):
    """keep = False (Pareto filtering): the step is the policy gradient over the other samples only."""
    params = named(adapter)
    keep = torch.ones(8, dtype=torch.bool)
    keep[2] = False
    batch = make_batch(rollout, REWARDS, keep=keep)
    recorder = GradRecorder(params)
    build_objective("grpo", {}).update(batch, make_context(adapter, STEPS, recorder))
    live = [i for i in range(8) if i != 2]
    logp = adapter.step_log_prob(rollout.select(live), STEPS)
    surrogate = -(batch.advantages[live][:, None] * logp).mean(0).sum() / len(STEPS)
    direct = torch.autograd.grad(surrogate, list(params.values()), allow_unused=True)
    flat = torch.cat([recorder.grads[0][n].flatten() for n in params])
    flat_pg = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                         for g, p in zip(direct, params.values(), strict=True)])
    assert float((flat - flat_pg).norm() / flat_pg.norm()) < 1e-4


SHAPES_PROMPTS = ["a red circle", "two blue squares"]


def test_anchor_is_zero_at_the_base_and_adds_the_exact_hinge_gradient_once_the_policy_moves(adapter):
    """objective.params.anchor: mean relu(s(x0_base) − s(x0_θ)) of a differentiable scorer on the decoded one-step
    x0 estimate, per trained step, added to the PPO loss with anchor_weight (divided by the step count like it)."""
    from visalign.scorers import ScoreBatch, get_scorer

    rollout = adapter.rollout(SHAPES_PROMPTS, images_per_prompt=4, steps=2, guidance=1.0, eta=1.0, seed=5)
    batch = make_batch(rollout, REWARDS)
    params = named(adapter)
    anchor = {"anchor": get_scorer("shapes-colour")}
    objective = build_objective("grpo", {"anchor": "shapes-colour"})
    assert objective.scorer_specs() == {"anchor": "shapes-colour"}  # the engine builds it from this
    at_base = objective.update(batch, make_context(adapter, STEPS, GradRecorder(params), scorers=anchor))
    assert at_base["anchor_hinge"] == 0.0  # fresh LoRA: the policy is the base model

    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():  # move the LoRA off zero so the policy's x0 estimates differ from the base's
        g = torch.Generator().manual_seed(3)
        for p in params.values():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    try:
        plain, anchored = GradRecorder(params), GradRecorder(params)
        build_objective("grpo", {}).update(batch, make_context(adapter, STEPS, plain))
        metrics = build_objective("grpo", {"anchor": "shapes-colour", "anchor_weight": 2.0}).update(
            batch, make_context(adapter, STEPS, anchored, scorers=anchor))
        scorer = get_scorer("shapes-colour")
        hinges = []
        for j in STEPS:
            out = adapter.recompute_step(rollout, j)
            mine = scorer(ScoreBatch(prompts=list(rollout.prompts), media=adapter.decode(out.x0, grad=True)),
                          grad=True).reward
            with torch.no_grad(), adapter.lora_disabled():
                ref = adapter.recompute_step(rollout, j)
                base = scorer(ScoreBatch(prompts=list(rollout.prompts), media=adapter.decode(ref.x0.detach()))).reward
            hinges.append(torch.relu(base - mine).mean())
        expected_grad = torch.autograd.grad(2.0 * torch.stack(hinges).sum() / len(STEPS), list(params.values()),
                                            allow_unused=True)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    assert metrics["anchor_hinge"] == pytest.approx(torch.stack(hinges).mean().item(), rel=1e-4, abs=1e-7)
    assert metrics["anchor_hinge"] > 0
    diff = torch.cat([(anchored.grads[0][n] - plain.grads[0][n]).flatten() for n in params])
    want = torch.cat([(e if e is not None else torch.zeros_like(p)).flatten()
                      for e, p in zip(expected_grad, params.values(), strict=True)])
    assert want.abs().max() > 0
    torch.testing.assert_close(diff, want, rtol=1e-3, atol=1e-6)


def test_anchor_weight_must_be_non_negative():
    with pytest.raises(ValueError, match="anchor_weight"):
        build_objective("grpo", {"anchor": "shapes-colour", "anchor_weight": -1.0})
