"""Reward-model losses over per-item rewards (docs/methods.md#rm-losses).

Every loss takes rewards of the two items of each pair, ``[N]`` float tensors, and returns a 0-d mean loss.
The first item is the one labelled better ("chosen") unless the pair is a tie.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bt_loss(chosen: Tensor, rejected: Tensor, *, margin: float | Tensor = 0.0, label_smoothing: float = 0.0) -> Tensor:
    """Bradley–Terry: ``−[(1−ε)·log σ(d) + ε·log σ(−d)]`` with ``d = r_w − r_l − m``.

    Args:
        chosen, rejected: rewards ``[N]``.
        margin: ``m``, a float or a per-pair ``[N]`` tensor (e.g. the oracle score gap).
        label_smoothing: ``ε`` in [0, 0.5).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}.")
    d = chosen - rejected - margin
    return -((1 - label_smoothing) * F.logsigmoid(d) + label_smoothing * F.logsigmoid(-d)).mean()


def rao_kupper_log_probs(a: Tensor, b: Tensor, kappa: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rao–Kupper outcome log-probabilities ``(log P(a ≻ b), log P(b ≻ a), log P(tie))``, each ``[N]``.

    ``P(a ≻ b) = σ(r_a − r_b − κ)``, ``P(b ≻ a) = σ(r_b − r_a − κ)``, ``P(tie) = 1 − both`` (κ ≥ 0; κ = 0 is plain
    BT with no mass on ties).
    """
    kappa = torch.as_tensor(kappa, dtype=a.dtype, device=a.device)
    if bool((kappa < 0).any()):
        raise ValueError(f"kappa must be >= 0; got {kappa.tolist()}.")
    d = a - b
    win, loss = F.logsigmoid(d - kappa), F.logsigmoid(-d - kappa)
    # 1 − σ(d−κ) − σ(−d−κ), clamped so that κ = 0 (tie mass 0) gives a finite, very negative log.
    tie = torch.log((1 - win.exp() - loss.exp()).clamp_min(1e-12))
    return win, loss, tie


def bt_ties_loss(a: Tensor, b: Tensor, tie: Tensor, *, kappa: float | Tensor = 0.5) -> Tensor:
    """Negative log-likelihood of Rao–Kupper BT with ties: ``−log P(a ≻ b)`` where ``tie`` is false, else
    ``−log P(tie)``.

    Args:
        a, b: rewards ``[N]``; where ``tie`` is false, ``a`` is the preferred item.
        tie: bool ``[N]``.
        kappa: ``κ = log θ ≥ 0``; a learnable 0-d tensor (kept ≥ 0 by the caller, e.g. softplus) works too.
    """
    win, _, log_tie = rao_kupper_log_probs(a, b, kappa)
    return -torch.where(tie.bool(), log_tie, win).mean()


def uncertainty_bt_loss(mu_chosen: Tensor, log_sigma_chosen: Tensor, mu_rejected: Tensor,
                        log_sigma_rejected: Tensor) -> Tensor:
    """BT for a Gaussian reward head ``r ~ N(μ, σ²)``: ``−log Φ((μ_w − μ_l) / √(σ_w² + σ_l²))``.

    A pair the head is unsure of (large σ) is penalised less for being wrong and rewarded less for being right, so
    σ grows on pairs whose labels look like noise; σ is what the uncertainty weighting reads
    (docs/methods.md#uncertainty). All inputs ``[N]``.
    """
    scale = torch.sqrt(torch.exp(2 * log_sigma_chosen) + torch.exp(2 * log_sigma_rejected))
    z = (mu_chosen - mu_rejected) / scale
    return -torch.special.log_ndtr(z).mean()


def yes_no_log_odds(log_probs: Tensor, yes_ids: list[int], no_ids: list[int]) -> Tensor:
    """``log P(yes) − log P(no)`` at the answer position, from log-softmax ``[N, V]``; ``[N]``."""
    return torch.logsumexp(log_probs[:, yes_ids], dim=-1) - torch.logsumexp(log_probs[:, no_ids], dim=-1)


def yes_no_ce_loss(log_probs: Tensor, answers_yes: Tensor, yes_ids: list[int], no_ids: list[int]) -> Tensor:
    """Next-token cross-entropy of the verdict: ``−log P(Yes)`` where ``answers_yes``, else ``−log P(No)``.

    ``P(Yes)`` sums the vocabulary mass of every "Yes" spelling, as the yes-token scorer reads it
    (visalign/scorers/vlm_yes.py). Args: ``log_probs`` log-softmax ``[N, V]``, ``answers_yes`` bool ``[N]``.
    """
    yes = torch.logsumexp(log_probs[:, yes_ids], dim=-1)
    no = torch.logsumexp(log_probs[:, no_ids], dim=-1)
    return -torch.where(answers_yes.bool(), yes, no).mean()


def pairwise_yes_no_ce_loss(log_probs_ab: Tensor, log_probs_ba: Tensor, a_better: Tensor, yes_ids: list[int],
                            no_ids: list[int]) -> Tensor:
    """Pairwise-vs-reference verdict CE on both image orders with the labels flipped.

    ``log_probs_ab``: answer log-softmax ``[N, V]`` for "is the first (a) better than the second (b)?";
    ``log_probs_ba`` the same with the images swapped; ``a_better`` bool ``[N]``. Training both orders is what
    keeps the position-swap bias of the judge small.
    """
    a_better = a_better.bool()
    return (yes_no_ce_loss(log_probs_ab, a_better, yes_ids, no_ids)
            + yes_no_ce_loss(log_probs_ba, ~a_better, yes_ids, no_ids)) / 2
