"""Plain-callable rewards for the training tests, named by import path in recipes (``tests.train.scorers:X``).

Callable classes rather than closures so they stay picklable (STYLE.md §2.6).
"""

from __future__ import annotations

import torch


class BrightnessOddNan:
    """Mean pixel value, but NaN (abstain) for every odd-indexed sample of a batch: ``[B]`` float32."""

    def __call__(self, media: torch.Tensor, prompts: list[str], **kwargs: object) -> torch.Tensor:
        reward = media.float().flatten(1).mean(1)
        reward[1::2] = float("nan")
        return reward


class AlwaysNan:
    """Abstains on every sample: ``[B]`` of NaN."""

    def __call__(self, media: torch.Tensor, prompts: list[str], **kwargs: object) -> torch.Tensor:
        return torch.full((media.shape[0],), float("nan"))
