"""Reward-hacking diagnostics logged during training (METHODS.md §15).

Proxy vs held-out eval reward (from the eval pass), reward-variance collapse, within-group diversity, and the
path KL to the reference (from the objective's closed-form KL when β > 0).
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_diversity(media: Tensor, group_ids: Tensor, size: int = 16) -> float:
    """Mean pairwise RMS pixel distance between samples of the same group, at ``size``×``size`` (cheap, no model).

    Args:
        media: float in [0, 1], ``[B, 3, H, W]`` or ``[B, T, 3, H, W]`` (videos use their first frame).
        group_ids: int64 ``[B]``.

    Returns:
        The mean over all same-group pairs, in [0, 1]; NaN if no group has two samples.
    """
    if media.ndim == 5:
        media = media[:, 0]
    small = torch.nn.functional.interpolate(media.float(), size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).flatten(1)
    dist = torch.cdist(small, small) / small.shape[1] ** 0.5
    same = group_ids[:, None] == group_ids[None, :]
    pairs = same & ~torch.eye(len(group_ids), dtype=torch.bool)
    return float(dist[pairs].mean()) if pairs.any() else float("nan")


class CollapseMonitor:
    """Warns when the within-group reward std falls below ``ratio`` × its value at the first iteration."""

    def __init__(self, ratio: float = 0.2) -> None:
        self.ratio = ratio
        self.initial: float | None = None

    def check(self, reward_std: float) -> str | None:
        if self.initial is None:
            self.initial = reward_std
            return None
        if self.initial > 0 and reward_std < self.ratio * self.initial:
            return (f"reward variance collapse: within-group std {reward_std:.4g} is below {self.ratio:.0%} of its "
                    f"starting value {self.initial:.4g} (mode collapse or reward hacking; check the grids).")
        return None
