"""Training inputs of the forward-process objectives (DiffusionNFT, AWM; docs/methods.md#nft, docs/methods.md#awm):
the rollout's clean final latents, noised again at fresh levels, and the reference predictions at those inputs.

These objectives never score a rollout step: they train the pre-training denoiser on ``q(x_t | x0)`` of the clean
samples, so any sampler works (η = 0 included) and only ``rollout.latents[:, -1]`` is needed. Two choices of the
noise level:

- ``"rollout"``: per sample and pass, one of the trained rollout steps (``ctx.train_steps``, i.e. the first
  ``sample.train_fraction`` of the schedule), at the level that step starts from (``adapter.step_noise_levels``):
  the official DiffusionNFT/AWM "discrete" draw from the sampler's own timesteps;
- ``"pretraining"``: the family's pre-training distribution (``adapter.training_timesteps``: DDPM uniform, flow
  logit-normal with the sampling shift).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from visalign.generators.base import Condition, GeneratorAdapter, Rollout
from visalign.generators.denoising_loss import NoisedLatents
from visalign.objectives.base import micro_batches

NOISE_LEVELS = ("rollout", "pretraining")


def check_noise_levels(mode: str) -> None:
    if mode not in NOISE_LEVELS:
        raise ValueError(f"noise_levels {mode!r} is not one of {list(NOISE_LEVELS)}.")


def draw_noised(adapter: GeneratorAdapter, x0: Tensor, rollout: Rollout, train_steps: Sequence[int], mode: str,
                generator: torch.Generator) -> NoisedLatents:
    """Noise clean latents once each, at levels drawn per ``mode`` (module docstring) from ``generator``.

    Args:
        x0: clean latents ``[N, ...]`` (rows of ``rollout.latents[:, -1]``).
        rollout: the rollout they come from (its schedule gives the ``"rollout"`` levels).
        train_steps: rollout step indices to draw levels from (``ctx.train_steps``).
        mode: ``"rollout"`` or ``"pretraining"``.

    Returns:
        :class:`NoisedLatents` with N rows; draw order: step picks, then noise (replayable from the generator).
    """
    levels = None
    if mode == "rollout":
        steps = torch.as_tensor(list(train_steps), dtype=torch.long)
        if steps.numel() == 0:
            raise ValueError("noise_levels 'rollout' needs trained steps; raise sample.train_fraction.")
        pick = steps[torch.randint(int(steps.numel()), (int(x0.shape[0]),), generator=generator)]
        all_levels = adapter.step_noise_levels(rollout)
        levels = all_levels[pick.to(all_levels.device)]
    return adapter.noise_latents(x0, timesteps=levels, generator=generator)


def predict_in_chunks(adapter: GeneratorAdapter, noised: NoisedLatents, condition: Condition, size: int) -> Tensor:
    """``adapter.training_prediction`` over ``size``-row chunks (0 = all at once), concatenated: ``[N, ...]``.
    Gradients follow torch's grad mode (call it under ``torch.no_grad()`` for reference predictions)."""
    chunks = micro_batches(range(len(noised)), size or len(noised))
    return torch.cat([adapter.training_prediction(noised.select(c), condition.select(c)) for c in chunks])
