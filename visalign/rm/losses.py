"""The reward-model loss table: every loss name ``visalign rm train --loss`` accepts, what it trains and how it
treats ties (docs/methods.md#reward-models). One file per loss family: bt.py, ties.py, gaussian.py, verdict.py.

A *scalar* loss takes the rewards of the two sides of each pair (for a VLM judge, the yes/no log-odds of each
side), a *gaussian* loss also their log σ (the uncertainty head), a *verdict* loss the answer-position
log-softmax of a pointwise judge and a *pairwise-verdict* loss that of a pairwise-vs-reference judge.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from visalign.rm.bt import bt_loss
from visalign.rm.gaussian import gaussian_bt_loss
from visalign.rm.ties import bt_ties_loss, soli_ties_loss

KINDS = ("scalar", "gaussian", "verdict", "pairwise-verdict")
TIE_HANDLING = ("refuse", "use")


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the losses; each loss reads the ones it names in its help."""

    margin: float = field(default=0.0, metadata={"help": "BT margin m >= 0 (reward units; bt, soli-ties, "
                                                         "gaussian-bt)."})
    kappa: float = field(default=1.0, metadata={"help": "Rao-Kupper tie threshold kappa = log theta >= 0 "
                                                        "(bt-ties)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "BT label smoothing in [0, 0.5) (bt)."})
    sigma_weight: float = field(default=0.01, metadata={"help": "Pull of log sigma towards 0 (gaussian-bt)."})

    def __post_init__(self) -> None:
        if self.margin < 0 or self.kappa < 0 or self.sigma_weight < 0:
            raise ValueError(f"margin, kappa and sigma_weight must be >= 0; got {self}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5); got {self.label_smoothing}.")


@dataclass(frozen=True)
class PairRewards:
    """Rewards of both sides of N pairs: ``a`` is preferred unless ``tie``; all float ``[N]`` (``tie`` bool)."""

    a: Tensor
    b: Tensor
    tie: Tensor
    log_sigma_a: Tensor | None = None
    log_sigma_b: Tensor | None = None


@dataclass(frozen=True)
class RmLoss:
    """One row of the loss table: ``kind`` (``KINDS``), ``ties`` (``refuse``: tie pairs are an error; ``use``: they
    carry likelihood) and, for scalar and gaussian kinds, ``fn(rewards, params) -> 0-d loss``."""

    name: str
    kind: str
    ties: str
    help: str
    fn: Callable[[PairRewards, LossParams], Tensor] | None = None


def _bt(r: PairRewards, p: LossParams) -> Tensor:
    return bt_loss(r.a, r.b, margin=p.margin, label_smoothing=p.label_smoothing)


def _bt_ties(r: PairRewards, p: LossParams) -> Tensor:
    return bt_ties_loss(r.a, r.b, r.tie, kappa=p.kappa)


def _soli(r: PairRewards, p: LossParams) -> Tensor:
    return soli_ties_loss(r.a, r.b, r.tie, margin=p.margin)


def _gaussian(r: PairRewards, p: LossParams) -> Tensor:
    if r.log_sigma_a is None or r.log_sigma_b is None:
        raise ValueError("gaussian-bt needs log sigma of both sides (an uncertainty head).")
    return gaussian_bt_loss(r.a, r.log_sigma_a, r.b, r.log_sigma_b, margin=p.margin, sigma_weight=p.sigma_weight)


LOSSES: dict[str, RmLoss] = {loss.name: loss for loss in (
    RmLoss("yes-no", "verdict", "refuse", "Pointwise verdict CE: chosen -> 'Yes', rejected -> 'No' (the yes-token "
           "scorer's P(Yes))."),
    RmLoss("pairwise-yes-no", "pairwise-verdict", "refuse", "Pairwise-vs-reference verdict CE, both image orders "
           "with flipped labels."),
    RmLoss("bt", "scalar", "refuse", "Bradley-Terry -log sigma(r_a - r_b - m) with label smoothing.", _bt),
    RmLoss("bt-ties", "scalar", "use", "Rao-Kupper BT with ties: ties get P(tie) = 1 - P(a>b) - P(b>a), kappa.",
           _bt_ties),
    RmLoss("soli-ties", "scalar", "use", "SoliReward wide ties: two BT terms pull tied rewards together.", _soli),
    RmLoss("gaussian-bt", "gaussian", "refuse", "Uncertainty head: -log Phi((mu_a - mu_b - m)/sqrt(s_a^2 + s_b^2)).",
           _gaussian),
)}


def get_loss(name: str) -> RmLoss:
    """The table row of ``name``; an unknown name raises ``ValueError`` with close matches and every name."""
    if name not in LOSSES:
        near = difflib.get_close_matches(name, list(LOSSES))
        raise ValueError(f"Unknown reward-model loss {name!r}; close: {near}. Known: {sorted(LOSSES)}.")
    return LOSSES[name]


def check_ties(loss: RmLoss, tie: list[bool], rows: list[int] | None = None) -> None:
    """Refuse tie pairs for a loss that cannot use them, naming up to 5 rows and what to do instead."""
    if loss.ties == "use":
        return
    bad = [(rows[k] if rows is not None else k) for k, t in enumerate(tie) if t]
    if bad:
        raise ValueError(f"{len(bad)} tie pair(s) (rows {bad[:5]}) but loss {loss.name!r} needs a winner in every "
                         "pair: drop the ties or use --loss bt-ties / soli-ties.")
