"""DRAGON: on-policy positive and negative sets, trained with a contrastive denoising surrogate
(docs/methods.md#dragon).

Each iteration's rollout is split into a positive set D+ and a negative set D− by its rewards, then the model is
pulled toward D+ and away from D− relative to a reference (arXiv 2504.15217; the surrogates and split rules are
[unverified], docs/methods.md#dragon Confidence):

- ``mode: paired`` — instance rewards (pointwise or instance-to-distribution scorers): in every prompt group the
  best sample goes to D+ and the worst to D− (same prompt: a preference pair), trained with Diffusion-DPO
  (docs/methods.md#diffusion-dpo): ``L = −log σ(−(β/2)·[(ℓ_θ(x_w) − ℓ_ref(x_w)) − (ℓ_θ(x_l) − ℓ_ref(x_l))])`` with
  ``(t, ε)`` shared within the pair.
- ``mode: unpaired`` — set-level rewards (full-set Fréchet distance, Vendi): the scorer already turns the set value
  into per-sample leave-one-out credits ``Δ_i`` (``visalign/scorers/distributional.py``, ``fd-change`` mode), so
  ``D+ = {i : Δ_i > median Δ}`` over the batch and ``D− =`` the rest, trained with Diffusion-KTO
  (docs/methods.md#dragon): ``L = w·(1 − σ(sign·β·(ℓ_ref − ℓ_θ − z0)))``, ``z0 = sg(clamp(mean(ℓ_ref − ℓ_θ), min=0))``.

ℓ is the adapter's per-sample ``denoising_loss`` (mean-over-elements MSE, conditional branch) on the rollout's final
latents. The reference is the model before training (``reference: base``): the LoRA-disabled model, or for a full
fine-tune a frozen copy of the trainable weights taken at this process's first update (Diffusion-DPO's frozen
reference UNet; checkpoints carry it through :meth:`state_tensors`, so a resumed run keeps the original copy).
``reference: old`` is the rollout snapshot θ_old: θ = θ_old when
the update starts, so the first step's DPO loss is log 2 and its KTO ``g`` is 0 — every rollout, so with one inner
step nothing anchors the model and the surrogate keeps raising the denoising error on D− (measured on the tiny SD of
tests/objectives/test_acceptance.py). The ``(t, ε)`` draws and the reference losses are made once per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from visalign.objectives.base import MetricMeans, OnlineBatch, UpdateContext, micro_batches
from visalign.objectives.batches import best_worst_pairs, online_pairs
from visalign.objectives.common import PreferenceObjective, denoising_loss, diffusion_kto_loss, kto_reference_point
from visalign.objectives.diffusion_dpo import DiffusionDpoObjective

__all__ = ["DragonObjective", "DragonParams", "best_worst_pairs", "median_split"]

MODES = ("paired", "unpaired")
REFERENCES = ("base", "old")


@dataclass
class DragonParams:
    mode: str = field(default="paired", metadata={"help": "'paired': best vs worst of each prompt group → "
                                                          "Diffusion-DPO (instance rewards); 'unpaired': above vs "
                                                          "below the batch median → Diffusion-KTO (set-level)."})
    beta: float = field(default=5000.0, metadata={"help": "β of the DPO/KTO surrogate, calibrated to mean-over-"
                                                          "elements MSE (DiffusionDPO: 5000)."})
    reference: str = field(default="base", metadata={"help": "'base': the model before training — the LoRA-disabled "
                                                             "model, or for a full fine-tune a frozen copy of the "
                                                             "weights taken at the first update; 'old': the model as "
                                                             "it was when the rollout was sampled (the loss restarts "
                                                             "at log 2 every rollout, so nothing bounds the drift)."})
    lambda_desirable: float = field(default=1.0, metadata={"help": "KTO weight λ_D of D+ samples (unpaired mode)."})
    lambda_undesirable: float = field(default=1.0, metadata={"help": "KTO weight λ_U of D− samples (unpaired mode)."})
    inner_steps: int = field(default=1, metadata={"help": "Passes over each rollout's D+/D− (same (t, ε) draws)."})
    micro_batch: int = field(default=0, metadata={"help": "Pairs (paired) or samples (unpaired) per optimizer step; "
                                                          "0 = all of them in one step."})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"dragon mode must be one of {MODES}; got {self.mode!r}.")
        if self.reference not in REFERENCES:
            raise ValueError(f"dragon reference must be one of {REFERENCES}; got {self.reference!r}.")
        if self.beta <= 0 or self.lambda_desirable < 0 or self.lambda_undesirable < 0:
            raise ValueError("dragon needs beta > 0 and lambda_desirable, lambda_undesirable >= 0.")
        if self.inner_steps < 1 or self.micro_batch < 0:
            raise ValueError("dragon needs inner_steps >= 1 and micro_batch >= 0.")


def median_split(rewards: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """D+ = samples above the median reward of the live samples (weight > 0); D− = the other live samples.

    Returns:
        ``(index [N], desirable [N])``: int64 indices of the live samples and a bool mask of D+ among them. When every
        live reward is equal, D+ is empty.
    """
    index = torch.nonzero(weights > 0).flatten()
    live = rewards[index]
    return index, live > live.median()


class DragonObjective(PreferenceObjective):
    """DRAGON with Diffusion-DPO (paired) or Diffusion-KTO (unpaired) surrogates (``objective.name: dragon``)."""

    name = "dragon"
    Params = DragonParams

    def __init__(self, params: dict | None = None) -> None:
        super().__init__(params)
        p: DragonParams = self.params
        # Paired mode is Diffusion-DPO on the rollout's best-vs-worst pairs: the same objective that trains on
        # offline pairs, sharing this objective's reference (and so its frozen copy of a full fine-tune).
        self._dpo = DiffusionDpoObjective({"beta": p.beta, "reference": p.reference, "inner_steps": p.inner_steps,
                                           "micro_batch": p.micro_batch})
        self._dpo.reference = self.reference

    def update(self, batch: OnlineBatch, ctx: UpdateContext) -> dict[str, float]:
        p: DragonParams = self.params
        if p.mode == "paired":
            pairs = online_pairs(batch)
            return self._dpo.update(pairs, ctx) if len(pairs) else {"pairs": 0.0}
        index, desirable = median_split(batch.rewards, batch.effective_weights)
        if not desirable.any():
            return {"positives": 0.0}
        return self._unpaired(batch, ctx, index, desirable)

    def _unpaired(self, batch: OnlineBatch, ctx: UpdateContext, index: Tensor, desirable: Tensor) -> dict[str, float]:
        p: DragonParams = self.params
        rollout, x0 = batch.rollout, batch.rollout.latents[:, -1]
        with torch.no_grad(), self.reference(ctx.adapter):
            ref = denoising_loss(ctx.adapter, x0[index], rollout, index.tolist(), generator=ctx.generator)
        sample_weights = batch.effective_weights[index].to(ref.loss)
        metrics = MetricMeans()
        for _ in range(p.inner_steps):
            order = torch.randperm(index.numel(), generator=ctx.generator)
            chunks = micro_batches(order.tolist(), p.micro_batch or index.numel())
            batch_z0 = None
            if len(chunks) > 1:
                # z0 is a statistic of the whole batch (docs/methods.md#dragon), not of each micro-batch: one no-grad
                # pass.
                with torch.no_grad():
                    current = denoising_loss(ctx.adapter, x0[index], rollout, index.tolist(),
                                             timesteps=ref.timesteps, noise=ref.noise)
                batch_z0 = kto_reference_point(current.loss, ref.loss)
            for chunk in chunks:
                rows = index[chunk]
                model = denoising_loss(ctx.adapter, x0[rows], rollout, rows.tolist(), timesteps=ref.timesteps[chunk],
                                       noise=ref.noise[chunk])
                per_sample, z0 = diffusion_kto_loss(model.loss, ref.loss[chunk], desirable[chunk], p.beta,
                                                    lambda_desirable=p.lambda_desirable,
                                                    lambda_undesirable=p.lambda_undesirable, z0=batch_z0)
                loss = (per_sample * sample_weights[chunk]).mean()
                loss.backward()
                g = (ref.loss[chunk] - model.loss).detach()
                d = desirable[chunk]
                metrics.add(loss=loss, z0=z0, model_mse=model.loss.mean(), ref_mse=ref.loss[chunk].mean(),
                            grad_norm=ctx.optimizer_step())
                if d.any():
                    metrics.add(g_positive=g[d].mean())
                if (~d).any():
                    metrics.add(g_negative=g[~d].mean())
        out = metrics.means()
        out.update(positives=float(desirable.sum()), negatives=float((~desirable).sum()))
        return out
