"""Aggregations: M per-scorer rewards ``[B, M]`` → one total ``[B]`` (and, for some, advantages or a mask).

docs/methods.md#transforms (weighted sum, GDPO, WCO/UWO ensemble rules), #parrot (Parrot's Pareto selection). Each rule
is a small class in the ``AGGREGATIONS`` registry; a recipe names one by id or as a mapping (``{kind: mean-minus-var,
lam: 0.5}``). Every rule is nan-aware: NaN in ``rewards[i, m]`` means scorer m does not apply to sample i, and
the rule skips it as documented on each class. All rules are built from differentiable torch ops (except the
Pareto mask), so an ensemble of differentiable scorers stays differentiable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from visalign.reductions import (
    group_index,
    group_stats,
    mean_minus_var,
    nan_median,
    nan_min,
    pareto_mask,
    weighted_nansum,
)
from visalign.registry import Registry

__all__ = ["AGGREGATIONS", "Aggregated", "Aggregation", "build_aggregation", "list_aggregations", "pareto_mask"]


@dataclass
class Aggregated:
    """What an aggregation returns.

    Attributes:
        total: float ``[B]``, the combined reward (NaN only when no term applies to a sample).
        advantages: float ``[B]`` when the rule defines its own advantage (GDPO with groups), else None and the
            caller derives advantages from ``total`` (``visalign.rewards.advantages``).
        keep: bool ``[B]`` when the rule selects samples (Pareto: advantages outside it are set to 0), else None.
        extras: named tensors for logging.
    """

    total: Tensor
    advantages: Tensor | None = None
    keep: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class Aggregation:
    """Base class: ``aggregation(rewards [B, M], weights [M], group_ids=None) -> Aggregated``."""

    kind: ClassVar[str] = ""

    def __call__(self, rewards: Tensor, weights: Tensor | None = None, group_ids: Any = None) -> Aggregated:
        rewards, weights = _check(rewards, weights, self.kind)
        return self.apply(rewards, weights, group_ids)

    def apply(self, rewards: Tensor, weights: Tensor, group_ids: Any) -> Aggregated:
        raise NotImplementedError(f"{type(self).__name__} must implement apply().")


@dataclass
class WeightedSum(Aggregation):
    """total = Σ_m w_m·r_m; a NaN term is skipped and the present weights renormalised (see weighted_nansum).

    Example: w = [1, 1], r = [0.2, NaN] → 0.2·1 · (2 / 1) = 0.4, the value the sample would get if the missing
    scorer had agreed with the present one.
    """

    kind: ClassVar[str] = "weighted-sum"

    def apply(self, rewards: Tensor, weights: Tensor, group_ids: Any) -> Aggregated:
        return Aggregated(total=weighted_nansum(rewards, weights))


@dataclass
class WeightedMean(Aggregation):
    """total = Σ_present w_m·r_m / Σ_present w_m (the ensemble "mean"; equal weights give the nan-mean)."""

    kind: ClassVar[str] = "mean"

    def apply(self, rewards: Tensor, weights: Tensor, group_ids: Any) -> Aggregated:
        return Aggregated(total=weighted_nansum(rewards, weights) / weights.abs().sum().clamp(min=1e-12))


@dataclass
class Median(Aggregation):
    """total = nan-median over the terms; an even count takes the mean of the two middle values.

    Weights other than 0 are ignored; zero-weight terms are dropped.
    """

    kind: ClassVar[str] = "median"

    def apply(self, rewards: Tensor, weights: Tensor, group_ids: Any) -> Aggregated:
        return Aggregated(total=nan_median(_drop_zero_weight(rewards, weights)))


@dataclass
class WorstCase(Aggregation):
    """WCO: total = min over present terms (weights other than 0 are ignored; zero-weight terms are dropped)."""

    kind: ClassVar[str] = "worst-case"

    def apply(self, rewards: Tensor, weights: Tensor, group_ids: Any) -> Aggregated:
        return Aggregated(total=nan_min(_drop_zero_weight(rewards, weights)))


@dataclass
class MeanMinusVar(Aggregation):
    """UWO: total = mean_m r_m − λ·Var_m r_m over present terms (population variance, ddof 0).

    Zero-weight terms are dropped; other weights are ignored (ensemble members share one scale).

    Args:
        lam: λ ≥ 0, the variance penalty (arXiv 2310.02743 sweeps it; 0 is the plain mean).
    """

    lam: float = 1.0
    kind: ClassVar[str] = "mean-minus-var"

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"mean-minus-var needs lam >= 0; got {self.lam}.")

    def apply(self, rewards: Tensor, weights: Tensor, group_ids: Any) -> Aggregated:
        total, var = mean_minus_var(_drop_zero_weight(rewards, weights), self.lam)
        return Aggregated(total=total, extras={"variance": var.detach()})


@dataclass
class Gdpo(Aggregation):
    """GDPO (decoupled normalisation, NVlabs/GDPO): normalise each reward within its prompt group, then combine.

    With groups and more than one active (non-zero-weight) term::

        A_k = (r_k − mean_g r_k) / (std_g r_k + eps)        per reward k, within each prompt group
        A   = nansum_k w_k·A_k ;   A ← (A − mean_batch A) / (std_batch A + eps)

    Stds use ``ddof`` (1, torch's default, as in the GDPO trainer). ``total`` is the weighted sum (for logging).
    Without groups, or with a single active term, ``advantages`` is None and the caller falls back to plain
    group normalisation of the total, as docs/methods.md#transforms prescribes ("applied only when more than one reward
    is active").
    """

    eps: float = 1e-4
    ddof: int = 1
    kind: ClassVar[str] = "gdpo"

    def apply(self, rewards: Tensor, weights: Tensor, group_ids: Any) -> Aggregated:
        total = weighted_nansum(rewards, weights)
        if group_ids is None or int((weights != 0).sum()) < 2:
            return Aggregated(total=total)
        index = group_index(group_ids, rewards.shape[0]).to(rewards.device)
        per_reward = []
        for k in range(rewards.shape[1]):
            mean, std, _ = group_stats(rewards[:, k], index, self.ddof)
            per_reward.append((rewards[:, k] - mean) / (std + self.eps))
        normalised = torch.stack(per_reward, dim=1)
        combined = torch.where(torch.isnan(normalised), torch.zeros_like(normalised), normalised * weights).sum(dim=1)
        n = combined.numel()
        batch_std = combined.std(correction=self.ddof) if n > self.ddof else combined.new_zeros(())
        advantages = (combined - combined.mean()) / (batch_std + self.eps)
        return Aggregated(total=total, advantages=advantages, extras={"per_reward_advantage": normalised.detach()})


@dataclass
class Pareto(Aggregation):
    """Parrot (docs/methods.md#parrot): total = weighted sum; ``keep`` marks the batch's non-dominated samples.

    i dominates j iff s·R_i ≥ s·R_j on every term and > on at least one, with s = sign(w) (a negative weight
    means lower is better) and zero-weight terms ignored. A NaN compares as worse than any value, so a term
    that does not apply cannot make a sample dominate. Advantages outside ``keep`` are set to 0 by the caller.
    """

    kind: ClassVar[str] = "pareto"

    def apply(self, rewards: Tensor, weights: Tensor, group_ids: Any) -> Aggregated:
        keep = pareto_mask(rewards.detach() * torch.sign(weights))
        return Aggregated(total=weighted_nansum(rewards, weights), keep=keep,
                          extras={"pareto_fraction": keep.float().mean()})


def _drop_zero_weight(rewards: Tensor, weights: Tensor) -> Tensor:
    return rewards[:, weights != 0]


def _check(rewards: Tensor, weights: Tensor | None, kind: str) -> tuple[Tensor, Tensor]:
    if not isinstance(rewards, Tensor) or rewards.ndim != 2:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"Aggregation {kind!r} takes rewards [B, M] (one column per term); got {shape}.")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    if weights is None:
        weights = torch.ones(rewards.shape[1], dtype=rewards.dtype, device=rewards.device)
    weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if weights.shape != (rewards.shape[1],):
        raise ValueError(f"Aggregation {kind!r}: {rewards.shape[1]} reward columns but weights of shape "
                         f"{tuple(weights.shape)}; pass one weight per term.")
    if not torch.isfinite(weights).all() or not (weights != 0).any():
        raise ValueError(f"Aggregation {kind!r}: weights must be finite and not all zero; got {weights.tolist()}.")
    return rewards, weights


AGGREGATIONS: Registry[type[Aggregation]] = Registry("aggregation", {
    cls.kind: f"{__name__}:{cls.__name__}" for cls in (WeightedSum, WeightedMean, Median, WorstCase, MeanMinusVar,
                                                       Gdpo, Pareto)
})
AGGREGATIONS.add_builtin("min", f"{__name__}:WorstCase")  # the ensemble spelling of WCO
# The two multi-reward modes under the names TRL gives them: sum the weighted terms and normalise the total within
# each prompt group (the default), or normalise each term within its group first and then sum (GDPO).
AGGREGATIONS.add_builtin("sum_then_normalize", f"{__name__}:WeightedSum")
AGGREGATIONS.add_builtin("normalize_then_sum", f"{__name__}:Gdpo")


def list_aggregations() -> list[str]:
    """Every aggregation id, sorted."""
    return AGGREGATIONS.list()


def build_aggregation(spec: str | dict[str, Any] | Aggregation | None) -> Aggregation:
    """Build an aggregation from an id, a mapping ``{kind: ..., **params}``, an instance, or None (weighted sum)."""
    return AGGREGATIONS.build(spec, Aggregation, WeightedSum)
