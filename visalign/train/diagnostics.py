"""Reward-hacking diagnostics logged during training (docs/methods.md#hacking-diagnostics).

Proxy vs held-out eval reward (from the eval pass), reward-variance collapse, within-group diversity, and the
path KL to the reference (the objective's closed-form KL when β > 0 is logged as ``kl``; the loop also estimates
the path KL on its own SDE rollouts at every eval, :meth:`visalign.train.sources.online.OnlineSource.path_kl`).
"""

from __future__ import annotations

from typing import Any

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
    """Warns when the within-group reward std falls below ``ratio`` × its mean over the first iterations.

    docs/methods.md#hacking-diagnostics ("Reward variance collapse"): a collapsing spread within prompt groups signals
    mode collapse or reward hacking, and also starves group-normalised objectives of signal. ``warned`` counts the
    warnings, so the loop can print the first one and keep logging the rest as a metric.
    """

    def __init__(self, ratio: float = 0.2, baseline_iterations: int = 3) -> None:
        self.ratio = ratio
        # The baseline is the mean of the first few iterations: one small batch's group std is too noisy.
        self.baseline_iterations = baseline_iterations
        self.seen: list[float] = []
        self.initial: float | None = None
        self.warned = 0

    def check(self, reward_std: float) -> str | None:
        """The warning text when ``reward_std`` (a float ≥ 0) has collapsed, else None (the first call sets the
        baseline; NaN is ignored)."""
        if reward_std != reward_std:  # NaN: no finite rewards this iteration
            return None
        if self.initial is None:
            self.seen.append(reward_std)
            if len(self.seen) >= self.baseline_iterations:
                self.initial = sum(self.seen) / len(self.seen)
            return None
        if self.initial > 0 and reward_std < self.ratio * self.initial:
            self.warned += 1
            return (f"reward variance collapse: within-group std {reward_std:.4g} is below {self.ratio:.0%} of its "
                    f"starting value {self.initial:.4g} (mode collapse or reward hacking; check the grids).")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "warned": self.warned, "seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial = state.get("initial")
        self.seen = [float(v) for v in state.get("seen", [])]
        self.warned = int(state.get("warned") or 0)
