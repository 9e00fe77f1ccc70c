"""Ensembles of scorers: one reward from M member scorers, with their disagreement kept in the extras.

Reward-model ensembles mitigate (but do not eliminate) reward hacking: "Reward Model Ensembles Help Mitigate
Overoptimization" (arXiv 2310.02743: WCO = min, UWO = mean − λ·Var) and "Helping or Herding?" (arXiv
2312.09244: mean, median). docs/methods.md#transforms. The members are ordinary registered scorers named in the card,
built lazily through ``get_scorer``; the aggregation rule is one of ``visalign.rewards.aggregate``.

Card params:
    members: list of scorer specs, each an id (``brightness``) or ``{scorer: id, params: {...}}``; at least 2.
    aggregation: ``mean`` | ``median`` | ``min`` (= ``worst-case``) | ``mean-minus-var`` or a mapping
        ``{kind: mean-minus-var, lam: 0.5}``; default ``mean``.

Members must share the ensemble's modality and should share one reward scale (their card-normalised rewards
are aggregated as they are).
"""

from __future__ import annotations

from typing import Any

import torch

from visalign.reductions import mean_minus_var, nan_median, nan_min
from visalign.scorers.base import RawScore, ScoreBatch, Scorer
from visalign.scorers.card import ScorerCard


class EnsembleScorer(Scorer):
    """Aggregate the rewards of several member scorers.

    Returns (from ``__call__``):
        ``ScoreOutput`` with ``raw [B]`` float32, the aggregated member rewards (the card normally maps it with
        identity), and extras ``members [B, M]`` (each member's reward, columns in card order) and
        ``disagreement [B]`` (population std across the members that apply to the sample).

    Differentiable iff every member is (the card's ``differentiable`` is overridden by the members').

    >>> import torch
    >>> from visalign.scorers import ScoreBatch, get_scorer
    >>> scorer = get_scorer("ensemble-color")
    >>> out = scorer(ScoreBatch(prompts=["grey"], media=torch.full((1, 3, 8, 8), 0.6)))
    >>> [round(v, 3) for v in out.extras["members"][0].tolist()], round(out.reward.item(), 3)
    ([0.6, 0.0, 0.0], 0.2)
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        specs = card.params.get("members")
        if not isinstance(specs, (list, tuple)) or len(specs) < 2:
            raise ValueError(f"Ensemble card {card.source or card.id} needs params.members: a list of at least two "
                             f"scorer ids (or {{scorer: id, params: {{...}}}} mappings); got {specs!r}.")
        self.member_specs: list[Any] = list(specs)
        self.rule, self.rule_params = ensemble_rule(card.params.get("aggregation", "mean"), card.source or card.id)
        self._members: list[Scorer] | None = None

    @property
    def members(self) -> list[Scorer]:
        """The member scorers, built on first access (their weights still load lazily on their first call)."""
        if self._members is None:
            self._members = [build_inner_scorer(spec, self) for spec in self.member_specs]
        return self._members

    @property
    def differentiable(self) -> bool:
        return all(member.differentiable for member in self.members)

    def load(self) -> None:
        self.members  # noqa: B018 -- build (and validate) the members before the first score

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        # Scorer.__call__ has already chosen no_grad or enable_grad from its ``grad`` argument; pass it on.
        grad = torch.is_grad_enabled()
        rewards = torch.stack([member(batch, grad=grad).reward for member in self.members], dim=1)
        total = self.rule(rewards, **self.rule_params)
        present = ~torch.isnan(rewards)
        mean = rewards.nanmean(dim=1, keepdim=True)
        var = torch.where(present, (rewards - mean) ** 2, torch.zeros_like(rewards)).sum(dim=1)
        disagreement = (var / present.sum(dim=1).clamp(min=1)).sqrt()
        return RawScore(total, extras={"members": rewards.detach(), "disagreement": disagreement.detach()})


def build_inner_scorer(spec: Any, owner: Scorer) -> Scorer:
    """Build a wrapped scorer from an id or ``{scorer: id, params: {...}}`` on ``owner``'s device and dtype.

    Raises ``ValueError`` when its modality differs from ``owner``'s.
    """
    from visalign.scorers import get_scorer  # the registry imports wrapper modules lazily, not the reverse

    if isinstance(spec, dict):
        unknown = set(spec) - {"scorer", "params"}
        if unknown or "scorer" not in spec:
            raise ValueError(f"Scorer {owner.id!r}: an inner scorer mapping has keys 'scorer' (required) and "
                             f"'params'; got {spec!r}.")
        spec, params = spec["scorer"], spec.get("params")
    else:
        params = None
    inner = get_scorer(spec, device=owner.device, dtype=owner.dtype, params=params)
    if inner.modality != owner.modality:
        raise ValueError(f"Scorer {owner.id!r} scores {owner.modality}s but its inner scorer {inner.id!r} scores "
                         f"{inner.modality}s; use scorers of one modality.")
    return inner


def _mean(r: torch.Tensor) -> torch.Tensor:
    return r.nanmean(dim=1)


def _mean_minus_var(r: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    if lam < 0:
        raise ValueError(f"mean-minus-var needs lam >= 0; got {lam}.")
    return mean_minus_var(r, lam)[0]


# Member rules of an ensemble (the reward-level aggregations, GDPO and Pareto, live in visalign.rewards): each maps
# the members' rewards ``[B, M]`` (NaN = the member abstains) to ``[B]``.
ENSEMBLE_RULES: dict[str, Any] = {"mean": _mean, "median": nan_median, "min": nan_min, "worst-case": nan_min,
                                  "mean-minus-var": _mean_minus_var}


def ensemble_rule(spec: str | dict[str, Any], where: str) -> tuple[Any, dict[str, Any]]:
    """``(rule, params)`` of a card's ``aggregation``: a rule id or ``{kind: id, **params}`` (e.g. ``lam``)."""
    params = dict(spec) if isinstance(spec, dict) else {"kind": spec}
    kind = params.pop("kind", None)
    if kind not in ENSEMBLE_RULES:
        raise ValueError(f"Ensemble card {where}: unknown aggregation {kind!r}; known: {sorted(ENSEMBLE_RULES)}.")
    if kind == "mean-minus-var":
        _mean_minus_var(torch.zeros(1, 1), **params)  # refuse bad params when the card is read, not on first call
    elif params:
        raise ValueError(f"Ensemble card {where}: aggregation {kind!r} takes no params; got {sorted(params)}.")
    return ENSEMBLE_RULES[kind], params
