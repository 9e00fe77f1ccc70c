"""λ-Harmonic RPO: preference optimisation against reference images (docs/methods.md#rpo-harmonic; RPO, NeurIPS
2024, "Subject-driven Text-to-Image Generation via Preference-based Reinforcement Learning").

Each pair is a reference image ``x_w`` (the subject, as it should look) and a generated image ``x_l`` of the same
prompt. The ``pairs`` source labels a pair with ``preference = σ(R_λ(x_w) − R_λ(x_l))``, where ``R_λ`` is the
λ-Harmonic reward of an image against the references (a weighted harmonic mean of image and text fidelity, scorer
``lambda-harmonic-*``); every update draws Bernoulli labels ``y`` from it with the seeded generator. With shared
``(t, ε)`` per pair and mean-over-elements MSEs::

    Δ = (ℓ_ref(x_w) − ℓ_θ(x_w)) − (ℓ_ref(x_l) − ℓ_θ(x_l))
    L = λ_rec · mean ℓ_θ(x_w) − mean[ y·log σ(β·Δ) + (1 − y)·log σ(−β·Δ) ]

``Δ`` is Diffusion-DPO's ``inside`` with β_DPO = 2, so with every ``y = 1`` and ``λ_rec = 0`` this is
Diffusion-DPO at β_DPO = 2β (a test checks it). The reconstruction term on the references keeps the subject. RPO's
own SD script uses β = 1. Early stopping on validation λ-Harmonic is the engine's (``eval.early_stop_metric``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.objectives.base import MetricMeans, PairBatch, UpdateContext, micro_batches
from visalign.objectives.common import PreferenceObjective
from visalign.objectives.diffusion_dpo import REFERENCES, pair_losses, pair_reference


@dataclass
class RpoHarmonicParams:
    beta: float = field(default=1.0, metadata={"help": "β on Δ in the preference term (RPO's SD script: 1)."})
    reconstruction_weight: float = field(default=1.0, metadata={
        "help": "λ_rec, weight of the denoising loss on the reference (chosen) images."})
    reference: str = field(default="base", metadata={"help": "'base': the model before training (LoRA off, or a "
                                                             "frozen copy of a full fine-tune); 'old': the weights "
                                                             "at the start of each update."})
    inner_steps: int = field(default=1, metadata={"help": "Passes over each batch (same (t, ε) draws, fresh "
                                                          "labels)."})
    micro_batch: int = field(default=0, metadata={"help": "Pairs per optimizer step; 0 = the whole batch."})

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"rpo-harmonic reference must be one of {REFERENCES}; got {self.reference!r}.")
        if self.beta <= 0 or self.reconstruction_weight < 0 or self.inner_steps < 1 or self.micro_batch < 0:
            raise ValueError("rpo-harmonic needs beta > 0, reconstruction_weight >= 0, inner_steps >= 1, "
                             "micro_batch >= 0.")


def rpo_preference_loss(delta: Tensor, labels: Tensor, beta: float) -> Tensor:
    """Per pair ``−[y·log σ(β·Δ) + (1 − y)·log σ(−β·Δ)]`` for float ``delta [P]`` and labels ``y [P]`` in {0, 1}."""
    return -(labels * F.logsigmoid(beta * delta) + (1 - labels) * F.logsigmoid(-beta * delta))


class RpoHarmonicObjective(PreferenceObjective):
    """λ-Harmonic RPO (``objective.name: rpo-harmonic``) on reference-vs-generated pairs."""

    name = "rpo-harmonic"
    Params = RpoHarmonicParams
    consumes = PairBatch
    default_source = "pairs"

    def update(self, batch: PairBatch, ctx: UpdateContext) -> dict[str, float]:
        if len(batch) == 0:
            return {"pairs": 0.0}
        p: RpoHarmonicParams = self.params
        ref = pair_reference(ctx.adapter, batch, self.reference, ctx.generator)
        weights = batch.weights.to(ref.ref_w)
        preference = batch.preference.float()
        metrics = MetricMeans()
        for _ in range(p.inner_steps):
            labels = torch.bernoulli(preference, generator=ctx.generator).to(ref.ref_w)
            order = torch.randperm(len(batch), generator=ctx.generator)
            for chunk in micro_batches(order.tolist(), p.micro_batch or len(batch)):
                model_w, model_l = pair_losses(ctx.adapter, batch, ref, chunk)
                delta = (ref.ref_w[chunk] - model_w) - (ref.ref_l[chunk] - model_l)
                preference_loss = (rpo_preference_loss(delta, labels[chunk], p.beta) * weights[chunk]).mean()
                similar_loss = (model_w * weights[chunk]).mean()
                loss = p.reconstruction_weight * similar_loss + preference_loss
                loss.backward()
                metrics.add(loss=loss, preference_loss=preference_loss, similar_loss=similar_loss,
                            label_fraction=labels[chunk].mean(), delta=delta.detach().mean(),
                            grad_norm=ctx.optimizer_step())
        out = metrics.means()
        out.update(pairs=float(len(batch)), preference_mean=float(preference.mean()), **batch.metrics)
        return out
