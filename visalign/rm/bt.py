"""Bradley–Terry preference loss with a margin and label smoothing (docs/methods.md#reward-models).

Reference: Bradley & Terry, Biometrika 1952; the margin and smoothing as in lian700/SoliReward
``solireward/trainer/loss.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bt_loss(chosen: Tensor, rejected: Tensor, *, margin: float | Tensor = 0.0, label_smoothing: float = 0.0) -> Tensor:
    """Bradley–Terry NLL: ``−[(1−ε)·log σ(d) + ε·log σ(−d)]`` with ``d = r_chosen − r_rejected − m``, mean over pairs.

    Args:
        chosen: float ``[N]``, rewards of the preferred items.
        rejected: float ``[N]``, rewards of the dispreferred items.
        margin: ``m`` ≥ 0, a float or a per-pair ``[N]`` tensor (e.g. the gap of the labels): the chosen item must
            win by at least ``m`` before the loss flattens.
        label_smoothing: ``ε`` in [0, 0.5): the share of label noise assumed.

    Returns:
        0-d float tensor ≥ 0; ``log 2`` when every pair has ``d = 0`` and ``ε = 0``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}.")
    d = chosen - rejected - torch.as_tensor(margin, dtype=chosen.dtype, device=chosen.device)
    return -((1 - label_smoothing) * F.logsigmoid(d) + label_smoothing * F.logsigmoid(-d)).mean()
