"""``visalign rm train`` as a library call: read a table, build the judge, train it, save weights + a card
(docs/methods.md#reward-models).

:class:`RmTrainConfig` is the single description of every option: the CLI flags and the YAML config keys are its
fields, and their help strings are the field metadata.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from visalign.rm.data import read_rm_table
from visalign.rm.losses import LossParams
from visalign.rm.yes_token import YesTokenConfig, save_yes_token_rm, train_yes_token_rm


@dataclass
class RmTrainConfig:
    """Everything ``visalign rm train`` can change."""

    data: str = field(default="", metadata={"help": "A .jsonl/.csv table: pairs (prompt, chosen, rejected[, tie]) "
                                                    "or pointwise labels (prompt, image, label); image paths are "
                                                    "relative to the table."})
    out: str = field(default="runs/rm", metadata={"help": "Output folder: weights/, card.yaml, metrics.json."})
    id: str = field(default="my-rm", metadata={"help": "Scorer id written into the card (lower-case, hyphens)."})
    base: str = field(default="shapes-vlm", metadata={"help": "Yes-token VLM card (id or card.yaml path) to start "
                                                              "from."})
    loss: str = field(default="yes-no", metadata={"help": "yes-no | pairwise-yes-no | bt | bt-ties | soli-ties."})
    mode: str = field(default="", metadata={"help": "pointwise | pairwise: override the base card's mode "
                                                    "(pairwise-yes-no needs pairwise); empty keeps it."})
    steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    pairs_per_step: int = field(default=16, metadata={"help": "Pairs per step."})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate (10% linear warm-up)."})
    margin: float = field(default=0.0, metadata={"help": "BT margin on the yes/no log-odds (bt, soli-ties)."})
    kappa: float = field(default=1.0, metadata={"help": "Rao-Kupper tie threshold, log-odds units (bt-ties)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "BT label smoothing in [0, 0.5) (bt)."})
    max_pairs: int = field(default=4000, metadata={"help": "Pointwise tables: cap on good x bad pairs."})
    ties: int = field(default=0, metadata={"help": "Pointwise tables: same-label pairs added as ties."})
    resolution: int = field(default=0, metadata={"help": "Resize images to this square side in px (0: keep)."})
    seed: int = field(default=0, metadata={"help": "Seeds the pair order, subsamples and torch."})
    device: str = field(default="cpu", metadata={"help": "Device of the judge, e.g. cpu or cuda."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("rm train needs data: a pairs or pointwise table (--data FILE or data: in the config).")
        if self.mode not in ("", "pointwise", "pairwise"):
            raise ValueError(f"mode {self.mode!r} must be pointwise, pairwise or empty.")

    @property
    def trainer(self) -> YesTokenConfig:
        return YesTokenConfig(loss=self.loss, steps=self.steps, pairs_per_step=self.pairs_per_step, lr=self.lr,
                              seed=self.seed, params=LossParams(margin=self.margin, kappa=self.kappa,
                                                                label_smoothing=self.label_smoothing))


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> RmTrainConfig:
    """A YAML config (keys = field names, ``-`` or ``_``) with ``overrides`` on top; unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(RmTrainConfig)}
    values: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: an rm train config must be a YAML mapping of option names.")
        values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}.")
    return RmTrainConfig(**{**values, **overrides})


def build_judge(base: str, mode: str, device: str) -> Any:
    """The base ``VlmYesScorer``, with its card switched to ``mode`` when given."""
    from visalign.scorers import get_scorer
    from visalign.scorers.card import ScorerCard
    from visalign.scorers.vlm_yes import DEFAULT_PAIRWISE_TEMPLATE, VlmYesScorer

    scorer = get_scorer(base, device=device)
    if not isinstance(scorer, VlmYesScorer):
        raise ValueError(f"base {base!r} is a {type(scorer).__name__}; rm train fine-tunes yes-token VLM judges "
                         "(mechanism visalign.scorers.vlm_yes:VlmYesScorer).")
    if not mode or mode == scorer.mode:
        return scorer
    card: ScorerCard = scorer.card
    if mode == "pairwise":
        card = card.with_overrides(params={"mode": "pairwise", "template": DEFAULT_PAIRWISE_TEMPLATE},
                                   kind="pairwise-vs-reference", needs=tuple(sorted(set(card.needs) | {"reference"})))
    else:
        card = card.with_overrides(params={"mode": "pointwise"}, kind="pointwise",
                                   needs=tuple(n for n in card.needs if n != "reference"))
    return VlmYesScorer(card, device=device)


def train_rm(config: RmTrainConfig, log: Any = print) -> Path:
    """Read ``config.data``, fine-tune ``config.base`` with ``config.loss``, save; returns the card's path."""
    torch.manual_seed(config.seed)
    data = read_rm_table(config.data, resolution=config.resolution or None, max_pairs=config.max_pairs,
                         ties=config.ties, seed=config.seed)
    log(f"rm train: {data.summary()} from {config.data}")
    scorer = build_judge(config.base, config.mode, config.device)
    trainer = config.trainer
    start = time.perf_counter()
    losses = train_yes_token_rm(scorer, data.images, data.prompts, data.pairs, trainer, progress=config.progress)
    metrics = {"base": config.base, "data": str(config.data), "layout": data.layout, "pairs": len(data.pairs),
               "ties": sum(p.tie for p in data.pairs), "loss_first": losses[0], "loss_last": losses[-1],
               "train_seconds": time.perf_counter() - start, "run": dataclasses.asdict(config)}
    card = save_yes_token_rm(scorer, config.out, config.id, metrics=metrics, config=trainer)
    log(f"rm train: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; wrote {card}\n"
        f"  score with it:  visalign rm eval --scorer {card} --data HELDOUT.jsonl   or   get_scorer({str(card)!r})")
    return card
