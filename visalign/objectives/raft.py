"""RAFT: reward-ranked fine-tuning (docs/methods.md#raft; arXiv 2304.06767).

Sample a group per prompt, keep the best ``top_k`` by reward, and fine-tune on the kept samples with the model's
ordinary denoising loss — the adapter's ``denoising_loss`` on the kept rollouts' final latents
(``rollout.latents[:, -1]``) and their own prompt condition. Generation needs no gradients and the step needs no
log-probs, so any scorer and any sampler work. This equals flow_grpo's ``'sft'`` advantage type (the indicator of the
group argmax) when ``top_k = 1``. Ties break toward the lower sample index, so a rerun keeps the same samples.
Top-k per prompt rather than a global top fraction of the batch is our reading ([unverified], docs/methods.md#raft).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from visalign.objectives.base import MetricMeans, Objective, OnlineBatch, UpdateContext, micro_batches
from visalign.objectives.batches import DenoisingBatch, top_k_per_group

__all__ = ["RaftObjective", "RaftParams", "sft_update", "top_k_per_group"]


@dataclass
class RaftParams:
    top_k: int = field(default=1, metadata={"help": "Samples kept per prompt group (the best by reward); "
                                                    "acceptance rate = top_k / images_per_prompt."})
    inner_steps: int = field(default=1, metadata={"help": "SFT passes over the kept samples per rollout (fresh "
                                                          "(t, ε) draws each pass)."})
    micro_batch: int = field(default=0, metadata={"help": "Kept samples per optimizer step; 0 = all in one step."})
    reencode: bool = field(default=False, metadata={
        "help": "Fit the kept samples' media re-encoded by the VAE (as fine-tuning on saved images does) instead "
                "of the rollout's final latents; CFG-sampled latents sit off the VAE's posterior."})

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.inner_steps < 1 or self.micro_batch < 0:
            raise ValueError("raft needs top_k >= 1, inner_steps >= 1 and micro_batch >= 0.")


class RaftObjective(Objective):
    """Reward-ranked supervised fine-tuning (``objective.name: raft``)."""

    name = "raft"
    Params = RaftParams
    needs = frozenset()  # a supervised step on kept samples: any sampler, η = 0 included

    def update(self, batch: OnlineBatch, ctx: UpdateContext) -> dict[str, float]:
        p: RaftParams = self.params
        weights = batch.effective_weights
        kept = top_k_per_group(batch.rewards, batch.group_ids, weights, p.top_k)
        if kept.numel() == 0:
            return {"kept": 0.0}
        rollout, x0 = batch.rollout, batch.rollout.latents[:, -1][kept]
        if p.reencode:
            x0 = ctx.adapter.encode_media(rollout.media[kept]).to(x0)
        fit = DenoisingBatch(latents=x0, condition=rollout.condition.select(kept.tolist()), weights=weights[kept])
        result = sft_update(fit, ctx, inner_steps=p.inner_steps, micro_batch=p.micro_batch)
        result.update(kept=float(kept.numel()), kept_reward=float(batch.rewards[kept].mean()),
                      batch_reward=float(batch.rewards[weights > 0].mean()))
        return result


def sft_update(batch: DenoisingBatch, ctx: UpdateContext, *, inner_steps: int = 1, micro_batch: int = 0
               ) -> dict[str, float]:
    """Supervised fine-tuning steps on clean latents: ``inner_steps`` shuffled passes, one optimizer step per
    micro-batch of the weighted mean denoising loss (fresh ``(t, ε)`` draws from ``ctx.generator`` every pass).

    Returns:
        ``loss`` and ``grad_norm`` means over the steps taken.
    """
    metrics = MetricMeans()
    n = len(batch)
    for _ in range(inner_steps):
        order = torch.randperm(n, generator=ctx.generator)
        for chunk in micro_batches(order.tolist(), micro_batch or n):
            out = ctx.adapter.denoising_loss(batch.latents[chunk], batch.condition.select(chunk),
                                             generator=ctx.generator)
            loss = (out.loss * batch.weights[chunk].to(out.loss)).mean()
            loss.backward()
            metrics.add(loss=loss, grad_norm=ctx.optimizer_step())
    return metrics.means()
