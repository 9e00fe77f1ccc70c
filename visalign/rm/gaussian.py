"""The uncertainty head's preference loss: Bradley–Terry (probit form) on Gaussian rewards ``r ~ N(μ, σ²)``
(docs/methods.md#reward-models).

With independent Gaussian rewards, ``P(a ≻ b) = P(r_a − r_b > 0) = Φ((μ_a − μ_b) / √(σ_a² + σ_b²))``: a head that
is unsure of a pair (large σ) is punished less for ranking it wrongly and rewarded less for ranking it rightly, so
σ grows where labels look like noise and shrinks where the ranking is learnable. σ is what the uncertainty
weighting reads (docs/methods.md#uncertainty). This is the probabilistic-RM form of e.g. Lou et al.,
"Uncertainty-aware Reward Model" (arXiv 2410.00847); the log-σ regulariser keeps σ from growing without bound on
pairs that are merely hard.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gaussian_bt_loss(mu_a: Tensor, log_sigma_a: Tensor, mu_b: Tensor, log_sigma_b: Tensor, *,
                     margin: float = 0.0, sigma_weight: float = 0.0) -> Tensor:
    """``−log Φ((μ_a − μ_b − m) / √(σ_a² + σ_b²)) + λ·(log σ_a + log σ_b)/2``, mean over pairs; ``a`` is preferred.

    Args:
        mu_a, mu_b: float ``[N]``, mean rewards of the preferred and dispreferred items.
        log_sigma_a, log_sigma_b: float ``[N]``, log standard deviations of the two rewards.
        margin: ``m`` ≥ 0 on the mean gap.
        sigma_weight: ``λ`` ≥ 0, the pull of log σ towards 0 (σ → 1).

    Returns:
        0-d float tensor; with ``λ = 0`` it is ≥ 0 and equals ``log 2`` at ``μ_a = μ_b``.
    """
    scale = torch.sqrt(torch.exp(2 * log_sigma_a) + torch.exp(2 * log_sigma_b))
    z = (mu_a - mu_b - margin) / scale
    return (-torch.special.log_ndtr(z) + sigma_weight * (log_sigma_a + log_sigma_b) / 2).mean()


def gaussian_win_probability(mu_a: Tensor, log_sigma_a: Tensor, mu_b: Tensor, log_sigma_b: Tensor) -> Tensor:
    """``P(a ≻ b) = Φ((μ_a − μ_b) / √(σ_a² + σ_b²))``, float ``[N]`` in (0, 1), for ECE and eval."""
    scale = torch.sqrt(torch.exp(2 * log_sigma_a) + torch.exp(2 * log_sigma_b))
    return torch.special.ndtr((mu_a - mu_b) / scale)
