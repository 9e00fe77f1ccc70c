"""One stochastic flow-matching step with its Gaussian log-probability (docs/methods.md#flow-sde).

Rectified-flow models (SD3/3.5, FLUX, Wan, LTX) sample ``x_s = (1 − s)·x0 + s·ε`` with the Euler ODE
``x_{s+ds} = x_s + v_hat·ds``. Replacing the ODE by an SDE with the same marginals turns every step into a
Gaussian policy ``N(mu, std²)`` whose log-density is closed-form. Three step rules are offered:

- ``"flowgrpo"``: Flow-GRPO's SDE, ``g = a·sqrt(s/(1−s))`` (yifan123/flow_grpo,
  flow_grpo/diffusers_patch/sd3_sde_with_logprob.py at commit 54809b5, ``sde_type='sde'``);
- ``"dance"``: DanceGRPO's constant diffusion coefficient ``g = a`` (XueZeyue/DanceGRPO ``flux_step``);
- ``"cps"``: coefficients-preserving sampling, ``std = s_next·sin(a·π/2)`` (flow_grpo at 54809b5,
  ``sde_type='cps'``).

The step is a *pure* function of ``(v_hat, s, s_next, x, prev_sample)``: no scheduler ``step_index`` state, so a
rollout step can be replayed exactly for training. Everything is computed in float32 because bf16 overflows in
``mu`` (flow_grpo's comment, confirmed by Flow-Factory).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

SDE_MODES = ("flowgrpo", "dance", "cps")
LOGP_MODES = ("exact", "flowgrpo_compat")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class FlowStepOutput(NamedTuple):
    """One step's result; a NamedTuple so ``x_next, mu, std, logp_mean, logp_sum = sde_step(...)`` works.

    Attributes:
        prev_sample: float32, same shape as ``x``: the next (less noisy) latent.
        mean: float32, same shape as ``x``: the Gaussian mean ``mu`` (carries the gradient of ``v_hat``).
        std: float32, broadcastable to ``x`` (``[B, 1, ...]``): the step's standard deviation; 0 for an ODE step.
        logp_mean: float32 ``[B]``: per-element log-density averaged over all non-batch dims (the published
            convention, docs/methods.md#notation, log-prob reduction); NaN where ``std == 0`` (no density, as in
            :class:`visalign.generators.base.StepOutput`).
        logp_sum: float32 ``[B]``: ``D · logp_mean``, the true log-density in ``"exact"`` mode.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    logp_mean: Tensor
    logp_sum: Tensor


def _per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """A scalar or ``[B]`` value → float32 ``[B, 1, ..., 1]`` broadcastable over every non-batch dim of ``like``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.ndim != 1 or t.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"Expected a scalar or a [B={like.shape[0]}] tensor; got shape {tuple(t.shape)}.")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def sde_step(
    v_hat: Tensor,
    s: float | Tensor,
    s_next: float | Tensor,
    x: Tensor,
    noise_level: float | Tensor,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: Tensor | None = None,
    mode: str = "flowgrpo",
    logp_mode: str = "exact",
    sigma_at_one: float | None = None,
    storage_dtype: torch.dtype | None = None,
) -> FlowStepOutput:
    """Take one flow-matching SDE step from noise level ``s`` to ``s_next`` and score it.

    Args:
        v_hat: predicted velocity ``ε − x0`` (after guidance), any float dtype, ``[B, ...]`` (4-D image or 5-D
            video latents).
        s, s_next: current and next noise level (the scheduler's sigmas, in [0, 1], ``s_next < s``): a float or a
            ``[B]`` tensor, broadcast over every non-batch dim.
        x: current latent, same shape as ``v_hat``.
        noise_level: ``a`` in docs/methods.md#flow-sde, ≥ 0; a float or ``[B]``. 0 gives the deterministic Euler step.
        prev_sample: the next latent to score (training replay). None samples a fresh one.
        generator: one generator or one per sample (``randn_tensor`` semantics) for the fresh noise.
        noise: the standard-normal draw itself, same shape as ``x`` (overrides ``generator``); adapters pass the
            per-sample noise they drew so every sample's trajectory depends on its own seed alone.
        mode: ``"flowgrpo"`` | ``"dance"`` | ``"cps"``.
        logp_mode: ``"exact"`` (a normalised Gaussian density) or ``"flowgrpo_compat"`` (for CPS, the reference
            code's ``−mean((x_next − mu)²)`` with constants and ``1/(2·std²)`` dropped; identical to exact for
            the SDE modes, whose reference code is already exact).
        sigma_at_one: Flow-GRPO divides by ``1 − sigmas[1]`` instead of ``1 − s`` where ``s == 1``; pass the
            schedule's second sigma. Needed only for ``mode="flowgrpo"`` with ``noise_level > 0`` at ``s == 1``.
        storage_dtype: a freshly sampled ``prev_sample`` is rounded through this dtype *before* it is scored, so
            the rollout and the training replay see identical values (Flow-Factory does the same).

    Returns:
        :class:`FlowStepOutput`. Steps with ``std == 0`` (noise level 0, or the CPS step onto ``s_next = 0``) are
        deterministic: their log-probs are NaN, so training on one fails loudly instead of silently adding 0.
    """
    if mode not in SDE_MODES:
        raise ValueError(f"Unknown SDE mode {mode!r}; use one of {SDE_MODES}.")
    if logp_mode not in LOGP_MODES:
        raise ValueError(f"Unknown logp_mode {logp_mode!r}; use one of {LOGP_MODES}.")
    v = v_hat.float()
    x = x.float()
    s_b, s_next_b, a = _per_sample(s, x), _per_sample(s_next, x), _per_sample(noise_level, x)
    if torch.any(a < 0):
        raise ValueError(f"noise_level must be ≥ 0; got {noise_level}.")
    ds = s_next_b - s_b
    if mode == "cps":
        std = s_next_b * torch.sin(a * math.pi / 2)
        x0_hat = x - s_b * v
        x1_hat = x + (1 - s_b) * v
        mu = (1 - s_next_b) * x0_hat + torch.sqrt((s_next_b**2 - std**2).clamp_min(0)) * x1_hat
    else:
        if mode == "flowgrpo":
            denom = 1 - _replace_one(s_b, sigma_at_one, a)
            # Where a == 0 (the ODE) the ratio may be s/0 at s == 1; g must be exactly 0 there, not 0·inf = NaN.
            ratio = torch.where(a > 0, s_b / torch.where(a > 0, denom, torch.ones_like(denom)), torch.zeros_like(s_b))
            g = a * torch.sqrt(ratio)
        else:
            g = a.expand_as(s_b)
        # g == 0 where s == 0 too, so the 1/s terms below are only evaluated where they are finite.
        safe_s = torch.where(g > 0, s_b, torch.ones_like(s_b))
        score = -(x + (1 - s_b) * v) / safe_s
        mu = x + (v - 0.5 * g**2 * score) * ds
        std = g * torch.sqrt((-ds).clamp_min(0))
    if prev_sample is None:
        if noise is None:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = mu + std * noise.float()
        if storage_dtype is not None:
            prev_sample = prev_sample.to(storage_dtype)
    target = prev_sample.detach().float()
    logp_elem = _log_density(target, mu, std, mode, logp_mode)
    logp_mean = logp_elem.mean(dim=tuple(range(1, x.ndim)))
    logp_sum = logp_mean * (x[0].numel())
    return FlowStepOutput(prev_sample.float(), mu, std, logp_mean, logp_sum)


def _replace_one(s: Tensor, sigma_at_one: float | None, a: Tensor) -> Tensor:
    at_one = s >= 1
    if not torch.any(at_one & (a > 0)):
        return s
    if sigma_at_one is None:
        raise ValueError("The Flow-GRPO SDE is singular at s = 1; pass sigma_at_one=scheduler.sigmas[1] "
                         "(what flow_grpo uses there), or start the schedule below 1.")
    return torch.where(at_one, torch.full_like(s, float(sigma_at_one)), s)


def _log_density(target: Tensor, mu: Tensor, std: Tensor, mode: str, logp_mode: str) -> Tensor:
    """Per-element log-density of ``target`` under ``N(mu, std²)``; NaN where ``std == 0`` (a point mass)."""
    deterministic = std <= 0
    if mode == "cps" and logp_mode == "flowgrpo_compat":
        logp = -((target - mu) ** 2)
    else:
        safe_std = torch.where(deterministic, torch.ones_like(std), std)
        logp = -((target - mu) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    return torch.where(deterministic, torch.full_like(logp, float("nan")), logp)
