"""Per-prompt group advantages for DDPO / GRPO-style objectives (docs/methods.md#grpo), at ddpo's scale.

``A_i = (r_i − mean_g r) / (std_g r + eps)``, clipped to ±A_max, where g is the group of samples generated for
the same prompt. Defaults follow flow_grpo (eps 1e-4, ddof 0, A_max 5); ddpo-pytorch uses eps 1e-6 and
DanceGRPO ddof 1 — both are one config field away. A zero-variance group (every sample tied, or a group of
one) carries no preference, so its advantages are exactly 0 and the samples are reported in ``zero_std``.
Gather rewards and prompts across processes *before* calling this (docs/methods.md#grpo, "gather before normalizing").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from visalign.reductions import group_index, group_stats


@dataclass
class AdvantageConfig:
    """How rewards become advantages."""

    normalize_std: bool = field(default=True, metadata={"help": "Divide by the group std; false keeps r − mean_g."})
    ddof: int = field(default=0, metadata={"help": "Std degrees-of-freedom correction (0: flow_grpo, 1: torch)."})
    global_std: bool = field(default=False, metadata={"help": "Use the whole batch's std instead of each group's."})
    eps: float = field(default=1e-4, metadata={"help": "Added to the std before dividing (flow_grpo: 1e-4)."})
    clip: float | None = field(default=5.0, metadata={"help": "Clip advantages to ±clip (A_max); null disables."})

    def __post_init__(self) -> None:
        if self.ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 or 1; got {self.ddof}.")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0; got {self.eps}.")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"clip (A_max) must be > 0 or null; got {self.clip}.")


@dataclass
class GroupAdvantages:
    """Advantages and the group statistics behind them.

    Attributes:
        advantages: float32 ``[B]``; 0 for zero-variance groups and for NaN rewards.
        zero_std: bool ``[B]``, true for samples whose group has zero variance (all tied, or a single sample).
        group_index: int64 ``[B]``, group of each sample, numbered by first appearance.
        group_mean: float32 ``[B]``, the mean of each sample's group (over finite rewards).
        group_std: float32 ``[B]``, the std used for each sample (its group's, or the batch's if global_std).
    """

    advantages: Tensor
    zero_std: Tensor
    group_index: Tensor
    group_mean: Tensor
    group_std: Tensor

    @property
    def frac_zero_std(self) -> float:
        """Fraction of samples in zero-variance groups (TRL's ``frac_reward_zero_std``)."""
        return float(self.zero_std.float().mean()) if self.zero_std.numel() else 0.0


def group_advantages(rewards: Tensor, group_ids: Sequence[Any] | Tensor,
                     config: AdvantageConfig | None = None) -> GroupAdvantages:
    """Per-prompt group advantages (docs/methods.md#grpo).

    Args:
        rewards: float ``[B]`` total rewards; NaN (no scorer applied) is left out of the statistics and gets 0.
        group_ids: one id per sample; samples with equal ids form a group (pass the prompts, or prompt ids).
        config: normalisation options; defaults to :class:`AdvantageConfig()`.

    Returns:
        :class:`GroupAdvantages` with float32 ``advantages [B]``, in [−clip, clip] when ``clip`` is set.

    >>> out = group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), ["a", "a", "b", "b"])
    >>> [round(a, 3) for a in out.advantages.tolist()], out.zero_std.tolist()
    ([-1.0, 1.0, 0.0, 0.0], [False, False, True, True])
    """
    config = config or AdvantageConfig()
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [B]; got shape {tuple(rewards.shape)}.")
    rewards = rewards.detach().float()
    index = group_index(group_ids, rewards.shape[0]).to(rewards.device)
    mean, std, tied = group_stats(rewards, index, config.ddof)
    present = ~torch.isnan(rewards)
    if config.global_std:
        finite = rewards[present]
        n = finite.numel()
        batch_std = finite.std(correction=config.ddof) if n > config.ddof else rewards.new_zeros(())
        std = torch.full_like(rewards, float(batch_std))
    centred = rewards - mean
    adv = centred / (std + config.eps) if config.normalize_std else centred
    if config.clip is not None:
        adv = adv.clamp(-config.clip, config.clip)
    # Zero-variance groups and abstained samples carry no preference: exactly 0, never a divide by eps.
    adv = torch.where(tied | ~present, torch.zeros_like(adv), adv)
    return GroupAdvantages(advantages=adv, zero_std=tied, group_index=index, group_mean=mean, group_std=std)
