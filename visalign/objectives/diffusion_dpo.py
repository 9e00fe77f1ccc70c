"""Diffusion-DPO on preference pairs (docs/methods.md#diffusion-dpo; arXiv 2311.12908).

For a pair ``(x_w, x_l)`` of one prompt, draw a noise level ``t`` and noise ``ε`` once and share them between the
two, then compare the denoising errors of the policy and the frozen reference::

    inside = −(β/2)·[(ℓ_θ(x_w) − ℓ_ref(x_w)) − (ℓ_θ(x_l) − ℓ_ref(x_l))] ,   L = −log σ(inside)

ℓ is the adapter's per-sample ``denoising_loss`` (mean-over-elements MSE of the conditional branch), so β keeps the
DiffusionDPO calibration (5000). At θ = ref, ``inside = 0`` and ``L = log 2``. An optional SFT term
``sft_weight · ℓ_θ(x_w)`` keeps the model fitting the chosen samples (it stops the DPO surrogate from lowering both
likelihoods at once). The reference is the LoRA-disabled model, or a frozen copy of a full fine-tune's weights.

The update reads a :class:`~visalign.objectives.batches.PairBatch`: offline pairs from the ``pairs`` source, or
on-policy best-vs-worst pairs built by DRAGON's paired mode (:func:`visalign.objectives.batches.online_pairs`).
The ``(t, ε)`` draws and the reference losses are made once per batch and reused by every inner step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from visalign.generators.base import GeneratorAdapter
from visalign.objectives.base import MetricMeans, PairBatch, UpdateContext, micro_batches
from visalign.objectives.common import PreferenceObjective, ReferenceModel

REFERENCES = ("base", "old")


@dataclass
class DiffusionDpoParams:
    beta: float = field(default=5000.0, metadata={"help": "β of the DPO surrogate, calibrated to mean-over-elements "
                                                          "MSE (DiffusionDPO: 5000)."})
    sft_weight: float = field(default=0.0, metadata={"help": "Weight of an SFT term ℓ_θ(x_w) on the chosen sample "
                                                             "beside the DPO loss (0 = off)."})
    reference: str = field(default="base", metadata={"help": "'base': the model before training (LoRA off, or a "
                                                             "frozen copy of a full fine-tune's weights); 'old': the "
                                                             "weights at the start of each update."})
    inner_steps: int = field(default=1, metadata={"help": "Passes over each batch of pairs (same (t, ε) draws)."})
    micro_batch: int = field(default=0, metadata={"help": "Pairs per optimizer step; 0 = the whole batch."})

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"diffusion-dpo reference must be one of {REFERENCES}; got {self.reference!r}.")
        if self.beta <= 0 or self.sft_weight < 0 or self.inner_steps < 1 or self.micro_batch < 0:
            raise ValueError("diffusion-dpo needs beta > 0, sft_weight >= 0, inner_steps >= 1, micro_batch >= 0.")


def diffusion_dpo_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float
                       ) -> tuple[Tensor, Tensor]:
    """Diffusion-DPO per pair: ``inside = −(β/2)·[(ℓ_θ(x_w) − ℓ_ref(x_w)) − (ℓ_θ(x_l) − ℓ_ref(x_l))]``,
    ``L = −log σ(inside)``; at θ = ref, ``inside = 0`` and ``L = log 2``.

    Args:
        model_w, model_l: float ``[P]`` denoising MSEs of the chosen / rejected samples under θ (with gradients),
            computed at the SAME (t, ε) within each pair.
        ref_w, ref_l: float ``[P]``, the reference's MSEs at those draws (constants).
        beta: β, calibrated to mean-over-elements MSE.

    Returns:
        ``(loss [P], inside [P])``; ``implicit_acc = mean(inside > 0)``.
    """
    inside = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))
    return torch.nn.functional.softplus(-inside), inside


@dataclass
class PairReference:
    """The reference's denoising losses of a pair batch at the draws every inner step reuses.

    Attributes:
        ref_w, ref_l: float ``[P]`` reference MSEs of the chosen / rejected latents.
        timesteps: ``[P]`` the shared noise levels; noise: ``[P, ...]`` the shared ε.
    """

    ref_w: Tensor
    ref_l: Tensor
    timesteps: Tensor
    noise: Tensor


def pair_reference(adapter: GeneratorAdapter, batch: PairBatch, reference: ReferenceModel,
                   generator: torch.Generator) -> PairReference:
    """Draw ``(t, ε)`` once per pair (for the chosen sample; the rejected one reuses them: the pair must differ only
    in x0) and compute the reference's losses there, without a graph."""
    with torch.no_grad(), reference(adapter):
        ref_w = adapter.denoising_loss(batch.chosen, batch.condition, generator=generator)
        ref_l = adapter.denoising_loss(batch.rejected, batch.condition, timesteps=ref_w.timesteps, noise=ref_w.noise)
    return PairReference(ref_w.loss, ref_l.loss, ref_w.timesteps, ref_w.noise)


def pair_losses(adapter: GeneratorAdapter, batch: PairBatch, ref: PairReference, chunk: list[int]
                ) -> tuple[Tensor, Tensor]:
    """The policy's denoising losses ``(ℓ_θ(x_w) [N], ℓ_θ(x_l) [N])`` of the pairs ``chunk`` at the shared draws."""
    condition = batch.condition.select(chunk)
    t, eps = ref.timesteps[chunk], ref.noise[chunk]
    model_w = adapter.denoising_loss(batch.chosen[chunk], condition, timesteps=t, noise=eps)
    model_l = adapter.denoising_loss(batch.rejected[chunk], condition, timesteps=t, noise=eps)
    return model_w.loss, model_l.loss


class DiffusionDpoObjective(PreferenceObjective):
    """Diffusion-DPO (``objective.name: diffusion-dpo``), on offline pairs by default."""

    name = "diffusion-dpo"
    Params = DiffusionDpoParams
    consumes = PairBatch
    default_source = "pairs"

    def update(self, batch: PairBatch, ctx: UpdateContext) -> dict[str, float]:
        if len(batch) == 0:
            return {"pairs": 0.0, **batch.metrics}
        p: DiffusionDpoParams = self.params
        ref = pair_reference(ctx.adapter, batch, self.reference, ctx.generator)
        weights = batch.weights.to(ref.ref_w)
        metrics = MetricMeans()
        for _ in range(p.inner_steps):
            order = torch.randperm(len(batch), generator=ctx.generator)
            for chunk in micro_batches(order.tolist(), p.micro_batch or len(batch)):
                model_w, model_l = pair_losses(ctx.adapter, batch, ref, chunk)
                per_pair, inside = diffusion_dpo_loss(model_w, model_l, ref.ref_w[chunk], ref.ref_l[chunk], p.beta)
                loss = (per_pair * weights[chunk]).mean()
                if p.sft_weight > 0:
                    sft = (model_w * weights[chunk]).mean()
                    loss = loss + p.sft_weight * sft
                    metrics.add(sft_loss=sft)
                loss.backward()
                metrics.add(loss=loss, implicit_acc=(inside > 0).float().mean(),
                            model_mse=torch.cat([model_w, model_l]).mean(),
                            ref_mse=torch.cat([ref.ref_w[chunk], ref.ref_l[chunk]]).mean(),
                            model_minus_ref_diff=-2 * inside.detach().mean() / p.beta,
                            grad_norm=ctx.optimizer_step())
        out = metrics.means()
        out.update(pairs=float(len(batch)), **batch.metrics)
        return out
