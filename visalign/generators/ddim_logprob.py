"""One DDIM step (η ≥ 0) as a pure function, with the log-probability of the resulting sample
(docs/methods.md#ddim-logprob).

Adapted from diffusers ``DDIMScheduler.step`` (src/diffusers/schedulers/scheduling_ddim.py at release tag v0.42.1)
and kvablack/ddpo-pytorch ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``. Changes:

1. Pure function of ``(model_output, timestep, prev_timestep, sample)`` and the schedule's ``alphas_cumprod``: no
   ``step_index`` or other scheduler state, so any step can be replayed in any order (docs/methods.md#ddim-logprob
   Checks).
2. ``timestep``/``prev_timestep`` may be per-sample ``[B]`` tensors (ddpo's per-sample time shuffling).
3. Returns the Gaussian mean and std and the log-density of ``prev_sample`` (reduced by mean and by sum), and
   accepts a given ``prev_sample`` to score instead of drawing one.
4. Arithmetic in float32 whatever the latents' dtype; the sample is detached inside the density.
5. ``thresholding`` (dynamic thresholding, Imagen) is rejected: no SD-family config uses it.

With ``set_alpha_to_one=False`` (every SD config) ``final_alpha_cumprod = alphas_cumprod[0]``, which equals ddpo's
clamp ``t' ≥ 0``, so both references agree at the last step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from visalign.generators.base import gaussian_log_prob

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class DDIMStepOutput:
    """Result of :func:`ddim_step_with_logprob`.

    Attributes:
        prev_sample: ``x_{t'}`` ``[B, ...]`` in the latents' dtype (sampled, or the one given).
        mean: float32 ``[B, ...]``, the Gaussian mean ``mu``.
        std: float32 ``[B, 1, ...]``, ``η·sqrt(var_t)``.
        log_prob_mean: float32 ``[B]``, per-element log-density averaged over non-batch dims (NaN when std = 0).
        log_prob_sum: float32 ``[B]``, summed log-density (the true log-likelihood).
        pred_original_sample: float32 ``[B, ...]``, ``x0_hat``.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob_mean: Tensor
    log_prob_sum: Tensor
    pred_original_sample: Tensor


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """``[B]`` (or scalar) → ``[B, 1, 1, ...]`` so it broadcasts against ``ndim``-dim latents."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def ddim_step_with_logprob(model_output: Tensor, timestep: Tensor | int, prev_timestep: Tensor | int, sample: Tensor,
                           alphas_cumprod: Tensor, final_alpha_cumprod: Tensor | float, *, eta: float,
                           prediction_type: str = "epsilon", clip_sample_range: float | None = None,
                           prev_sample: Tensor | None = None, noise: Tensor | None = None) -> DDIMStepOutput:
    """One DDIM step ``x_t → x_{t'}`` and the log-prob of ``x_{t'}``.

    Args:
        model_output: the (guided) denoiser prediction ``[B, ...]`` (ε, v or x0 per ``prediction_type``).
        timestep: t, int or long ``[B]``.
        prev_timestep: t' (``t − T_train/N``); negative means "past the end" and uses ``final_alpha_cumprod``.
        sample: ``x_t`` ``[B, ...]``.
        alphas_cumprod: float ``[T_train]``, the scheduler's ``ᾱ``.
        final_alpha_cumprod: ``ᾱ`` used when ``prev_timestep < 0``.
        eta: DDIM η; 0 is deterministic (log-probs NaN), 1 the DDPM-like ancestral variance.
        prediction_type: "epsilon", "v_prediction" or "sample".
        clip_sample_range: clip ``x0_hat`` to ``[−r, r]`` when the scheduler's ``clip_sample`` is on; None = off.
        prev_sample: a given ``x_{t'}`` to score instead of sampling one (training-time recompute).
        noise: standard normal ``[B, ...]`` for sampling; required when ``eta > 0`` and ``prev_sample`` is None.

    Returns:
        :class:`DDIMStepOutput`.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}.")
    ndim = sample.ndim
    device = sample.device
    acp = alphas_cumprod.to(device=device, dtype=torch.float32)
    t = torch.as_tensor(timestep, device=device).long().reshape(-1)
    t_prev = torch.as_tensor(prev_timestep, device=device).long().reshape(-1)
    final = torch.as_tensor(final_alpha_cumprod, device=device, dtype=torch.float32)
    alpha_prod_t = _per_sample(acp[t.clamp(min=0)], ndim)
    alpha_prod_t_prev = _per_sample(torch.where(t_prev >= 0, acp[t_prev.clamp(min=0)], final), ndim)
    beta_prod_t = 1 - alpha_prod_t

    x_t = sample.float()
    out = model_output.float()
    # Copied from diffusers.schedulers.scheduling_ddim.DDIMScheduler.step (steps 3-4), float32 and per-sample t.
    if prediction_type == "epsilon":
        pred_original_sample = (x_t - beta_prod_t**0.5 * out) / alpha_prod_t**0.5
        pred_epsilon = out
    elif prediction_type == "sample":
        pred_original_sample = out
        pred_epsilon = (x_t - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
    else:
        pred_original_sample = alpha_prod_t**0.5 * x_t - beta_prod_t**0.5 * out
        pred_epsilon = alpha_prod_t**0.5 * out + beta_prod_t**0.5 * x_t
    if clip_sample_range is not None:
        pred_original_sample = pred_original_sample.clamp(-clip_sample_range, clip_sample_range)

    # Copied from diffusers.schedulers.scheduling_ddim.DDIMScheduler._get_variance
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = eta * variance.clamp(min=0) ** 0.5
    # diffusers keeps the unclipped ε for the direction (use_clipped_model_output=False); so do we.
    direction = (1 - alpha_prod_t_prev - std**2).clamp(min=0) ** 0.5 * pred_epsilon
    mean = alpha_prod_t_prev**0.5 * pred_original_sample + direction

    if prev_sample is None:
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step_with_logprob needs `noise` to sample when eta > 0.")
            prev_sample = (mean + std * noise.float()).to(sample.dtype)
        else:
            prev_sample = mean.to(sample.dtype)
    if eta > 0:
        log_prob_mean, log_prob_sum = gaussian_log_prob(prev_sample, mean, std)
    else:
        nan = torch.full((sample.shape[0],), float("nan"), device=device)
        log_prob_mean, log_prob_sum = nan, nan.clone()
    return DDIMStepOutput(prev_sample, mean, std, log_prob_mean, log_prob_sum, pred_original_sample)
