"""Best-of-N / RAFT for a causal-LM policy (docs/methods.md#text-core, docs/methods.md#raft).

Sample N = G completions per prompt, keep the one with the highest reward (ties broken at random by the engine's
seeded generator), and fine-tune on it with the ordinary next-token loss (mean NLL over its trained tokens, EOS
included). One round is RAFT's iteration; the kept completion is best-of-N sampling's output, whose KL to the policy
is at most ``log N − (N−1)/N`` (logged as ``bon_kl_bound``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from visalign.objectives.base import MetricMeans, Objective, UpdateContext, micro_batches
from visalign.text.batches import TextOnlineBatch
from visalign.text.losses import best_of_n, best_of_n_kl_bound, token_nll


@dataclass
class TextBestOfNParams:
    inner_steps: int = field(default=1, metadata={"help": "SFT passes over the kept completions per rollout."})
    micro_batch: int = field(default=0, metadata={"help": "Kept completions per optimizer step; 0 = all."})
    min_reward: float | None = field(default=None, metadata={
        "help": "Keep a group's best only when its reward is at least this (RAFT's filter); null = always."})

    def __post_init__(self) -> None:
        if self.inner_steps < 1 or self.micro_batch < 0:
            raise ValueError("text-best-of-n needs inner_steps >= 1 and micro_batch >= 0.")


class TextBestOfNObjective(Objective):
    """Best-of-N selection + SFT on the winners (``objective.name: text-best-of-n``, alias ``text-raft``)."""

    name = "text-best-of-n"
    Params = TextBestOfNParams
    consumes = TextOnlineBatch
    needs = frozenset()  # a supervised step on kept completions: no log-probs of the rollout are needed
    default_source = "text-online"

    def update(self, batch: TextOnlineBatch, ctx: UpdateContext) -> dict[str, float]:
        p: TextBestOfNParams = self.params
        keep = batch.effective_weights.cpu() > 0
        kept = best_of_n(batch.rewards.cpu(), batch.group_ids.cpu(), keep, ctx.generator)
        if p.min_reward is not None and kept.numel():
            kept = kept[batch.rewards.cpu()[kept] >= p.min_reward]
        group_size = len(batch) // max(int(torch.unique(batch.group_ids).numel()), 1)
        out = {"kept": float(kept.numel()), "bon_kl_bound": best_of_n_kl_bound(group_size),
               "batch_reward": float(batch.rewards.cpu()[keep].mean()) if bool(keep.any()) else float("nan")}
        if kept.numel() == 0:
            return out
        out["kept_reward"] = float(batch.rewards.cpu()[kept].mean())
        metrics = MetricMeans()
        for _ in range(p.inner_steps):
            order = kept[torch.randperm(kept.numel(), generator=ctx.generator)]
            for chunk in micro_batches(order.tolist(), p.micro_batch or int(kept.numel())):
                sub = batch.rollout.select(sorted(chunk))
                nll = token_nll(ctx.adapter.rollout_log_probs(sub).log_probs, sub.completion_mask)
                loss = (nll * batch.weights[sorted(chunk)].to(nll)).mean()
                loss.backward()
                metrics.add(loss=loss, grad_norm=ctx.optimizer_step())
        out.update(metrics.means())
        return out
