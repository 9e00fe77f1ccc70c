"""The sampling ("old") policy of the forward-process objectives: an EMA of the trainable weights that generates the
rollouts and supplies the reference predictions of the loss (DiffusionNFT, docs/methods.md#nft; AWM's off-policy
mode, docs/methods.md#awm).

After every update ``θ_old ← d·θ_old + (1 − d)·θ`` with a decay that ramps with the optimizer steps taken,
``d = min(ramp · steps, max_decay)`` (DiffusionNFT's ``return_decay``, ``decay_type`` 1: ramp 0.001, max 0.5). Early on
``d ≈ 0`` and the old policy follows the trained one (fast progress); later it lags, which keeps the sampling
distribution from moving as fast as the weights. ``max_decay = 0`` is the on-policy case: no copy is kept, and the
old policy is the current weights at the start of each update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from visalign.generators.base import GeneratorAdapter


def trainable_named_parameters(adapter: GeneratorAdapter) -> dict[str, torch.nn.Parameter]:
    """The denoiser's trainable parameters by name: the same names and order as the engine's ``Trainer.params``."""
    return {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}


class SamplingPolicy:
    """An EMA copy of the trainable weights, updated once per objective update.

    Args:
        ramp: decay added per optimizer step taken.
        max_decay: the decay's ceiling in [0, 1); 0 = on-policy (no copy kept).
    """

    def __init__(self, ramp: float, max_decay: float) -> None:
        if ramp < 0 or not 0 <= max_decay < 1:
            raise ValueError(f"sampling policy decay needs ramp >= 0 and 0 <= max_decay < 1; got ramp {ramp}, "
                             f"max_decay {max_decay}.")
        self.ramp = ramp
        self.max_decay = max_decay
        self.weights: dict[str, Tensor] | None = None
        self.steps = 0

    @property
    def on_policy(self) -> bool:
        return self.max_decay == 0

    def decay(self) -> float:
        """The EMA decay after ``steps`` optimizer steps."""
        return min(self.ramp * self.steps, self.max_decay)

    def start(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Take the current weights as the old policy if none is held yet (the first update: the weights that
        sampled its rollout)."""
        if self.weights is None and not self.on_policy:
            self.weights = {n: p.detach().clone() for n, p in params.items()}

    def update(self, params: dict[str, torch.nn.Parameter], steps_taken: int) -> float:
        """Count ``steps_taken`` optimizer steps, then move the old weights toward ``params``; returns the decay."""
        self.steps += steps_taken
        d = self.decay()
        if self.weights is not None:
            with torch.no_grad():
                for name, p in params.items():
                    self.weights[name].mul_(d).add_(p.detach(), alpha=1 - d)
        return d

    @contextlib.contextmanager
    def active(self, params: dict[str, torch.nn.Parameter]) -> Iterator[None]:
        """Inside the block ``params`` hold the old weights (a no-op on-policy); the current ones come back after."""
        if self.weights is None:
            yield
            return
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.weights[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

    def state_tensors(self) -> dict[str, Tensor]:
        state = {"steps": torch.tensor(self.steps, dtype=torch.long)}
        if self.weights is not None:
            state.update({f"old.{n}": t for n, t in self.weights.items()})
        return state

    def load_state_tensors(self, tensors: dict[str, Tensor], params: dict[str, torch.nn.Parameter]) -> None:
        if "steps" in tensors:
            self.steps = int(tensors["steps"])
        old = {k.removeprefix("old."): t for k, t in tensors.items() if k.startswith("old.")}
        if old:
            missing = sorted(set(params) - set(old))
            if missing:
                raise ValueError(f"The checkpoint's sampling policy lacks {missing[:2]}; it was written for another "
                                 "model or LoRA configuration.")
            self.weights = {n: old[n].to(p.device, p.dtype).clone() for n, p in params.items()}
