"""The objective contract: one small class per objective over a shared :class:`UpdateBatch`.

The training loop (``visalign/train/loop.py``) owns sampling, scoring and the optimizer; an objective turns one
scored rollout into gradient steps. Per iteration the loop calls ``objective.update(batch, ctx)``, which may
take several optimizer steps (PPO-style inner epochs) through ``ctx.optimizer_step()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from visalign.generators.base import GeneratorAdapter, Rollout
from visalign.registry import Registry


@dataclass
class UpdateBatch:
    """One scored rollout, ready for an update.

    Attributes:
        rollout: the samples and their trajectories (no graph).
        rewards: float32 ``[B]``, the aggregated reward (finite: NaN samples were dropped by the loop).
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
class UpdateContext:
    """What an objective may use besides the batch.

    Attributes:
        adapter: the generator being trained (``step_log_prob``, ``lora_disabled``, ``denoising_loss``...).
        train_steps: rollout step indices to train on (already subset by the loop's step selection).
        optimizer_step: clip gradients, step the optimizer, the LR schedule and the EMA, zero the gradients;
            returns the pre-clip global grad norm.
        generator: a seeded CPU generator for the objective's own randomness (so resumes replay it exactly).
        reward: the training reward as a differentiable function ``(media [B, ...] in [0, 1], prompts, metadata)
            → float32 [B]`` that keeps the graph back to ``media``; set only for objectives that declare
            ``needs_reward_grad`` (reward backprop).
    """

    adapter: GeneratorAdapter
    train_steps: Sequence[int]
    optimizer_step: Callable[[], float]
    generator: torch.Generator
    reward: Callable[[Tensor, list[str], list[Any] | None], Tensor] | None = None


class Objective:
    """Base class. Subclasses declare a ``Params`` dataclass and implement :meth:`update`."""

    name: ClassVar[str] = "objective"
    Params: ClassVar[type] = object
    # Policy-gradient objectives train on the rollout's stochastic steps; reward backprop needs none (it may sample
    # with η = 0) but needs the reward's gradient instead.
    needs_log_probs: ClassVar[bool] = True
    needs_reward_grad: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        from visalign.config import from_dict

        self.params = from_dict(self.Params, params or {}, where="objective.params.")  # type: ignore[arg-type]

    def update(self, batch: UpdateBatch, ctx: UpdateContext) -> dict[str, float]:
        """Take this iteration's gradient steps; return scalar metrics (``loss``, ``clipfrac``, ``grad_norm``...)."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, Tensor]:
        """Tensors the objective carries across iterations (saved in checkpoints); none by default."""
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor], adapter: GeneratorAdapter) -> None:
        """Restore :meth:`state_tensors` from a checkpoint (``adapter`` is the generator being trained)."""

    @staticmethod
    def param_help(cls_params: type) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls_params)}


OBJECTIVES: Registry[type[Objective]] = Registry("objective", builtin={
    "grpo": "visalign.objectives.grpo:GrpoObjective",
    "ddpo": "visalign.objectives.grpo:GrpoObjective",
    "prdp": "visalign.objectives.prdp:PrdpObjective",
    "dragon": "visalign.objectives.dragon:DragonObjective",
    "raft": "visalign.objectives.raft:RaftObjective",
    "reward-backprop": "visalign.objectives.reward_backprop:RewardBackpropObjective",
    "draft": "visalign.objectives.reward_backprop:DraftObjective",
    "alignprop": "visalign.objectives.reward_backprop:AlignPropObjective",
    "refl": "visalign.objectives.reward_backprop:ReflObjective",
})


def build_objective(name: str, params: dict[str, Any] | None = None) -> Objective:
    """An objective by id (``grpo``, ``prdp``, ``dragon``, ``raft``, ``draft``, ``alignprop``, ``refl``) or
    ``"pkg.module:Class"``."""
    return OBJECTIVES.get(name)(params)


def micro_batches(indices: Sequence[int], size: int) -> list[list[int]]:
    """Split sample indices into consecutive chunks of at most ``size``."""
    idx = list(indices)
    return [idx[i:i + size] for i in range(0, len(idx), size)]


@dataclass
class MetricMeans:
    """Running means of scalar metrics over micro-batches and steps."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, **values: float | Tensor) -> None:
        for key, value in values.items():
            v = float(value.detach()) if isinstance(value, Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + v
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}
