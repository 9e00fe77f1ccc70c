"""Train a yes-token VLM judge (the ``VlmYesScorer`` contract, visalign/scorers/vlm_yes.py) on preference pairs,
and save it as weights + a scorer card, so the trained RM is a registered scorer at once
(docs/methods.md#rm-losses).

The trainer differentiates exactly what the scorer reads: the rendered chat query and the answer-position
log-softmax of :meth:`VlmYesScorer.answer_log_probs`, so train-time and score-time inputs cannot drift apart.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from visalign.rm.losses import bt_loss, pairwise_yes_no_ce_loss, yes_no_ce_loss, yes_no_log_odds
from visalign.rm.pairs import IndexPair, check_distinct
from visalign.scorers.vlm_yes import VlmYesScorer


@dataclass
class YesTokenConfig:
    """How a yes-token RM is trained.

    Args:
        loss: ``yes-no`` (pointwise verdict CE: chosen → "Yes", rejected → "No"), ``bt`` (Bradley–Terry on the
            yes/no log-odds of the two sides) or ``pairwise-yes-no`` (a pairwise-mode card: "is the first better
            than the second?" asked in both orders with the labels flipped).
        steps: optimizer steps.
        pairs_per_step: pairs per step.
        lr: AdamW learning rate.
        margin: BT margin (``bt`` only).
        seed: seeds the pair order.
    """

    loss: str = "yes-no"
    steps: int = 100
    pairs_per_step: int = 16
    lr: float = 1e-4
    margin: float = 0.0
    seed: int = 0


def _pointwise_log_probs(scorer: VlmYesScorer, images: Tensor, prompts: list[str], index: list[int]) -> Tensor:
    questions = [scorer.template.format(prompt=prompts[i]) for i in index]
    return scorer.answer_log_probs([[images[i]] for i in index], questions)


def _pairwise_log_probs(scorer: VlmYesScorer, images: Tensor, prompts: list[str], first: list[int],
                        second: list[int]) -> Tensor:
    questions = [scorer.template.format(prompt=prompts[i], criteria=scorer.criteria.format(prompt=prompts[i]))
                 for i in first]
    return scorer.answer_log_probs([[images[i], images[j]] for i, j in zip(first, second, strict=True)], questions)


def _step_loss(scorer: VlmYesScorer, images: Tensor, prompts: list[str], batch: list[IndexPair],
               config: YesTokenConfig) -> Tensor:
    a = [p.a for p in batch]
    b = [p.b for p in batch]
    yes, no = scorer.yes_ids, scorer.no_ids
    if config.loss == "pairwise-yes-no":
        better = torch.ones(len(batch), dtype=torch.bool)
        return pairwise_yes_no_ce_loss(_pairwise_log_probs(scorer, images, prompts, a, b),
                                       _pairwise_log_probs(scorer, images, prompts, b, a), better, yes, no)
    logp = _pointwise_log_probs(scorer, images, prompts, a + b)
    if config.loss == "yes-no":
        answers = torch.tensor([True] * len(a) + [False] * len(b))
        return yes_no_ce_loss(logp, answers, yes, no)
    odds = yes_no_log_odds(logp, yes, no)
    return bt_loss(odds[: len(a)], odds[len(a):], margin=config.margin)


LOSSES: dict[str, str] = {"yes-no": "pointwise", "bt": "pointwise", "pairwise-yes-no": "pairwise"}


def train_yes_token_rm(scorer: VlmYesScorer, images: Tensor, prompts: list[str], pairs: list[IndexPair],
                       config: YesTokenConfig, *, progress: bool = True,
                       on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Fine-tune the scorer's VLM in place on ``pairs`` of ``images``.

    Args:
        scorer: a loaded-or-not ``VlmYesScorer``; its card's ``mode`` must match the loss (``LOSSES``).
        images: float in [0, 1] ``[N, 3, H, W]``.
        prompts: ``[N]`` prompt of each image.
        pairs: ``a`` is the chosen image of each pair; ties are refused (use the library ties loss for them).
        config: see :class:`YesTokenConfig`.

    Returns:
        The loss of every step.

    Raises:
        ValueError: an unknown loss, a loss that does not fit the card's mode, tie pairs, or no pairs.
        IdenticalPairError: pairs whose two images are pixel-identical (the rows are named).
    """
    if config.loss not in LOSSES:
        raise ValueError(f"Unknown yes-token RM loss {config.loss!r}; choose one of {sorted(LOSSES)}.")
    if LOSSES[config.loss] != scorer.mode:
        raise ValueError(f"Loss {config.loss!r} trains a {LOSSES[config.loss]} judge but scorer {scorer.id!r} has "
                         f"mode {scorer.mode!r}; pick a card of that mode or another loss.")
    if not pairs:
        raise ValueError("No training pairs.")
    ties = [k for k, p in enumerate(pairs) if p.tie]
    if ties:
        raise ValueError(f"{len(ties)} tie pair(s) (first rows {ties[:5]}): the yes-token losses need a winner; "
                         "drop ties or train a scalar head with bt_ties_loss.")
    check_distinct(images[[p.a for p in pairs]], images[[p.b for p in pairs]])
    scorer.ensure_loaded()
    model = scorer.model
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=0.0)
    rng = random.Random(config.seed)
    order: list[IndexPair] = []
    losses = []
    bar = tqdm(range(config.steps), desc=f"rm train ({config.loss})", disable=not progress)
    images = images.to(scorer.device)
    for step in bar:
        if len(order) < config.pairs_per_step:
            order += rng.sample(pairs, len(pairs))
        batch, order = order[: config.pairs_per_step], order[config.pairs_per_step:]
        with torch.enable_grad():
            loss = _step_loss(scorer, images, prompts, batch, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    model.requires_grad_(False)  # back to the scorer's contract: gradients are for pixels
    return losses


def save_yes_token_rm(scorer: VlmYesScorer, out_dir: str | Path, rm_id: str, *, metrics: dict[str, Any],
                      config: YesTokenConfig) -> Path:
    """Write the weights and processor to ``out_dir`` and the card to ``out_dir/cards/<rm_id>.yaml``.

    Put ``out_dir/cards`` on ``VISALIGN_CARD_PATH`` (or call ``add_card_dir``) and ``rm_id`` is a scorer id.

    Returns:
        The card's path.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scorer.model.save_pretrained(out, safe_serialization=True)
    scorer.processor.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({**metrics, "config": asdict(config)}, indent=1))
    card = scorer.card
    pairwise = scorer.mode == "pairwise"
    kind = "pairwise-vs-reference" if pairwise else card.kind
    needs = sorted(set(card.needs) | {"reference"}) if pairwise else list(card.needs)
    data = {
        "id": rm_id, "mechanism": card.mechanism, "modality": card.modality, "kind": kind, "needs": needs, "differentiable": card.differentiable, "range": list(card.raw_range),
        "normalize": card.normalize, "weights": {"local_dir": str(out)}, "params": card.params,
        "description": f"Yes-token reward model trained by 'visalign rm train' from {card.id!r} with the "
                       f"{config.loss!r} loss ({config.steps} steps); metrics in {out / 'metrics.json'}.",
    }
    (out / "cards").mkdir(exist_ok=True)
    path = out / "cards" / f"{rm_id}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
