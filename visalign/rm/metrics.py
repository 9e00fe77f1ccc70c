"""Reward-model evaluation metrics over pairs (docs/methods.md#reward-models, "Checks").

Inputs are per-pair scores of the two sides, ``[N]`` float tensors, with side ``a`` labelled better unless
``tie``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pairwise_accuracy(a: Tensor, b: Tensor, tie: Tensor | None = None) -> float:
    """Share of non-tie pairs with ``score_a > score_b`` (an exact score tie counts half)."""
    keep = ~tie.bool() if tie is not None else torch.ones_like(a, dtype=torch.bool)
    if not bool(keep.any()):
        raise ValueError("pairwise_accuracy needs at least one non-tie pair.")
    d = (a - b)[keep]
    return float(((d > 0).float() + 0.5 * (d == 0).float()).mean())


def tie_accuracy(a: Tensor, b: Tensor, tie: Tensor, *, eps: float) -> float:
    """Three-way accuracy in [0, 1]: a pair is predicted a tie when ``|score_a − score_b| ≤ eps``, else ``a`` wins
    when ``score_a > score_b``; right when that matches ``tie`` (``a`` is the labelled winner of non-ties)."""
    d = a - b
    predicted_tie = d.abs() <= eps
    right = torch.where(tie.bool(), predicted_tie, ~predicted_tie & (d > 0))
    return float(right.float().mean())


def expected_calibration_error(p_a_better: Tensor, a_better: Tensor, *, bins: int = 10) -> float:
    """ECE of predicted probabilities against outcomes: ``Σ_bins (n_bin/N)·|mean p − mean outcome|``.

    Args:
        p_a_better: ``[N]`` in [0, 1], e.g. ``σ(r_a − r_b)``.
        a_better: bool ``[N]``, the observed outcome (for a symmetric check, feed both orders).
    """
    p, y = p_a_better.float().flatten(), a_better.float().flatten()
    index = (p * bins).long().clamp(max=bins - 1)
    total = torch.zeros((), dtype=torch.float64)
    for k in range(bins):
        inside = index == k
        if inside.any():
            total += inside.float().mean().double() * (p[inside].mean() - y[inside].mean()).abs().double()
    return float(total)


def position_swap_bias(p_ab: Tensor, p_ba: Tensor) -> dict[str, float]:
    """Position bias of a pairwise judge from ``P(first better)`` asked in both orders, each ``[N]`` in [0, 1].

    A judge without position bias has ``p_ab + p_ba = 1``. Returns ``bias`` = mean(p_ab + p_ba − 1) in [−1, 1]
    (> 0: prefers whichever image comes first) and ``consistency``: the share of pairs whose verdict flips with the
    order, as it must (``p_ab > ½`` exactly when ``p_ba < ½``).
    """
    bias = float((p_ab + p_ba - 1).mean())
    consistent = float(((p_ab > 0.5) != (p_ba > 0.5)).float().mean())
    return {"bias": bias, "consistency": consistent}


def agreement(first: Tensor, second: Tensor) -> dict[str, float]:
    """How two scorers agree on the same pairs: ``first``/``second`` are ``score_a − score_b`` ``[N]`` of each.

    Returns ``sign`` (share of pairs ordered the same way) and ``pearson`` of the score gaps.
    """
    sign = float((torch.sign(first) == torch.sign(second)).float().mean())
    x, y = first.double() - first.double().mean(), second.double() - second.double().mean()
    denom = float(x.norm() * y.norm())
    return {"sign": sign, "pearson": float((x * y).sum()) / denom if denom > 0 else float("nan")}
