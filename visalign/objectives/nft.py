"""DiffusionNFT: negative-aware fine-tuning on the forward process (arXiv 2509.16117; docs/methods.md#nft).

Per iteration the sampling ("old") policy ``θ_old`` (an EMA of the weights, :mod:`visalign.objectives.sampling_policy`)
draws a rollout with any sampler; each clean final sample ``x0`` gets an optimality probability from its group
advantage, ``r = clip(A / a_max, −1, 1) / 2 + 1/2`` in [0, 1] (``a_max = adv_clip_max``; r = 1/2 for a sample no
better than its group's mean). ``x0`` is noised again, ``x_t ~ q(x_t | x0)``, and two implicit policies are built from
the trained prediction and the old one at that input,

    positive  v⁺ = β·v_θ + (1 − β)·v_old,        negative  v⁻ = (1 + β)·v_old − β·v_θ,

and trained as denoisers of ``x0``: ``L = a_max · mean_i [r_i·ℓ(v⁺) + (1 − r_i)·ℓ(v⁻)] / β`` with the adaptive
x0-space loss ``ℓ(v) = mean ||x̂0(v) − x0||² / sg(mean |x̂0(v) − x0|)``. At ``θ = θ_old`` its gradient is
``2(2r − 1)·∇ℓ(v_θ)``: zero for r = 1/2, the positive sample's denoising loss for r = 1, its negative for r = 0.

Prediction types. ``x̂0`` is affine in the denoiser output at a fixed ``x_t`` (flow ``x_s − s·v``; DDPM ε
``(x_t − sqrt(1−ᾱ)·ε̂)/sqrt(ᾱ)``, v ``sqrt(ᾱ)·x_t − sqrt(1−ᾱ)·v̂``, x0 itself), so mixing predictions and then
converting equals converting and then mixing: the loss is written on ``x̂0 = adapter.x0_from_prediction(...)`` and
applies unchanged to flow, ε- and v-prediction models (for flow it is term by term the official loss).

Defaults are the official SD3 config (NVlabs/DiffusionNFT ``config/nft.py``): β = 1, ``adv_clip_max`` 5, old-policy
decay ``min(0.001·steps, 0.5)``, KL to the base off by default (the official ``train.beta`` is 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from visalign.generators.base import GeneratorAdapter
from visalign.objectives.base import MetricMeans, Objective, OnlineBatch, UpdateContext, micro_batches
from visalign.objectives.forward_process import check_noise_levels, draw_noised, predict_in_chunks
from visalign.objectives.sampling_policy import SamplingPolicy, trainable_named_parameters

__all__ = ["NftObjective", "NftParams", "adaptive_x0_loss", "nft_loss", "optimality"]


@dataclass
class NftParams:
    beta: float = field(default=1.0, metadata={"help": "β of the implicit policies v± (official 1.0): how far the "
                                                        "positive/negative policies sit from the old one."})
    adv_clip_max: float = field(default=5.0, metadata={
        "help": "Advantages are clipped to ±this and mapped to r = A/(2·max) + 1/2; the loss is scaled by it."})
    kl_beta: float = field(default=0.0, metadata={
        "help": "Weight of mean ||v_θ − v_base||² to the LoRA-off base model at the same input (official 1e-4; "
                "0 = off; needs LoRA)."})
    inner_epochs: int = field(default=1, metadata={"help": "Passes over each rollout, fresh (t, ε) per pass."})
    micro_batch: int = field(default=0, metadata={"help": "Samples per optimizer step; 0 = the whole batch."})
    noise_levels: str = field(default="rollout", metadata={
        "help": "'rollout': re-noise at the levels of the trained rollout steps (sample.train_fraction; the "
                "official discrete draw); 'pretraining': the family's pre-training level distribution."})
    old_decay_ramp: float = field(default=0.001, metadata={
        "help": "Sampling-policy EMA decay added per optimizer step (official decay_type 1: 0.001)."})
    old_decay_max: float = field(default=0.5, metadata={
        "help": "Ceiling of the sampling-policy EMA decay (official 0.5; 0 = on-policy, no copy kept)."})

    def __post_init__(self) -> None:
        if self.beta <= 0 or self.adv_clip_max <= 0 or self.kl_beta < 0:
            raise ValueError(f"nft needs beta > 0 ({self.beta}), adv_clip_max > 0 ({self.adv_clip_max}) and "
                             f"kl_beta >= 0 ({self.kl_beta}).")
        if self.inner_epochs < 1 or self.micro_batch < 0:
            raise ValueError("nft needs inner_epochs >= 1 and micro_batch >= 0.")
        check_noise_levels(self.noise_levels)
        SamplingPolicy(self.old_decay_ramp, self.old_decay_max)  # validates the decay schedule


def optimality(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """``r = clip(A / a_max, −1, 1) / 2 + 1/2``: float ``[B]`` in [0, 1], 1/2 for a zero advantage."""
    return (advantages.float() / adv_clip_max).clamp(-1.0, 1.0) / 2 + 0.5


def adaptive_x0_loss(x0_hat: Tensor, x0: Tensor, floor: float = 1e-5) -> Tensor:
    """Per-sample ``mean (x̂0 − x0)² / sg(max(mean |x̂0 − x0|, floor))``, float32 ``[B]`` (the official adaptive
    weighting: each sample's loss is normalised by its own detached L1 error, computed in float64)."""
    diff = x0_hat.float() - x0.float()
    with torch.no_grad():
        scale = diff.double().abs().flatten(1).mean(1).clamp(min=floor).float()
    return (diff**2).flatten(1).mean(1) / scale


def nft_loss(x0_pred: Tensor, x0_old: Tensor, x0: Tensor, r: Tensor, beta: float) -> Tensor:
    """The per-sample DiffusionNFT loss ``[r·ℓ(x̂0⁺) + (1 − r)·ℓ(x̂0⁻)] / β`` (without the ``a_max`` scale).

    Args:
        x0_pred: ``x̂0`` of the trained model ``[B, ...]`` (with a graph).
        x0_old: ``x̂0`` of the old (sampling) policy at the same input, same shape (no graph).
        x0: the clean samples, same shape.
        r: float ``[B]`` optimality probabilities in [0, 1].
        beta: β > 0.

    Returns:
        float32 ``[B]``.
    """
    old = x0_old.detach().float()
    positive = beta * x0_pred.float() + (1 - beta) * old
    negative = (1 + beta) * old - beta * x0_pred.float()
    r = r.to(positive.device).float()
    return (r * adaptive_x0_loss(positive, x0) + (1 - r) * adaptive_x0_loss(negative, x0)) / beta


class NftObjective(Objective):
    """DiffusionNFT (``objective.name: nft``): likelihood-free, trains on clean samples, any sampler."""

    name = "nft"
    Params = NftParams
    needs = frozenset()  # no log-probs: the rollout may be deterministic (η = 0)

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.policy = SamplingPolicy(self.params.old_decay_ramp, self.params.old_decay_max)

    def sampling_weights(self) -> dict[str, Tensor] | None:
        return self.policy.weights

    def update(self, batch: OnlineBatch, ctx: UpdateContext) -> dict[str, float]:
        p: NftParams = self.params
        params = trainable_named_parameters(ctx.adapter)
        self.policy.start(params)
        weights = batch.effective_weights
        active = torch.nonzero(weights > 0).flatten()
        if active.numel() == 0:
            return {"active_fraction": 0.0}
        rollout = batch.rollout
        x0 = rollout.latents[:, -1][active]
        condition = rollout.condition.select(active.tolist())
        r = optimality(batch.advantages[active], p.adv_clip_max)
        w = weights[active]
        size = p.micro_batch or int(active.numel())
        # Every pass's inputs and the old policy's predictions come first, before any optimizer step moves θ.
        passes = [draw_noised(ctx.adapter, x0, rollout, ctx.train_steps, p.noise_levels, ctx.generator)
                  for _ in range(p.inner_epochs)]
        with torch.no_grad(), self.policy.active(params):
            old = [ctx.adapter.x0_from_prediction(n.noisy, predict_in_chunks(ctx.adapter, n, condition, size),
                                                  n.timesteps) for n in passes]
        metrics = MetricMeans()
        steps = 0
        for noised, x0_old in zip(passes, old, strict=True):
            order = torch.randperm(len(noised), generator=ctx.generator)
            for chunk in micro_batches(order.tolist(), size):
                self._micro_step(ctx.adapter, noised.select(chunk), x0_old[chunk], condition.select(chunk),
                                 r[chunk], w[chunk], metrics)
                metrics.add(grad_norm=ctx.optimizer_step())
                steps += 1
        out = metrics.means()
        out.update(active_fraction=float(active.numel()) / len(batch), optimality_mean=float(r.mean()),
                   old_decay=self.policy.update(params, steps))
        return out

    def _micro_step(self, adapter: GeneratorAdapter, noised: Any, x0_old: Tensor, condition: Any, r: Tensor,
                    w: Tensor, metrics: MetricMeans) -> None:
        p: NftParams = self.params
        prediction = adapter.training_prediction(noised, condition)
        x0_pred = adapter.x0_from_prediction(noised.noisy, prediction, noised.timesteps)
        per_sample = nft_loss(x0_pred, x0_old, noised.x0, r, p.beta)
        policy_loss = p.adv_clip_max * (per_sample * w.to(per_sample.device)).mean()
        loss = policy_loss
        if p.kl_beta > 0:
            with torch.no_grad(), adapter.lora_disabled():
                base = adapter.training_prediction(noised, condition)
            kl = ((prediction.float() - base.float()) ** 2).flatten(1).mean(1).mean()
            loss = loss + p.kl_beta * kl
            metrics.add(kl=kl)
        loss.backward()
        metrics.add(loss=loss, policy_loss=policy_loss,
                    old_deviation=((x0_pred.detach() - x0_old) ** 2).flatten(1).mean(1).mean())

    def state_tensors(self) -> dict[str, Tensor]:
        return self.policy.state_tensors()

    def load_state_tensors(self, tensors: dict[str, Tensor], adapter: GeneratorAdapter) -> None:
        self.policy.load_state_tensors(tensors, trainable_named_parameters(adapter))
