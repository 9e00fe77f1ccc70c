"""Reward composition: several scorers → one reward, with every per-scorer value kept for logging.

docs/architecture.md#reward-composition, docs/methods.md#transforms. The order of operations is fixed:
raw score → card normalisation (in the scorer) → per-term transform → weight → aggregation → advantages.

>>> from visalign.scorers import ScoreBatch
>>> spec = RewardSpec.from_config(["brightness", {"scorer": "saturation", "weight": 0.5, "transform": "rank"}])
>>> batch = ScoreBatch(prompts=["a", "a"], media=torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]))
>>> out = spec(batch, group_ids=batch.prompts)
>>> out.total.tolist(), sorted(out.per_scorer)
([0.25, 1.25], ['brightness', 'saturation'])

Weights, transforms and the aggregation rule live here, never inside a scorer (docs/extending.md#scorers-and-rewards).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from visalign.reductions import group_index, pareto_mask
from visalign.rewards.advantages import AdvantageConfig, group_advantages
from visalign.rewards.aggregate import Aggregation, build_aggregation
from visalign.rewards.transforms import Transform, build_transform
from visalign.scorers import ScoreBatch, Scorer, get_scorer

__all__ = ["NoFiniteReward", "RewardOutput", "RewardSpec", "RewardTerm", "UpdateRewards"]


@dataclass
class RewardTerm:
    """One scorer in a composed reward."""

    scorer: str | Scorer | Callable[..., Any] = field(
        metadata={"help": "Scorer id, 'pkg.module:Name', a callable (media, prompts) -> [B], or a Scorer."})
    weight: float = field(default=1.0, metadata={"help": "Weight of this term in the aggregation (unitless)."})
    transform: str | dict[str, Any] | Transform | None = field(
        default="identity", metadata={"help": "Reward transform id or {kind: ..., **params} (see transforms.py)."})
    name: str | None = field(default=None, metadata={"help": "Name in logs and outputs; defaults to the scorer id."})
    params: dict[str, Any] | None = field(default=None, metadata={"help": "Overrides of the scorer card's params."})

    @classmethod
    def from_config(cls, entry: str | dict[str, Any] | RewardTerm) -> RewardTerm:
        """A term from a recipe entry: a scorer id string, or a mapping with the fields above."""
        if isinstance(entry, RewardTerm):
            return entry
        if isinstance(entry, str) or callable(entry) or isinstance(entry, Scorer):
            return cls(scorer=entry)
        if not isinstance(entry, dict):
            raise TypeError(f"A reward term is a scorer id or a mapping; got {entry!r}.")
        allowed = {f.name for f in fields(cls)}
        unknown = set(entry) - allowed
        if unknown:
            raise ValueError(f"Unknown key(s) {sorted(unknown)} in reward term {entry!r}; allowed: {sorted(allowed)}.")
        if "scorer" not in entry:
            raise ValueError(f"Reward term {entry!r} must name its 'scorer' (an id such as 'brightness').")
        return cls(**entry)


@dataclass
class RewardOutput:
    """What a composed reward returns.

    Attributes:
        total: float32 ``[B]``, the aggregated reward (NaN only where no term applies); keeps the autograd
            graph when the spec was called with ``grad=True``.
        per_scorer: name → float32 ``[B]``, each term's reward after its transform (what was aggregated).
        raw: name → float32 ``[B]``, each term's reward before the transform (the scorer's normalised reward).
        advantages: float32 ``[B]`` when ``group_ids`` were given, else None.
        extras: named tensors: ``zero_std [B]`` bool and ``group_std [B]`` (with groups), ``{name}/native [B]``
            (the scorer's native ``raw``), ``{name}/{key}`` (the scorer's extras), the aggregation's extras
            and ``keep [B]`` bool for selecting aggregations (Pareto).
    """

    total: Tensor
    per_scorer: dict[str, Tensor]
    raw: dict[str, Tensor]
    advantages: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Scalars to log, named as TRL names them.

        ``reward/{name}/mean`` and ``reward/{name}/std`` (each term before its transform, NaN skipped, std with
        ddof 1), ``reward`` (mean total), ``reward_std`` (mean within-group std of the total, or the batch std
        without groups), ``frac_reward_zero_std`` (fraction of samples in zero-variance groups; without groups,
        1.0 when the whole batch ties), plus any scalar extras of the aggregation (e.g. ``pareto_fraction``).
        """
        out: dict[str, float] = {}
        for name, values in self.raw.items():
            out[f"reward/{name}/mean"] = _nanmean(values)
            out[f"reward/{name}/std"] = _nanstd(values)
        out["reward"] = _nanmean(self.total)
        if "group_std" in self.extras:
            out["reward_std"] = float(self.extras["group_std"].float().mean())
            out["frac_reward_zero_std"] = float(self.extras["zero_std"].float().mean())
        else:
            out["reward_std"] = _nanstd(self.total)
            finite = self.total[~torch.isnan(self.total)]
            out["frac_reward_zero_std"] = float(finite.numel() > 0 and bool((finite == finite[0]).all()))
        for key, value in self.extras.items():
            if value.ndim == 0:
                out[key] = float(value)
        return out


class NoFiniteReward(ValueError):
    """No sample of a batch has a finite reward: every term abstains (NaN) on every sample."""


@dataclass
class UpdateRewards:
    """A grouped batch's rewards after post-processing (:meth:`RewardSpec.for_update`), on the CPU.

    Attributes:
        output: the full :class:`RewardOutput` (per-term values and extras, for logging).
        rewards: float32 ``[B]``, the total with NaN replaced by 0.
        per_scorer: name → float32 ``[B]`` per-term rewards after their transforms.
        advantages: float32 ``[B]``, 0 for zero-variance groups and outside ``keep``.
        group_ids: int64 ``[B]``, the prompt group of each sample, numbered by first appearance.
        weights: float32 ``[B]`` per-sample update weights (uncertainty ``exp(−U)``, mean 1 over ``keep``), else 1.
        keep: bool ``[B]``, samples allowed to carry the update (finite reward, Pareto front when on).
        dropped: how many samples had a NaN total.
    """

    output: RewardOutput
    rewards: Tensor
    per_scorer: dict[str, Tensor]
    advantages: Tensor
    group_ids: Tensor
    weights: Tensor
    keep: Tensor
    dropped: int


@dataclass
class RewardSpec:
    """A list of weighted, transformed scorers and the rule that aggregates them.

    Args:
        terms: the scorers, each with a weight, a transform and a name (names must be unique).
        aggregation: id or ``{kind: ..., **params}`` of an aggregation (``weighted-sum``, ``gdpo``, ``pareto``,
            ``worst-case``, ``mean-minus-var``, ``mean``, ``median``).
        advantage: how totals become per-prompt group advantages when ``group_ids`` are given.
        device: device the scorers are built on.
        pareto: Parrot-style selection for updates: only the batch's non-dominated samples (over the terms) keep
            their advantage (:meth:`for_update`).
        uncertainty_weights: multiply per-sample update weights by the ``{name}/weight`` extras of
            uncertainty-aware terms (:meth:`for_update`).
        dtype: compute dtype of the scorers (``float32``, ``bfloat16``, ``float16``); rewards stay float32.
        modality: how a plain callable among the terms is called: ``image`` / ``video`` as ``fn(media, prompts)``,
            ``text`` as a TRL reward ``fn(prompts=..., completions=..., **columns)``; the engine passes its source's.
    """

    terms: list[RewardTerm]
    aggregation: str | dict[str, Any] | Aggregation = "weighted-sum"
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    device: str = "cpu"
    pareto: bool = False
    uncertainty_weights: bool = True
    dtype: str = "float32"
    modality: str = "image"

    def __post_init__(self) -> None:
        self.terms = [RewardTerm.from_config(t) for t in self.terms]
        if not self.terms:
            raise ValueError("A RewardSpec needs at least one term, e.g. RewardSpec.from_config(['brightness']).")
        if isinstance(self.advantage, dict):
            self.advantage = AdvantageConfig(**self.advantage)
        self.scorers: dict[str, Scorer] = {}
        self.transforms: dict[str, Transform] = {}
        for term in self.terms:
            scorer = get_scorer(term.scorer, device=self.device, params=term.params, dtype=getattr(torch, self.dtype),
                                modality=self.modality)
            name = term.name or scorer.id
            if name in self.scorers:
                raise ValueError(f"Two reward terms are named {name!r}; give one of them a distinct 'name'.")
            self.scorers[name] = scorer
            self.transforms[name] = build_transform(term.transform)
        self.weights = torch.tensor([float(t.weight) for t in self.terms], dtype=torch.float32)
        self.aggregator = build_aggregation(self.aggregation)

    @classmethod
    def from_config(cls, config: Sequence[str | dict[str, Any]] | dict[str, Any], **overrides: Any) -> RewardSpec:
        """Build from a YAML recipe: a list of terms, or ``{terms: [...], aggregation: ..., advantage: {...}}``.

        A term is a scorer id (``"brightness"``) or a mapping ``{scorer, weight, transform, name, params}``.
        Unknown keys raise.
        """
        if isinstance(config, dict):
            allowed = {"terms", "aggregation", "advantage", "device", "pareto", "uncertainty_weights", "dtype",
                       "modality"}
            unknown = set(config) - allowed
            if unknown:
                raise ValueError(f"Unknown key(s) {sorted(unknown)} in reward config; allowed: {sorted(allowed)}.")
            kwargs = dict(config)
            if isinstance(kwargs.get("advantage"), dict):
                kwargs["advantage"] = AdvantageConfig(**kwargs["advantage"])
        elif isinstance(config, (list, tuple)):
            kwargs = {"terms": list(config)}
        else:
            raise TypeError(f"A reward config is a list of terms or a mapping with 'terms'; got {config!r}.")
        kwargs.update(overrides)
        if "terms" not in kwargs:
            raise ValueError("A reward config mapping needs 'terms': a list of scorer ids or term mappings.")
        return cls(**kwargs)

    @property
    def names(self) -> list[str]:
        return list(self.scorers)

    @property
    def differentiable(self) -> bool:
        """True when every term that carries weight is differentiable (required for ``grad=True``)."""
        return not self.blocking_terms()

    def blocking_terms(self) -> list[str]:
        """Names of the weighted terms whose scorer cannot return gradients (they block ``grad=True``).

        A zero-weight term (a monitor, e.g. the oracle beside a proxy) is scored without a graph instead.
        """
        return [name for (name, scorer), w in zip(self.scorers.items(), self.weights.tolist(), strict=True)
                if w != 0 and not scorer.differentiable]

    def __call__(self, batch: ScoreBatch, group_ids: Sequence[Any] | Tensor | None = None, *, grad: bool = False,
                 ref_rewards: dict[str, Tensor] | None = None) -> RewardOutput:
        """Score a batch with every term, transform, aggregate and (with groups) compute advantages.

        Args:
            batch: the samples (media in [0, 1], ``[B, 3, H, W]`` or ``[B, T, 3, H, W]``) and their prompts.
            group_ids: one id per sample (e.g. ``batch.prompts``); samples sharing an id form a group.
            grad: keep the graph from ``total`` back to ``batch.media``; every weighted term must be differentiable
                (zero-weight terms are scored without a graph).
            ref_rewards: term name → reference rewards ``[B]`` or ``[B, M]`` for ``centred``/``log-sigmoid``/
                ``par`` transforms; otherwise read from ``batch.metadata[i]["ref_rewards"][name]``.

        Returns:
            :class:`RewardOutput`; ``advantages`` is float32 ``[B]`` when ``group_ids`` is given.
        """
        n = len(batch)
        if group_ids is not None:
            group_index(group_ids, n)  # validate the length before any scorer runs
        blocking = self.blocking_terms() if grad else []
        if blocking:
            raise ValueError(f"grad=True needs differentiable reward terms; {blocking} cannot return "
                             "gradients to the pixels. Give them weight 0 or use a differentiable scorer "
                             "(e.g. a CLIP or embedding-head card).")
        raw: dict[str, Tensor] = {}
        per_scorer: dict[str, Tensor] = {}
        extras: dict[str, Tensor] = {}
        for name, scorer in self.scorers.items():
            out = scorer(batch, grad=grad and scorer.differentiable)
            raw[name] = out.reward
            reference = self._reference(name, batch, ref_rewards) if self.transforms[name].needs_reference else None
            per_scorer[name] = self.transforms[name](out.reward, reference)
            extras[f"{name}/native"] = out.raw.detach()
            extras.update({f"{name}/{key}": value for key, value in out.extras.items()})
        stacked = torch.stack([per_scorer[name] for name in self.scorers], dim=1)
        agg = self.aggregator(stacked, self.weights.to(stacked.device), group_ids)
        extras.update(agg.extras)
        advantages = None
        if group_ids is not None:
            grouped = group_advantages(agg.total.detach(), group_ids, self.advantage)
            advantages = grouped.advantages if agg.advantages is None else agg.advantages.detach()
            extras["zero_std"], extras["group_std"] = grouped.zero_std, grouped.group_std
        if agg.keep is not None:
            extras["keep"] = agg.keep
            if advantages is not None:
                advantages = torch.where(agg.keep, advantages, torch.zeros_like(advantages))
        return RewardOutput(total=agg.total, per_scorer=per_scorer, raw=raw, advantages=advantages, extras=extras)

    def for_update(self, batch: ScoreBatch, group_ids: Sequence[Any]) -> UpdateRewards:
        """Score a grouped batch and post-process the result into what an update consumes.

        The post-processing, in order: samples whose total is NaN (no term applies) are dropped (``keep`` false,
        reward 0); with ``pareto`` only the non-dominated samples over the terms are kept; with
        ``uncertainty_weights`` the per-sample weight is the product of the terms' ``{name}/weight`` extras
        (NaN → 0), rescaled to mean 1 over the kept samples so it re-balances samples without rescaling the
        learning rate; advantages are 0 outside ``keep``.

        Raises:
            NoFiniteReward: when no sample has a finite total.
        """
        reward = self(batch, group_ids=group_ids)
        n = len(batch)
        finite = torch.isfinite(reward.total)
        if not finite.any():
            raise NoFiniteReward(f"Every sample's reward is NaN (terms {self.names}); a scorer abstains on all of "
                                 "them — check its inputs.")
        keep = finite.clone()
        if self.pareto:
            stacked = torch.stack([reward.per_scorer[name] for name in self.names], dim=1)
            keep &= pareto_mask(torch.nan_to_num(stacked, nan=-math.inf))
        weights = torch.ones(n)
        if self.uncertainty_weights:
            for key, value in reward.extras.items():
                if key.endswith("/weight") and value.shape == weights.shape:
                    weights = weights * torch.nan_to_num(value.detach().float().cpu(), nan=0.0)
            kept_mean = weights[keep].mean() if keep.any() else torch.tensor(0.0)
            if kept_mean > 0:
                weights = weights / kept_mean
        advantages = torch.nan_to_num(reward.advantages.detach().float().cpu(), nan=0.0)
        return UpdateRewards(output=reward, rewards=torch.nan_to_num(reward.total.detach().float().cpu(), nan=0.0),
                             per_scorer={k: v.detach().cpu() for k, v in reward.per_scorer.items()},
                             advantages=torch.where(keep, advantages, torch.zeros_like(advantages)),
                             group_ids=group_index(group_ids, n), weights=weights, keep=keep,
                             dropped=int((~finite).sum()))

    @contextlib.contextmanager
    def frozen_transforms(self) -> Iterator[None]:
        """Running reward statistics (``running-zscore``) stay untouched inside the block: a re-score of the same
        samples (reward backprop) or an evaluation reads them without moving them."""
        frozen = [t for t in self.transforms.values() if getattr(t, "update", False)]
        for t in frozen:
            t.update = False
        try:
            yield
        finally:
            for t in frozen:
                t.update = True

    def _reference(self, name: str, batch: ScoreBatch, ref_rewards: dict[str, Tensor] | None) -> Tensor:
        if ref_rewards and name in ref_rewards:
            return torch.as_tensor(ref_rewards[name], dtype=torch.float32)
        rows = [(m or {}).get("ref_rewards", {}).get(name) for m in (batch.metadata or [])]
        if not rows or any(r is None for r in rows):
            raise ValueError(f"Reward term {name!r} uses transform {self.transforms[name].kind!r}, which needs "
                             f"reference rewards: pass ref_rewards={{{name!r}: tensor [B] or [B, M]}} or set "
                             f"metadata[i]['ref_rewards'][{name!r}] for every sample.")
        return torch.tensor(rows, dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        """Running state of every stateful transform, by term name (for checkpoint/resume)."""
        return {"transforms": {name: t.state_dict() for name, t in self.transforms.items() if t.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.get("transforms", {}).items():
            if name not in self.transforms:
                raise ValueError(f"Checkpoint has transform state for {name!r}, not a term of this spec "
                                 f"({self.names}); did the recipe's reward terms change?")
            self.transforms[name].load_state_dict(value)


def _nanmean(values: Tensor) -> float:
    finite = values.detach().float()
    finite = finite[~torch.isnan(finite)]
    return float(finite.mean()) if finite.numel() else float("nan")


def _nanstd(values: Tensor) -> float:
    finite = values.detach().float()
    finite = finite[~torch.isnan(finite)]
    return float(finite.std()) if finite.numel() > 1 else 0.0
