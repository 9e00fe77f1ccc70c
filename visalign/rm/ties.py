"""Preference losses that give ties their own likelihood: Rao–Kupper BT with ties and SoliReward's wide ties
(docs/methods.md#reward-models).

References: Rao & Kupper, JASA 1967 (the tie threshold θ = e^κ, written in logit form with π = e^r); HPSv3 and
VideoAlign train their BT-with-ties heads with the same form. SoliReward (arXiv 2512.22170; lian700/SoliReward
``solireward/trainer/loss.py``) instead pulls the two sides of a tie together with two BT terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rao_kupper_log_probs(a: Tensor, b: Tensor, kappa: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Outcome log-probabilities of Rao–Kupper BT: ``(log P(a ≻ b), log P(b ≻ a), log P(tie))``, each ``[N]``.

    ``P(a ≻ b) = σ(r_a − r_b − κ)``, ``P(b ≻ a) = σ(r_b − r_a − κ)``, ``P(tie) = 1 − P(a ≻ b) − P(b ≻ a)``; the three
    sum to 1 and ``P(tie)`` is largest at ``r_a = r_b``. ``κ = 0`` is plain BT with no mass on ties.

    Args:
        a: float ``[N]``, rewards of the first items.
        b: float ``[N]``, rewards of the second items.
        kappa: ``κ = log θ ≥ 0``, a float or a 0-d tensor (learnable: keep it ≥ 0 with a softplus).
    """
    kappa = torch.as_tensor(kappa, dtype=a.dtype, device=a.device)
    if bool((kappa < 0).any()):
        raise ValueError(f"kappa must be >= 0; got {kappa.tolist()}.")
    d = a - b
    win, loss = F.logsigmoid(d - kappa), F.logsigmoid(-d - kappa)
    # P(tie) = σ(κ−d) − σ(−d−κ) = 1 − σ(d−κ) − σ(−d−κ); the clamp keeps κ = 0 (P(tie) = 0) finite.
    tie = torch.log((1 - win.exp() - loss.exp()).clamp_min(1e-12))
    return win, loss, tie


def bt_ties_loss(a: Tensor, b: Tensor, tie: Tensor, *, kappa: float | Tensor = 1.0) -> Tensor:
    """Rao–Kupper NLL of the observed outcome: ``−log P(a ≻ b)`` for a decided pair, ``−log P(tie)`` for a tie.

    Args:
        a: float ``[N]``, rewards of the first items; where ``tie`` is false, ``a`` is the preferred item.
        b: float ``[N]``, rewards of the second items.
        tie: bool ``[N]``, which pairs are ties.
        kappa: ``κ ≥ 0`` (see :func:`rao_kupper_log_probs`).

    Returns:
        0-d float tensor ≥ 0, the mean NLL.
    """
    win, _, log_tie = rao_kupper_log_probs(a, b, kappa)
    return -torch.where(tie.bool(), log_tie, win).mean()


def soli_ties_loss(a: Tensor, b: Tensor, tie: Tensor, *, margin: float = 0.0) -> Tensor:
    """SoliReward's wide ties: ``−log σ(d − m)`` for a decided pair and ``−log σ(d − m) − log σ(−d − m)`` for a
    tie, with ``d = r_a − r_b``; the tie term is smallest at ``r_a = r_b`` and pulls the two sides together.

    Args:
        a, b: float ``[N]``, rewards; where ``tie`` is false, ``a`` is the preferred item.
        tie: bool ``[N]``.
        margin: ``m`` ≥ 0.

    Returns:
        0-d float tensor ≥ 0, the mean over pairs.
    """
    d = a - b
    decided = -F.logsigmoid(d - margin)
    tied = -F.logsigmoid(d - margin) - F.logsigmoid(-d - margin)
    return torch.where(tie.bool(), tied, decided).mean()
