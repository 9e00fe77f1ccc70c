"""AWM: advantage-weighted matching (arXiv 2509.25050; docs/methods.md#awm).

DDPO's policy gradient is, in expectation, a score/flow-matching loss on the sampled images with a noisier target;
AWM keeps the pre-training loss itself and weights it by the advantage. Each clean final sample ``x0`` of the rollout
is noised again, ``x_t ~ q(x_t | x0)``, and its pre-training error ``ℓ_θ = mean ||f_θ(x_t, t) − target||²`` (the
adapter's own parameterisation: flow ``ε − x0``, DDPM ε / v / x0) serves as a negative log-likelihood surrogate,
``log p_θ ≈ −ℓ_θ``. The loss is PPO's on that surrogate,

    ρ = exp(ℓ_old − ℓ_θ),   L = mean_i w_i · max(−A_i·ρ_i, −A_i·clip(ρ_i, 1 − ε, 1 + ε)),

with ``ℓ_old`` from the sampling policy at the same ``(t, ε)``. At ``ρ = 1`` the gradient is ``A·∇ℓ_θ``: with a
constant advantage it is the pre-training gradient scaled by A. Advantages are clipped to ``±adv_clip_max``.

Defaults are the official code's (scxue/advantage_weighted_matching ``config/base_awm.py``): clip ε = 1e-4,
``adv_clip_max`` 5, on-policy (the sampling policy is the current weights), KL to the base off; its "discrete"
timestep draw is our ``noise_levels: rollout``; its uniform weighting ``w(t) = 1`` is the only one implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from visalign.generators.base import GeneratorAdapter
from visalign.generators.denoising_loss import per_sample_mse
from visalign.objectives.base import MetricMeans, Objective, OnlineBatch, UpdateContext, micro_batches
from visalign.objectives.forward_process import check_noise_levels, draw_noised, predict_in_chunks
from visalign.objectives.grpo import ppo_clip_loss
from visalign.objectives.sampling_policy import SamplingPolicy, trainable_named_parameters

__all__ = ["AwmObjective", "AwmParams"]


@dataclass
class AwmParams:
    clip_range: float = field(default=1e-4, metadata={
        "help": "PPO clip ε on ρ = exp(ℓ_old − ℓ_θ), ℓ the per-sample mean-over-elements pre-training MSE "
                "(official 1e-4)."})
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to ±this (official 5)."})
    kl_beta: float = field(default=0.0, metadata={
        "help": "Weight of mean ||f_θ − f_base||² to the LoRA-off base model at the same input (0 = off; needs "
                "LoRA)."})
    inner_epochs: int = field(default=1, metadata={"help": "Passes over each rollout, fresh (t, ε) per pass."})
    micro_batch: int = field(default=0, metadata={"help": "Samples per optimizer step; 0 = the whole batch."})
    noise_levels: str = field(default="rollout", metadata={
        "help": "'rollout': re-noise at the levels of the trained rollout steps (sample.train_fraction; the "
                "official discrete draw); 'pretraining': the family's pre-training level distribution."})
    old_decay_ramp: float = field(default=0.001, metadata={
        "help": "Off-policy mode: sampling-policy EMA decay added per optimizer step."})
    old_decay_max: float = field(default=0.0, metadata={
        "help": "Ceiling of the sampling-policy EMA decay; 0 = on-policy (the official default)."})

    def __post_init__(self) -> None:
        if self.clip_range <= 0 or self.adv_clip_max <= 0 or self.kl_beta < 0:
            raise ValueError(f"awm needs clip_range > 0 ({self.clip_range}), adv_clip_max > 0 "
                             f"({self.adv_clip_max}) and kl_beta >= 0 ({self.kl_beta}).")
        if self.inner_epochs < 1 or self.micro_batch < 0:
            raise ValueError("awm needs inner_epochs >= 1 and micro_batch >= 0.")
        check_noise_levels(self.noise_levels)
        SamplingPolicy(self.old_decay_ramp, self.old_decay_max)  # validates the decay schedule


class AwmObjective(Objective):
    """Advantage-weighted matching (``objective.name: awm``): likelihood-free, trains on clean samples."""

    name = "awm"
    Params = AwmParams
    needs = frozenset()  # no log-probs: the rollout may be deterministic (η = 0)

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.policy = SamplingPolicy(self.params.old_decay_ramp, self.params.old_decay_max)

    def sampling_weights(self) -> dict[str, Tensor] | None:
        return self.policy.weights

    def update(self, batch: OnlineBatch, ctx: UpdateContext) -> dict[str, float]:
        p: AwmParams = self.params
        params = trainable_named_parameters(ctx.adapter)
        self.policy.start(params)
        weights = batch.effective_weights
        active = torch.nonzero(weights > 0).flatten()
        if active.numel() == 0:
            return {"active_fraction": 0.0}
        rollout = batch.rollout
        x0 = rollout.latents[:, -1][active]
        condition = rollout.condition.select(active.tolist())
        adv = batch.advantages[active].float().clamp(-p.adv_clip_max, p.adv_clip_max)
        w = weights[active]
        size = p.micro_batch or int(active.numel())
        # ℓ_old for every pass at its own (t, ε), before any optimizer step moves θ.
        passes = [draw_noised(ctx.adapter, x0, rollout, ctx.train_steps, p.noise_levels, ctx.generator)
                  for _ in range(p.inner_epochs)]
        with torch.no_grad(), self.policy.active(params):
            old = [per_sample_mse(predict_in_chunks(ctx.adapter, n, condition, size), n.target) for n in passes]
        metrics = MetricMeans()
        steps = 0
        for noised, mse_old in zip(passes, old, strict=True):
            order = torch.randperm(len(noised), generator=ctx.generator)
            for chunk in micro_batches(order.tolist(), size):
                self._micro_step(ctx.adapter, noised.select(chunk), mse_old[chunk], condition.select(chunk),
                                 adv[chunk], w[chunk], metrics)
                metrics.add(grad_norm=ctx.optimizer_step())
                steps += 1
        out = metrics.means()
        out.update(active_fraction=float(active.numel()) / len(batch), old_decay=self.policy.update(params, steps))
        return out

    def _micro_step(self, adapter: GeneratorAdapter, noised: Any, mse_old: Tensor, condition: Any, adv: Tensor,
                    w: Tensor, metrics: MetricMeans) -> None:
        p: AwmParams = self.params
        prediction = adapter.training_prediction(noised, condition)
        mse = per_sample_mse(prediction, noised.target)
        log_ratio = mse_old.to(mse.device) - mse
        policy_loss, gt, lt = ppo_clip_loss(adv.to(mse.device), log_ratio, p.clip_range, w.to(mse.device))
        loss = policy_loss
        if p.kl_beta > 0:
            with torch.no_grad(), adapter.lora_disabled():
                base = adapter.training_prediction(noised, condition)
            kl = ((prediction.float() - base.float()) ** 2).flatten(1).mean(1).mean()
            loss = loss + p.kl_beta * kl
            metrics.add(kl=kl)
        loss.backward()
        metrics.add(loss=loss, policy_loss=policy_loss, matching_loss=mse.detach().mean(),
                    clipfrac=(gt | lt).float().mean(), ratio=log_ratio.detach().exp().mean())

    def state_tensors(self) -> dict[str, Tensor]:
        return self.policy.state_tensors()

    def load_state_tensors(self, tensors: dict[str, Tensor], adapter: GeneratorAdapter) -> None:
        self.policy.load_state_tensors(tensors, trainable_named_parameters(adapter))
