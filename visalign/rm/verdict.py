"""Yes/no next-token losses for VLM judges, on exactly the answer-position tokens the yes-token scorer reads
(visalign/scorers/vlm_yes.py; docs/methods.md#reward-models).

``P(Yes)`` is the vocabulary mass of every single-token spelling of "Yes" (``VlmYesScorer.yes_ids``) at the answer
position, so lowering this loss raises the scorer's reward on positives by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor


def yes_no_log_odds(log_probs: Tensor, yes_ids: list[int], no_ids: list[int]) -> Tensor:
    """``log P(yes) − log P(no)`` at the answer position: float ``[N]`` from log-softmax ``[N, V]``.

    This is the logit of the scorer's renormalised score ``P(yes)/(P(yes)+P(no))``, the scalar reward the
    pairwise losses (bt, bt-ties, ...) train when they fine-tune a VLM.
    """
    return torch.logsumexp(log_probs[:, yes_ids], dim=-1) - torch.logsumexp(log_probs[:, no_ids], dim=-1)


def yes_no_ce_loss(log_probs: Tensor, answers_yes: Tensor, yes_ids: list[int], no_ids: list[int]) -> Tensor:
    """Verdict cross-entropy: ``−log P(Yes)`` where the answer is yes, else ``−log P(No)``; mean over queries.

    Args:
        log_probs: float ``[N, V]``, log-softmax at the answer position (``VlmYesScorer.answer_log_probs``).
        answers_yes: bool ``[N]``, the target verdicts.
        yes_ids, no_ids: the token ids of every "Yes" / "No" spelling.

    Returns:
        0-d float tensor ≥ 0.
    """
    yes = torch.logsumexp(log_probs[:, yes_ids], dim=-1)
    no = torch.logsumexp(log_probs[:, no_ids], dim=-1)
    return -torch.where(answers_yes.bool(), yes, no).mean()


def pairwise_yes_no_ce_loss(log_probs_ab: Tensor, log_probs_ba: Tensor, a_better: Tensor, yes_ids: list[int],
                            no_ids: list[int]) -> Tensor:
    """Pairwise-vs-reference verdict CE on both image orders with the labels flipped.

    Args:
        log_probs_ab: float ``[N, V]``, answer log-softmax of "is the first image (a) better than the second (b)?".
        log_probs_ba: the same with the images swapped.
        a_better: bool ``[N]``.

    Returns:
        0-d float tensor ≥ 0. Training both orders keeps the judge's position-swap bias small.
    """
    a_better = a_better.bool()
    return (yes_no_ce_loss(log_probs_ab, a_better, yes_ids, no_ids)
            + yes_no_ce_loss(log_probs_ba, ~a_better, yes_ids, no_ids)) / 2
