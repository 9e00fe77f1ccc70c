"""Training pairs for reward models: within-prompt pairs from oracle scores and cross-prompt pairs from single
good/bad labels (SoliReward); the refusal of pairs whose two sides are the same (docs/methods.md#rm-losses)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_NAMED = 5  # offending rows named in a refusal


@dataclass(frozen=True)
class IndexPair:
    """Items ``a`` and ``b`` (indices into the item list); ``a`` is better unless ``tie``."""

    a: int
    b: int
    tie: bool = False
    margin: float = 0.0  # |score_a − score_b| of the labels, for a BT margin


class IdenticalPairError(ValueError):
    """Pairs whose chosen and rejected sides are the same item or pixel-identical; the message names the rows."""


def pairs_from_scores(prompts: list[str], scores: Tensor, *, tie_eps: float = 0.0, keep_ties: bool = True
                      ) -> list[IndexPair]:
    """Every within-prompt pair of items, ordered by their (oracle) scores.

    Args:
        prompts: ``[N]`` prompt of each item; only items of the same prompt are paired.
        scores: float ``[N]``.
        tie_eps: pairs with ``|Δscore| ≤ tie_eps`` are ties.
        keep_ties: False drops ties (plain BT data).
    """
    values = scores.detach().float().cpu().tolist()
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    out = []
    for members in groups.values():
        for i, j in itertools.combinations(members, 2):
            gap = values[i] - values[j]
            if abs(gap) <= tie_eps:
                if keep_ties:
                    out.append(IndexPair(i, j, tie=True))
                continue
            out.append(IndexPair(i, j, margin=gap) if gap > 0 else IndexPair(j, i, margin=-gap))
    return out


def cross_prompt_pairs(good: Tensor, *, num_pairs: int, tie_share: float = 0.25, seed: int = 0) -> list[IndexPair]:
    """SoliReward pairing: any good item with any bad item, whatever their prompts, is a BT pair; two items with
    the same label are a tie.

    Args:
        good: bool ``[N]``, the single good/bad label of each item.
        num_pairs: pairs to draw (with replacement).
        tie_share: share of the pairs that are same-label ties, in [0, 1].
        seed: the draw's seed.

    Raises:
        ValueError: no good or no bad item (no BT pair can be formed), or ``tie_share`` outside [0, 1].
    """
    if not 0.0 <= tie_share <= 1.0:
        raise ValueError(f"tie_share must be in [0, 1]; got {tie_share}.")
    pos = torch.nonzero(good.bool()).flatten().tolist()
    neg = torch.nonzero(~good.bool()).flatten().tolist()
    if not pos or not neg:
        raise ValueError(f"cross_prompt_pairs needs good and bad items; got {len(pos)} good and {len(neg)} bad.")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_pairs):
        if rng.random() < tie_share:
            same = pos if (len(pos) > 1 and (len(neg) < 2 or rng.random() < 0.5)) else neg
            if len(same) < 2:
                continue
            i, j = rng.choice(same, size=2, replace=False).tolist()
            out.append(IndexPair(int(i), int(j), tie=True))
        else:
            out.append(IndexPair(int(rng.choice(pos)), int(rng.choice(neg))))
    return out


def check_distinct(chosen: Tensor, rejected: Tensor, rows: list[int] | None = None) -> None:
    """Refuse pairs whose two sides are pixel-identical: no preference can be learnt from them.

    Args:
        chosen, rejected: ``[N, ...]`` items of each pair.
        rows: the source row of each pair, for the message (default 0..N−1).

    Raises:
        IdenticalPairError: naming up to 5 offending rows and how many there are.
    """
    same = (chosen.reshape(len(chosen), -1) == rejected.reshape(len(rejected), -1)).all(dim=1)
    bad = torch.nonzero(same).flatten().tolist()
    if not bad:
        return
    named = [rows[i] if rows is not None else i for i in bad[:_NAMED]]
    more = f" and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
    raise IdenticalPairError(f"{len(bad)} pair(s) have identical chosen and rejected sides: rows {named}{more}. "
                             "Drop them or relabel them as ties (bt-ties).")
