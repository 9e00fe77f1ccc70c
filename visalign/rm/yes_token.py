"""Train a yes-token VLM judge (the ``VlmYesScorer`` contract, visalign/scorers/vlm_yes.py) on preference pairs,
and save it as weights + a scorer card, so the trained RM is a registered scorer at once
(docs/methods.md#reward-models).

The trainer differentiates exactly what the scorer reads: the rendered chat query and the answer-position
log-softmax of :meth:`VlmYesScorer.answer_log_probs`, so train-time and score-time inputs cannot drift apart.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from visalign.rm.losses import LOSSES, LossParams, PairRewards, RmLoss, check_ties, get_loss
from visalign.rm.pairs import IndexPair, check_distinct
from visalign.rm.verdict import pairwise_yes_no_ce_loss, yes_no_ce_loss, yes_no_log_odds
from visalign.scorers.vlm_answer import uncertainty_head_for
from visalign.scorers.vlm_yes import VlmYesScorer

MODE_OF_KIND = {"verdict": "pointwise", "scalar": "pointwise", "gaussian": "pointwise", "pairwise-verdict": "pairwise"}
UNCERTAINTY_FILE = "uncertainty_head.safetensors"


@dataclass
class YesTokenConfig:
    """How a yes-token RM is trained."""

    loss: str = field(default="yes-no", metadata={"help": "A name of visalign.rm.losses.LOSSES: yes-no, "
                                                          "pairwise-yes-no, bt, bt-ties, soli-ties, gaussian-bt "
                                                          "(adds an uncertainty head)."})
    steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    pairs_per_step: int = field(default=16, metadata={"help": "Pairs per step (each pair is 2 queries, 4 in "
                                                              "pairwise mode)."})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate, constant after a 10% linear warm-up."})
    seed: int = field(default=0, metadata={"help": "Seeds the pair order."})
    params: LossParams = field(default_factory=LossParams, metadata={"help": "Loss hyper-parameters."})

    def __post_init__(self) -> None:
        loss = get_loss(self.loss)
        if loss.kind not in MODE_OF_KIND:
            raise ValueError(f"Loss {self.loss!r} has kind {loss.kind!r}, which no yes-token VLM trains; use one of "
                             f"{sorted(name for name, row in LOSSES.items() if row.kind in MODE_OF_KIND)}.")
        if self.steps < 1 or self.pairs_per_step < 1 or self.lr <= 0:
            raise ValueError(f"steps ({self.steps}), pairs_per_step ({self.pairs_per_step}) and lr ({self.lr}) "
                             "must be positive.")


def _pointwise_log_probs(scorer: VlmYesScorer, images: Tensor, prompts: list[str], index: list[int],
                         with_hidden: bool = False) -> Any:
    questions = [scorer.template.format(prompt=prompts[i]) for i in index]
    return scorer.answer_log_probs([[images[i]] for i in index], questions, with_hidden=with_hidden)


def _pairwise_log_probs(scorer: VlmYesScorer, images: Tensor, prompts: list[str], first: list[int],
                        second: list[int]) -> Tensor:
    # The question of the first image's prompt, as VlmYesScorer._pairwise asks it (media first, reference second).
    questions = [scorer.template.format(prompt=prompts[i], criteria=scorer.criteria.format(prompt=prompts[i]))
                 for i in first]
    return scorer.answer_log_probs([[images[i], images[j]] for i, j in zip(first, second, strict=True)], questions)


def step_loss(scorer: VlmYesScorer, images: Tensor, prompts: list[str], batch: list[IndexPair], loss: RmLoss,
              params: LossParams) -> Tensor:
    """The loss of one batch of pairs, through the scorer's own answer-position log-softmax; 0-d tensor."""
    a = [p.a for p in batch]
    b = [p.b for p in batch]
    yes, no = scorer.yes_ids, scorer.no_ids
    if loss.kind == "pairwise-verdict":
        better = torch.ones(len(batch), dtype=torch.bool)
        return pairwise_yes_no_ce_loss(_pairwise_log_probs(scorer, images, prompts, a, b),
                                       _pairwise_log_probs(scorer, images, prompts, b, a), better, yes, no)
    tie = torch.tensor([p.tie for p in batch], dtype=torch.bool)
    assert loss.fn is not None or loss.kind == "verdict"  # scalar and gaussian rows carry their function
    if loss.kind == "gaussian":
        assert scorer.uncertainty_head is not None  # attached by train_yes_token_rm
        logp, hidden = _pointwise_log_probs(scorer, images, prompts, a + b, with_hidden=True)
        odds = yes_no_log_odds(logp, yes, no)
        log_sigma = scorer.uncertainty_head(hidden).squeeze(-1)
        n = len(a)
        return loss.fn(PairRewards(odds[:n], odds[n:], tie.to(odds.device), log_sigma[:n], log_sigma[n:]), params)
    logp = _pointwise_log_probs(scorer, images, prompts, a + b)
    if loss.kind == "verdict":
        answers = torch.tensor([True] * len(a) + [False] * len(b))
        return yes_no_ce_loss(logp, answers, yes, no)
    odds = yes_no_log_odds(logp, yes, no)
    return loss.fn(PairRewards(odds[: len(a)], odds[len(a):], tie.to(odds.device)), params)


def train_yes_token_rm(scorer: VlmYesScorer, images: Tensor, prompts: list[str], pairs: list[IndexPair],
                       config: YesTokenConfig, *, progress: bool = True,
                       on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Fine-tune the scorer's VLM in place on ``pairs`` of ``images`` (every weight trains).

    Args:
        scorer: a ``VlmYesScorer``; its card's ``mode`` must be the loss's (pairwise-yes-no: ``pairwise``, the
            others ``pointwise``).
        images: float in [0, 1] ``[N, 3, H, W]``, the items the pairs index.
        prompts: ``[N]`` prompt of each image (cross-prompt pairs ask each image about its own prompt).
        pairs: ``a`` is the preferred image unless ``tie``; ties only for losses that use them.
        config: see :class:`YesTokenConfig`.
        progress: show a tqdm bar with the running loss.
        on_step: called with (step, loss) after every step.

    Returns:
        The loss of every step.

    Raises:
        ValueError: a loss that does not fit the card's mode, tie pairs for a loss that needs winners, or no pairs.
        IdenticalPairError: pairs whose two images are pixel-identical (the rows are named).
    """
    loss = get_loss(config.loss)
    if MODE_OF_KIND[loss.kind] != scorer.mode:
        raise ValueError(f"Loss {config.loss!r} trains a {MODE_OF_KIND[loss.kind]} judge but scorer {scorer.id!r} "
                         f"has mode {scorer.mode!r}; pick a card of that mode (rm train --mode) or another loss.")
    if not pairs:
        raise ValueError("No training pairs.")
    check_ties(loss, [p.tie for p in pairs])
    decided = [p for p in pairs if not p.tie]
    if decided:
        check_distinct(images[[p.a for p in decided]], images[[p.b for p in decided]],
                       rows=[k for k, p in enumerate(pairs) if not p.tie])
    scorer.ensure_loaded()
    model = scorer.model
    modules = [model]
    if loss.kind == "gaussian":
        if scorer.uncertainty_head is None:  # σ = 1 everywhere at first: the loss starts as probit BT
            scorer.uncertainty_head = uncertainty_head_for(model).to(scorer.device)
        modules.append(scorer.uncertainty_head)
    for module in modules:
        module.requires_grad_(True)
        module.train()
    optimizer = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.steps // 10)  # a short warm-up keeps the first steps from wrecking a trained judge
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(config.seed)
    order: list[IndexPair] = []
    losses: list[float] = []
    images = images.to(scorer.device)
    bar = tqdm(range(config.steps), desc=f"rm train ({config.loss})", disable=not progress)
    try:
        for step in bar:
            if len(order) < config.pairs_per_step:
                order += rng.sample(pairs, len(pairs))
            batch, order = order[: config.pairs_per_step], order[config.pairs_per_step:]
            with torch.enable_grad():
                value = step_loss(scorer, images, prompts, batch, loss, config.params)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(value.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        for module in modules:
            module.eval()
            module.requires_grad_(False)  # back to the scorer's contract: gradients are for pixels, never the judge
    return losses


def save_yes_token_rm(scorer: VlmYesScorer, out_dir: str | Path, rm_id: str, *, metrics: dict[str, Any],
                      config: YesTokenConfig) -> Path:
    """Write ``out_dir/weights/`` (model + processor), ``out_dir/metrics.json`` and ``out_dir/card.yaml``.

    The card keeps the base card's mechanism and params (template, mode, answer words), so the trained RM is
    scored exactly as it was trained; ``get_scorer("<out_dir>/card.yaml")`` loads it. Its ``local_dir`` is
    absolute: move the folder and edit that line.

    Returns:
        The card's path.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", rm_id):
        raise ValueError(f"Scorer id {rm_id!r} must be lower-case letters, digits, '.' and '-' (e.g. shapes-rm).")
    out = Path(out_dir).resolve()
    weights = out / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    scorer.model.save_pretrained(weights, safe_serialization=True)
    scorer.processor.save_pretrained(weights)
    params = {**scorer.card.params, "mode": scorer.mode}
    if get_loss(config.loss).kind in ("scalar", "gaussian"):
        # These losses train log P(yes) − log P(no): the renormalised score is its sigmoid, so the card scores
        # exactly what was trained.
        params["score"] = "p_yes_renorm"
    if scorer.uncertainty_head is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in scorer.uncertainty_head.state_dict().items()},
                  str(weights / UNCERTAINTY_FILE))
        params["uncertainty_head"] = UNCERTAINTY_FILE
    (out / "metrics.json").write_text(json.dumps({**metrics, "config": asdict(config)}, indent=1))
    card = scorer.card
    pairwise = scorer.mode == "pairwise"
    data = {
        "id": rm_id, "mechanism": card.mechanism,
        "description": f"Yes-token reward model trained by 'visalign rm train' from {card.id!r} with the "
                       f"{config.loss!r} loss ({config.steps} steps); metrics in {out / 'metrics.json'}.",
        "modality": card.modality, "kind": "pairwise-vs-reference" if pairwise else card.kind,
        "needs": sorted(set(card.needs) | {"reference"}) if pairwise else list(card.needs),
        "differentiable": card.differentiable, "range": list(card.raw_range), "normalize": card.normalize,
        "weights": {"local_dir": str(weights)}, "params": params,
    }
    path = out / "card.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
