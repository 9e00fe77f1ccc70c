"""Training pairs for reward models: within-prompt pairs from oracle scores and cross-prompt pairs from single
good/bad labels (SoliReward); the refusal of pairs whose two sides are the same (docs/methods.md#reward-models)."""

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


def cross_prompt_pairs(good: Tensor, *, max_pairs: int | None = None, ties: int = 0, seed: int = 0
                       ) -> list[IndexPair]:
    """SoliReward pairing from single good/bad labels: every good item × every bad item, whatever their prompts,
    is a pair with the good item preferred; optionally some same-label pairs as ties.

    Args:
        good: bool ``[N]``, the single good/bad label of each item.
        max_pairs: keep a seeded uniform subsample of this many good × bad pairs (without replacement); None keeps
            all ``n_good · n_bad`` in order (good index major).
        ties: how many same-label pairs (good–good or bad–bad, drawn without replacement from all of them) to add as
            ties; capped at how many exist.
        seed: seeds both subsamples.

    Returns:
        The pairs, decided ones first.

    Raises:
        ValueError: no good or no bad item (no decided pair can be formed), or a negative count.
    """
    if (max_pairs is not None and max_pairs < 0) or ties < 0:
        raise ValueError(f"max_pairs and ties must be >= 0; got {max_pairs} and {ties}.")
    pos = torch.nonzero(good.bool()).flatten().tolist()
    neg = torch.nonzero(~good.bool()).flatten().tolist()
    if not pos or not neg:
        raise ValueError(f"cross_prompt_pairs needs good and bad items; got {len(pos)} good and {len(neg)} bad.")
    rng = np.random.default_rng(seed)
    total = len(pos) * len(neg)
    # Index k of the good-major product is (pos[k // n_bad], neg[k % n_bad]): no n_good × n_bad list is built.
    chosen = range(total) if max_pairs is None or max_pairs >= total else \
        np.sort(rng.choice(total, size=max_pairs, replace=False)).tolist()
    out = [IndexPair(pos[k // len(neg)], neg[k % len(neg)]) for k in chosen]
    same = [(i, j) for group in (pos, neg) for i, j in itertools.combinations(group, 2)]
    if ties and same:
        picks = rng.choice(len(same), size=min(ties, len(same)), replace=False)
        out += [IndexPair(*same[int(k)], tie=True) for k in np.sort(picks)]
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
