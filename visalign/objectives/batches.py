"""The batch types that experience sources produce and objectives consume (docs/architecture.md#sources).

Each objective declares the one type it consumes (``Objective.consumes``) and each source the one it produces
(``ExperienceSource.produces``); the trainer compares the two when it reads the config, before any model loads.

- :class:`OnlineBatch`: a scored rollout of the model being trained (policy-gradient and online objectives).
- :class:`PairBatch`: preference pairs as clean latents with their prompt condition (Diffusion-DPO, RPO); made
  offline from files by the ``pairs`` source, or online from a scored rollout by :func:`best_worst_pairs`.
- :class:`DenoisingBatch`: clean latents to fit with the ordinary denoising loss (RAFT's kept samples).
- :class:`TeacherBatch`: teacher ODE trajectories on a few-step student's grid (the ``teacher`` source; RG-LCM, R0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from visalign.generators.rollout import Condition, Rollout


@dataclass
class OnlineBatch:
    """One scored rollout, ready for an update.

    Attributes:
        rollout: the samples and their trajectories (no graph).
        rewards: float32 ``[B]``, the aggregated reward (finite: NaN samples were dropped by the reward spec).
        per_scorer: name → float32 ``[B]`` per-term rewards (for multi-reward objectives).
        advantages: float32 ``[B]`` group-normalised advantages (0 for zero-variance groups).
        group_ids: int64 ``[B]``, which prompt group each sample belongs to.
        weights: float32 ``[B]`` per-sample loss weights (uncertainty ``exp(−U)``, normalised to mean 1), else ones.
        keep: bool ``[B]``, samples allowed to carry the update (Pareto filtering); others get zero weight.
    """

    rollout: Rollout
    rewards: Tensor
    per_scorer: dict[str, Tensor]
    advantages: Tensor
    group_ids: Tensor
    weights: Tensor
    keep: Tensor

    def __len__(self) -> int:
        return len(self.rollout)

    @property
    def effective_weights(self) -> Tensor:
        """``weights`` with dropped samples (``keep`` false) set to 0."""
        return self.weights * self.keep.float()


@dataclass
class PairBatch:
    """P preference pairs: a chosen and a rejected sample of the same prompt, as clean latents.

    Attributes:
        prompts: P prompts.
        condition: P rows of prompt conditioning (``adapter.encode_condition`` without CFG, or rows of a rollout's).
        chosen: clean latents ``x_w`` ``[P, ...]`` (the preferred sample).
        rejected: clean latents ``x_l`` ``[P, ...]``, same shape.
        weights: float32 ``[P]`` per-pair loss weights (1 for offline pairs).
        preference: float32 ``[P]`` in [0, 1], the probability that ``chosen`` is preferred (1 for hard labels;
            RPO samples its Bernoulli labels from it).
        metadata: one dict per pair (the source's other columns, e.g. the row in the file).
        metrics: scalars the builder of the batch reports beside the objective's (e.g. mean reward of each side).
    """

    prompts: list[str]
    condition: Condition
    chosen: Tensor
    rejected: Tensor
    weights: Tensor
    preference: Tensor | None = None
    metadata: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = len(self.prompts)
        if self.chosen.shape != self.rejected.shape or self.chosen.shape[0] != p:
            raise ValueError(f"PairBatch: {p} prompts, chosen {tuple(self.chosen.shape)} and rejected "
                             f"{tuple(self.rejected.shape)}; they must agree, one row per pair.")
        if self.preference is None:
            self.preference = torch.ones(p)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class DenoisingBatch:
    """N clean latents with their prompt condition, for the plain denoising loss (supervised fine-tuning).

    Attributes:
        latents: clean latents ``[N, ...]``.
        condition: N rows of prompt conditioning.
        weights: float32 ``[N]`` per-sample loss weights.
    """

    latents: Tensor
    condition: Condition
    weights: Tensor

    def __len__(self) -> int:
        return int(self.latents.shape[0])


@dataclass
class TeacherBatch:
    """B teacher ODE trajectories on the student's LCM grid (docs/methods.md#distillation).

    Attributes:
        prompts: B prompts (each repeated ``sample.images_per_prompt`` times, consecutively).
        condition: B rows of prompt conditioning, with negatives when the teacher or the student uses CFG.
        trajectory: float32 ``[B, N+1, ...]``: index 0 the initial noise at ``schedule.grid[0]``, index j the teacher's
            latents at ``grid[j]``, index N its clean sample.
        schedule: the student's :class:`~visalign.generators.consistency.StudentSchedule` (timesteps, grid, scalings).
        size: ``(height, width)`` in pixels.
        metadata: one dict per sample (the prompt table's other columns), or None.
    """

    prompts: list[str]
    condition: Condition
    trajectory: Tensor
    schedule: Any
    size: tuple[int, int]
    metadata: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def teacher_samples(self) -> Tensor:
        """The teacher's clean latents ``[B, ...]`` (the trajectories' ends)."""
        return self.trajectory[:, -1]


def best_worst_pairs(rewards: Tensor, group_ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per prompt group, the best sample (→ chosen) and the worst (→ rejected) among samples with weight > 0.

    Ties break toward the lower index (deterministic). Groups with fewer than two live samples or with all rewards
    equal carry no preference and give no pair.

    Args:
        rewards: float ``[B]``; group_ids: int64 ``[B]``; weights: float ``[B]`` (``batch.effective_weights``).

    Returns:
        ``(winners, losers)``: int64 ``[P]`` sample indices, one pair per group, in group order.
    """
    winners, losers = [], []
    for group in torch.unique(group_ids):
        members = torch.nonzero((group_ids == group) & (weights > 0)).flatten()
        if members.numel() < 2:
            continue
        r = rewards[members]
        best, worst = int(torch.argmax(r)), int(torch.argmin(r))  # first occurrence on ties
        if r[best] > r[worst]:
            winners.append(int(members[best]))
            losers.append(int(members[worst]))
    return torch.tensor(winners, dtype=torch.long), torch.tensor(losers, dtype=torch.long)


def online_pairs(batch: OnlineBatch) -> PairBatch:
    """The best-vs-worst pair of every prompt group of a scored rollout, as a :class:`PairBatch` (DRAGON's paired
    mode): latents are the rollout's final ones, weights the product of the two samples' effective weights."""
    weights = batch.effective_weights
    winners, losers = best_worst_pairs(batch.rewards, batch.group_ids, weights)
    rollout, x0 = batch.rollout, batch.rollout.latents[:, -1]
    prompts = [rollout.prompts[i] for i in winners.tolist()]
    metrics = {}
    if winners.numel():
        metrics = {"positive_reward": float(batch.rewards[winners].mean()),
                   "negative_reward": float(batch.rewards[losers].mean())}
    return PairBatch(prompts=prompts, condition=rollout.condition.select(winners.tolist()), chosen=x0[winners],
                     rejected=x0[losers], weights=weights[winners] * weights[losers], metrics=metrics)


def top_k_per_group(rewards: Tensor, group_ids: Tensor, weights: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` best samples of each prompt group, among samples with weight > 0.

    Ties break toward the lower index (a stable sort), so the selection is deterministic.

    Args:
        rewards: float ``[B]``; group_ids: int64 ``[B]``; weights: float ``[B]`` (``batch.effective_weights``).
        k: samples kept per group (fewer when a group has fewer live samples).

    Returns:
        int64 ``[K]`` sample indices, sorted ascending.
    """
    kept = []
    for group in torch.unique(group_ids):
        members = torch.nonzero((group_ids == group) & (weights > 0)).flatten()
        order = torch.sort(rewards[members], descending=True, stable=True).indices
        kept.extend(members[order[:k]].tolist())
    return torch.tensor(sorted(kept), dtype=torch.long)
