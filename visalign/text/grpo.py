"""GRPO for a causal-LM policy, with TRL's loss types grpo / bnpo / dr_grpo / dapo (docs/methods.md#text-core).

Per completion ``i`` and token ``t``: ``ρ = exp(logπ_θ − logπ_old)``,
``ℓ_{i,t} = −min(ρ·A_i, clip(ρ, 1−ε_low, 1+ε_high)·A_i) + β·k3_{i,t}``, aggregated by ``loss_type``
(:data:`visalign.text.losses.LOSS_TYPES`). ``A_i`` is the batch's advantage, made by the run's
:class:`~visalign.rewards.RewardSpec` exactly as on the visual side: group-normalised by default, unscaled for
Dr.GRPO (``reward.advantage.normalize_std: false``), GDPO's per-term normalisation when the aggregation is ``gdpo``.
The KL reference is the LoRA-disabled model (or a frozen copy of a full fine-tune's start), as for the visual GRPO.
``logπ_old`` is the rollout's own (sampling) log-probs, so at ``num_iterations = 1`` every ratio is exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from visalign.objectives.base import MetricMeans, Objective, UpdateContext, micro_batches
from visalign.objectives.common import ReferenceModel
from visalign.text.batches import TextOnlineBatch
from visalign.text.losses import LOSS_TYPES, clipped_token_loss, k3_kl


@dataclass
class TextGrpoParams:
    loss_type: str = field(default="dapo", metadata={
        "help": "How per-token losses are averaged: grpo (per completion, then over completions), bnpo (over the "
                "micro-batch's tokens), dr_grpo (sum / (completions × text.max_new_tokens)), dapo (over the "
                "update's tokens; TRL's default)."})
    epsilon: float = field(default=0.2, metadata={"help": "Clip ε (lower bound 1 − ε; TRL 0.2)."})
    epsilon_high: float | None = field(default=None, metadata={
        "help": "Upper clip bound 1 + ε_high (DAPO's clip-higher: 0.28); null = epsilon."})
    beta: float = field(default=0.0, metadata={"help": "k3 KL-to-reference coefficient (TRL default 0 = off)."})
    num_iterations: int = field(default=1, metadata={"help": "Passes over each rollout (TRL's num_iterations)."})
    micro_batch: int = field(default=0, metadata={"help": "Completions per optimizer step; 0 = the whole batch."})
    skip_zero_advantage: bool = field(default=True, metadata={
        "help": "Leave completions with A = 0 (zero-variance groups) out of the forward passes when beta is 0; they "
                "carry no gradient."})

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"text-grpo loss_type {self.loss_type!r} is not one of {sorted(LOSS_TYPES)}.")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0) or self.beta < 0:
            raise ValueError("text-grpo needs epsilon > 0, epsilon_high > 0 (or null) and beta >= 0.")
        if self.num_iterations < 1 or self.micro_batch < 0:
            raise ValueError("text-grpo needs num_iterations >= 1 and micro_batch >= 0.")


class TextGrpoObjective(Objective):
    """GRPO / Dr.GRPO / DAPO on text (``objective.name: text-grpo``)."""

    name = "text-grpo"
    Params = TextGrpoParams
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

    def update(self, batch: TextOnlineBatch, ctx: UpdateContext) -> dict[str, float]:
        p: TextGrpoParams = self.params
        weights = batch.effective_weights
        active = torch.nonzero(weights > 0).flatten()
        if p.skip_zero_advantage and p.beta == 0:
            active = active[batch.advantages[active] != 0]
        if active.numel() == 0:
            return {"active_fraction": 0.0}
        size = p.micro_batch or int(active.numel())
        chunks_per_pass = -(-int(active.numel()) // size)
        tokens_per_step = float(batch.rollout.completion_mask[active].sum()) / chunks_per_pass
        metrics = MetricMeans()
        for _ in range(p.num_iterations):
            order = active[torch.randperm(active.numel(), generator=ctx.generator)]
            for chunk in micro_batches(order.tolist(), size):
                self._micro_step(batch, ctx, sorted(chunk), tokens_per_step, metrics)
                metrics.add(grad_norm=ctx.optimizer_step())
        out = metrics.means()
        out["active_fraction"] = float(active.numel()) / len(batch)
        return out

    def _micro_step(self, batch: TextOnlineBatch, ctx: UpdateContext, chunk: list[int], tokens_per_step: float,
                    metrics: MetricMeans) -> None:
        p: TextGrpoParams = self.params
        sub = batch.rollout.select(chunk)
        mask = sub.completion_mask
        current = ctx.adapter.rollout_log_probs(sub)
        adv = batch.advantages[chunk].to(mask.device)
        per_token, low, high = clipped_token_loss(current.log_probs, sub.log_probs, adv, p.epsilon,
                                                  p.epsilon if p.epsilon_high is None else p.epsilon_high)
        kl = torch.zeros_like(per_token)
        if p.beta > 0:
            with torch.no_grad(), self.reference(ctx.adapter):
                ref = ctx.adapter.rollout_log_probs(sub).log_probs
            kl = k3_kl(current.log_probs, ref)
            per_token = per_token + p.beta * kl
        per_token = per_token * batch.weights[chunk].to(mask)[:, None]  # uncertainty weights (mean 1), else 1
        max_length = int(sub.extras.get("max_new_tokens", mask.shape[1]))
        loss = LOSS_TYPES[p.loss_type](per_token, mask, max_length, tokens_per_step)
        loss.backward()
        n = mask.sum().clamp(min=1)
        log_ratio = (current.log_probs.detach() - sub.log_probs) * mask
        metrics.add(loss=loss, kl=(kl.detach() * mask).sum() / n, entropy=(current.entropy * mask).sum() / n,
                    clip_ratio_low=(low.float() * mask).sum() / n, clip_ratio_high=(high.float() * mask).sum() / n,
                    ratio=(log_ratio.exp() * mask).sum() / n)
