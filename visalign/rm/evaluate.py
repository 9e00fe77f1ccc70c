"""Score preference pairs with any scorer and summarise how well it ranks them (``visalign rm eval``;
docs/methods.md#reward-models, "Checks").

A pointwise scorer scores every image once; its *gap* on a pair is ``s(a) − s(b)``, with probability scores
(``normalize.kind: prob``) taken as logits first, so ``σ(gap)`` is a Bradley–Terry win probability for ECE. A
pairwise-vs-reference judge is asked both orders: ``p_ab = P(first better | a, b)`` and ``p_ba`` likewise; its gap is
``logit(½(p_ab + 1 − p_ba))`` and the two orders give the position-swap bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from visalign.rm.metrics import (
    agreement,
    expected_calibration_error,
    pairwise_accuracy,
    position_swap_bias,
    tie_accuracy,
)
from visalign.rm.pairs import IndexPair
from visalign.rm.ties import rao_kupper_log_probs
from visalign.scorers.base import ScoreBatch, Scorer

_EPS = 1e-6  # keeps logit() of probability scores finite


@dataclass
class PairScores:
    """A scorer's verdicts on N pairs: ``gap`` float ``[N]`` (> 0: prefers ``a``); ``p_ab``/``p_ba`` float ``[N]``
    in [0, 1] for pairwise judges, else None."""

    gap: Tensor
    p_ab: Tensor | None = None
    p_ba: Tensor | None = None


def is_pairwise(scorer: Scorer) -> bool:
    """Whether ``scorer`` compares against a reference (``kind: pairwise-vs-reference``)."""
    return scorer.card.kind == "pairwise-vs-reference"


def _raw(scorer: Scorer, prompts: list[str], media: Tensor, references: Tensor | None = None) -> Tensor:
    with torch.no_grad():
        return scorer(ScoreBatch(prompts=prompts, media=media, references=references)).raw.float().cpu()


def score_pairs(scorer: Scorer, prompts: list[str], images: Tensor, pairs: list[IndexPair], *,
                batch_size: int = 32) -> PairScores:
    """Score both sides of every pair.

    Args:
        scorer: any image scorer; pairwise-vs-reference judges are asked both orders.
        prompts: ``[N_items]`` prompt of each image (a pair is scored with the prompt of its ``a`` side).
        images: float in [0, 1] ``[N_items, 3, H, W]``.
        pairs: the pairs, indices into ``images``.
        batch_size: images (or pairs) per scorer call.
    """
    a_idx = [p.a for p in pairs]
    b_idx = [p.b for p in pairs]
    if is_pairwise(scorer):
        ab, ba = [], []
        for s in range(0, len(pairs), batch_size):
            ia, ib = a_idx[s:s + batch_size], b_idx[s:s + batch_size]
            pr = [prompts[i] for i in ia]
            ab.append(_raw(scorer, pr, images[ia], images[ib]))
            ba.append(_raw(scorer, pr, images[ib], images[ia]))
        p_ab, p_ba = torch.cat(ab), torch.cat(ba)
        return PairScores(torch.logit(((p_ab + 1 - p_ba) / 2).clamp(_EPS, 1 - _EPS)), p_ab, p_ba)
    used = sorted(set(a_idx) | set(b_idx))  # score each image once, however many pairs it is in
    values = torch.full((len(images),), float("nan"))
    for s in range(0, len(used), batch_size):
        chunk = used[s:s + batch_size]
        values[chunk] = _raw(scorer, [prompts[i] for i in chunk], images[chunk])
    if scorer.card.normalize.get("kind") == "prob":
        values = torch.logit(values.clamp(_EPS, 1 - _EPS))
    return PairScores(values[a_idx] - values[b_idx])


def pair_metrics(scores: PairScores, tie: Tensor, *, tie_eps: float | None = None, bins: int = 10
                 ) -> dict[str, float]:
    """Accuracy, calibration, ties and position bias of one scorer's verdicts.

    Args:
        scores: from :func:`score_pairs`.
        tie: bool ``[N]``, which pairs are labelled ties.
        tie_eps: a pair is predicted a tie when ``|gap| ≤ tie_eps``; None skips the tie metrics.
        bins: ECE bins.

    Returns:
        ``pairs``, ``ties`` (counts), ``accuracy`` (non-tie pairs, exact score ties count ½), ``ece`` of ``σ(gap)``
        over both orders of the non-tie pairs, ``predicted_tie_rate`` and ``tie_accuracy`` (three-way) with
        ``tie_eps``, and ``swap_bias`` / ``swap_consistency`` for pairwise judges.
    """
    tie = tie.bool()
    gap = scores.gap
    decided = gap[~tie]
    out: dict[str, float] = {"pairs": float(len(gap)), "ties": float(tie.sum())}
    if len(decided):
        out["accuracy"] = pairwise_accuracy(decided, torch.zeros_like(decided))
        # Both orders: a calibrated σ(gap) must be right about "a wins" and "b wins" alike.
        out["ece"] = expected_calibration_error(torch.sigmoid(torch.cat([decided, -decided])),
                                                torch.cat([torch.ones_like(decided), torch.zeros_like(decided)]),
                                                bins=bins)
    if tie_eps is not None:
        out["tie_eps"] = float(tie_eps)
        out["predicted_tie_rate"] = float((gap.abs() <= tie_eps).float().mean())
        out["tie_accuracy"] = tie_accuracy(gap, torch.zeros_like(gap), tie, eps=tie_eps)
    if scores.p_ab is not None and scores.p_ba is not None:
        swap = position_swap_bias(scores.p_ab, scores.p_ba)
        out["swap_bias"], out["swap_consistency"] = swap["bias"], swap["consistency"]
    return out


def best_tie_eps(gap: Tensor, tie: Tensor) -> float:
    """The ``tie_eps`` that maximises three-way accuracy on these pairs (fit on training pairs, report held-out).

    Candidates are 0 and every ``|gap|``; ties between candidates go to the smallest.
    """
    candidates = torch.cat([torch.zeros(1), gap.abs().sort().values])
    scores = torch.tensor([tie_accuracy(gap, torch.zeros_like(gap), tie, eps=float(e)) for e in candidates])
    return float(candidates[int(scores.argmax())])


def rao_kupper_nll(gap: Tensor, tie: Tensor, kappa: float) -> float:
    """Mean Rao–Kupper NLL of the observed outcomes (``a`` wins, or a tie) given score gaps ``[N]`` and ``κ``."""
    win, _, log_tie = rao_kupper_log_probs(gap, torch.zeros_like(gap), kappa)
    return float(-torch.where(tie.bool(), log_tie, win).mean())


def fit_kappa(gap: Tensor, tie: Tensor, grid: Tensor | None = None) -> float:
    """The ``κ`` of a grid (default 0.05…10) that minimises :func:`rao_kupper_nll` on these pairs.

    Fitting κ after training gives any scorer, including a plain-BT one, the best tie band its gaps allow, so
    held-out NLL compares the reward geometry each objective learned, not whether it trained a κ.
    """
    grid = grid if grid is not None else torch.linspace(0.05, 10.0, 200)
    values = [rao_kupper_nll(gap, tie, float(k)) for k in grid]
    return float(grid[int(torch.tensor(values).argmin())])


def compare(first: PairScores, second: PairScores) -> dict[str, Any]:
    """Agreement of two scorers on the same pairs (see :func:`visalign.rm.metrics.agreement`)."""
    return agreement(first.gap, second.gap)
