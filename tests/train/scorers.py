"""Plain-callable rewards for the training tests, named by import path in recipes (``tests.train.scorers:X``).

Callable classes rather than closures so they stay picklable (docs/extending.md#scorers-and-rewards).
"""

from __future__ import annotations

import torch


class BrightnessOddNan:
    """Mean pixel value, but NaN (abstain) for the odd-indexed samples whose prompt metadata has ``skip_odd: true``
    (a column of the prompt table, which reaches scorers as ``metadata``): ``[B]`` float32."""

    def __call__(self, media: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None,
                 **kwargs: object) -> torch.Tensor:
        if metadata is None:
            raise ValueError("BrightnessOddNan needs the prompt table's metadata (a skip_odd column).")
        reward = media.float().flatten(1).mean(1)
        for i, meta in enumerate(metadata):
            if i % 2 and meta["skip_odd"]:
                reward[i] = float("nan")
        return reward


class AlwaysNan:
    """Abstains on every sample: ``[B]`` of NaN."""

    def __call__(self, media: torch.Tensor, prompts: list[str], **kwargs: object) -> torch.Tensor:
        return torch.full((media.shape[0],), float("nan"))


class FailsEveryThird:
    """Mean pixel value ``[B]``, but every third call raises (a flaky reward server): calls 3, 6, 9... fail."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, media: torch.Tensor, prompts: list[str], **kwargs: object) -> torch.Tensor:
        self.calls += 1
        if self.calls % 3 == 0:
            raise ConnectionError(f"call {self.calls}: the reward server dropped the connection")
        return media.float().flatten(1).mean(1)


class AlwaysFails:
    """Raises on every call (a broken scorer)."""

    def __call__(self, media: torch.Tensor, prompts: list[str], **kwargs: object) -> torch.Tensor:
        raise RuntimeError("this scorer is broken")
