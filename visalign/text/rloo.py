"""RLOO for a causal-LM policy: REINFORCE with the leave-one-out baseline (docs/methods.md#text-core).

The whole completion is one action (TRL's RLOO): ``A_i = r_i − (Σ_{j≠i} r_j)/(G − 1)`` within the prompt group, on
the rewards the run's :class:`~visalign.rewards.RewardSpec` made (transforms such as PAR and the aggregation apply
first), optionally with the KL in the reward, ``r_i ← r_i − β·Σ_t (logπ_old − logπ_ref)(o_{i,t})``, and optionally
whitened over the batch. The loss is PPO's clip on the sequence ratio ``ρ_i = exp(Σ_t logπ_θ − Σ_t logπ_old)``,
``L = mean_i −min(ρ_i·A_i, clip(ρ_i, 1−ε, 1+ε)·A_i)``; at ``num_iterations = 1`` it is exactly REINFORCE
(``ρ = 1``, gradient ``−A_i·∇ Σ_t logπ_θ``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from visalign.objectives.base import MetricMeans, Objective, UpdateContext, micro_batches
from visalign.objectives.common import ReferenceModel
from visalign.text.batches import TextOnlineBatch
from visalign.text.losses import rloo_advantages, sequence_log_probs


@dataclass
class TextRlooParams:
    beta: float = field(default=0.0, metadata={
        "help": "KL-in-reward coefficient: r ← r − β·Σ_t (logπ_old − logπ_ref) (0 = off; TRL's RLOO used 0.05)."})
    epsilon: float = field(default=0.2, metadata={"help": "Clip ε on the sequence ratio (matters only when "
                                                          "num_iterations > 1)."})
    normalize_advantages: bool = field(default=False, metadata={
        "help": "Whiten the advantages over the batch (mean 0, std 1)."})
    num_iterations: int = field(default=1, metadata={"help": "Passes over each rollout."})
    micro_batch: int = field(default=0, metadata={"help": "Completions per optimizer step; 0 = the whole batch."})

    def __post_init__(self) -> None:
        if self.beta < 0 or self.epsilon <= 0 or self.num_iterations < 1 or self.micro_batch < 0:
            raise ValueError("text-rloo needs beta >= 0, epsilon > 0, num_iterations >= 1 and micro_batch >= 0.")


class TextRlooObjective(Objective):
    """REINFORCE leave-one-out on text (``objective.name: text-rloo``)."""

    name = "text-rloo"
    Params = TextRlooParams
    consumes = TextOnlineBatch
    needs = frozenset({"log_probs"})
    default_source = "text-online"

    def __init__(self, params: dict | None = None) -> None:
        super().__init__(params)
        self.reference = ReferenceModel("base")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.reference.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], adapter: object) -> None:
        self.reference.load_state_tensors(tensors, adapter)

    def advantages(self, batch: TextOnlineBatch, ctx: UpdateContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [B], kl [B])``: the leave-one-out advantages of the (KL-penalised) rewards, and the sequence KL
        estimate ``Σ_t (logπ_old − logπ_ref)`` (zeros when beta is 0)."""
        p: TextRlooParams = self.params
        rollout = batch.rollout
        kl = torch.zeros(len(batch))
        if p.beta > 0:
            with torch.no_grad(), self.reference(ctx.adapter):
                ref = ctx.adapter.rollout_log_probs(rollout).log_probs
            kl = sequence_log_probs(rollout.log_probs - ref, rollout.completion_mask).cpu()
        rewards = batch.rewards.float().cpu() - p.beta * kl
        keep = batch.effective_weights.cpu() > 0
        adv = rloo_advantages(rewards, batch.group_ids.cpu(), keep)
        if p.normalize_advantages and int(keep.sum()) > 1:
            kept = adv[keep]
            adv = torch.where(keep, (adv - kept.mean()) / (kept.std() + 1e-8), torch.zeros_like(adv))
        return adv, kl

    def update(self, batch: TextOnlineBatch, ctx: UpdateContext) -> dict[str, float]:
        p: TextRlooParams = self.params
        adv, kl = self.advantages(batch, ctx)
        weights = batch.effective_weights.cpu()
        active = torch.nonzero((weights > 0) & (adv != 0)).flatten()
        if active.numel() == 0:
            return {"active_fraction": 0.0, "kl": float(kl.mean())}
        metrics = MetricMeans()
        size = p.micro_batch or int(active.numel())
        for _ in range(p.num_iterations):
            order = active[torch.randperm(active.numel(), generator=ctx.generator)]
            for chunk in micro_batches(order.tolist(), size):
                chunk = sorted(chunk)
                sub = batch.rollout.select(chunk)
                mask = sub.completion_mask
                current = ctx.adapter.rollout_log_probs(sub)
                log_ratio = sequence_log_probs(current.log_probs - sub.log_probs, mask)
                ratio = torch.exp(log_ratio)
                a = adv[chunk].to(ratio)
                per_sample = -torch.minimum(ratio * a, ratio.clamp(1 - p.epsilon, 1 + p.epsilon) * a)
                loss = (per_sample * weights[chunk].to(ratio)).mean()
                loss.backward()
                metrics.add(loss=loss, ratio=ratio.detach().mean(),
                            clip_ratio=((ratio.detach() - 1).abs() > p.epsilon).float().mean(),
                            entropy=(current.entropy * mask).sum() / mask.sum().clamp(min=1),
                            grad_norm=ctx.optimizer_step())
        out = metrics.means()
        out.update(active_fraction=float(active.numel()) / len(batch), kl=float(kl.mean()),
                   advantage_abs=float(adv[active].abs().mean()))
        return out
