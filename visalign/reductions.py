"""Nan-aware reductions over reward tables and prompt groups: the bottom layer that scorers and rewards share.

A reward table is float ``[B, M]`` (one column per term or ensemble member); NaN means "this term does not apply
to this sample" and every function here skips it. Group ids are one hashable per sample (prompts, prompt ids);
:func:`group_index` numbers them by first appearance. Nothing here imports another visalign module, so both
``visalign.scorers`` (ensembles, uncertainty) and ``visalign.rewards`` (aggregations, advantages) build on it
(docs/architecture.md, import rules).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["group_index", "group_stats", "mean_minus_var", "nan_median", "nan_min", "nan_var", "pareto_mask",
           "weighted_nansum"]


def group_index(group_ids: Sequence[Any] | Tensor, n: int | None = None) -> Tensor:
    """Map group ids (prompt strings, prompt ids, ...) to int64 ``[B]`` indices 0..G−1 by first appearance.

    Args:
        group_ids: one hashable id per sample, or a 1-D integer tensor.
        n: the expected batch size; a different length raises.
    """
    if isinstance(group_ids, Tensor):
        if group_ids.ndim != 1:
            raise ValueError(f"group_ids must be 1-D [B]; got shape {tuple(group_ids.shape)}.")
        group_ids = group_ids.tolist()
    if isinstance(group_ids, str):
        raise TypeError("group_ids must be one id per sample (e.g. the list of prompts), not a single string.")
    seen: dict[Any, int] = {}
    index = [seen.setdefault(g, len(seen)) for g in group_ids]
    if n is not None and len(index) != n:
        raise ValueError(f"Got {len(index)} group ids for {n} rewards; pass exactly one group id per sample.")
    return torch.tensor(index, dtype=torch.long)



def group_stats(values: Tensor, index: Tensor, ddof: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Nan-aware per-group mean, std and "all tied" flag, broadcast back to ``[B]``.

    Args:
        values: float ``[B]``; NaN entries are left out of their group's statistics.
        index: int64 ``[B]`` group indices from :func:`group_index`.
        ddof: 0 for the population std, 1 for the sample std (a group with ≤ ddof values gets std 0).

    Returns:
        ``(mean [B], std [B], tied [B] bool)``; ``tied`` is true when a group has fewer than two distinct finite
        values — compared exactly, since ``std`` of identical floats can come out a rounding error above 0.
    """
    index = index.to(values.device)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    present = ~torch.isnan(values)
    filled = torch.where(present, values, torch.zeros_like(values))
    count = values.new_zeros(num_groups).index_add_(0, index, present.to(values.dtype))
    total = torch.zeros_like(count).index_add_(0, index, filled)
    mean = total / count.clamp(min=1)
    dev = torch.where(present, values - mean[index], torch.zeros_like(values))
    sq = torch.zeros_like(count).index_add_(0, index, dev * dev)
    std = (sq / (count - ddof).clamp(min=1)).sqrt() * (count > ddof)
    hi = torch.full_like(count, -torch.inf).scatter_reduce(0, index, torch.where(present, values, -torch.inf), "amax")
    lo = torch.full_like(count, torch.inf).scatter_reduce(0, index, torch.where(present, values, torch.inf), "amin")
    tied = ~(hi > lo)
    return mean[index], std[index], tied[index]



def weighted_nansum(rewards: Tensor, weights: Tensor) -> Tensor:
    """Σ_m w_m·r_m over present terms, rescaled by Σ_all |w| / Σ_present |w| (NaN when none is present).

    The rescale renormalises the weights over the terms that apply, keeping their total mass; when every
    term is present it is exactly the plain weighted sum. Float ``[B, M]`` × ``[M]`` → ``[B]``.
    """
    present = ~torch.isnan(rewards)
    terms = torch.where(present, rewards * weights, torch.zeros_like(rewards))
    mass = weights.abs()
    present_mass = (present * mass).sum(dim=1)
    scale = mass.sum() / present_mass.clamp(min=torch.finfo(rewards.dtype).tiny)
    total = terms.sum(dim=1) * scale
    return torch.where(present_mass > 0, total, torch.full_like(total, float("nan")))



def nan_median(r: Tensor) -> Tensor:
    """Per-row median of float ``[B, M]`` over present values; an even count takes the mean of the two middle
    values; NaN for a row with none."""
    # torch.nanmedian returns the lower middle value for an even count; sort (NaN sorts last) gives both.
    sorted_r = r.sort(dim=1).values
    count = (~torch.isnan(r)).sum(dim=1)
    lo = ((count - 1).clamp(min=0) // 2)[:, None]
    hi = (count // 2).clamp(max=r.shape[1] - 1)[:, None]
    med = (sorted_r.gather(1, lo) + sorted_r.gather(1, hi))[:, 0] / 2
    return torch.where(count > 0, med, torch.full_like(med, float("nan")))



def nan_min(r: Tensor) -> Tensor:
    """Per-row minimum of float ``[B, M]`` over present values (WCO, the worst case); NaN for a row with none."""
    present = ~torch.isnan(r)
    total = torch.where(present, r, torch.full_like(r, float("inf"))).min(dim=1).values
    return torch.where(present.any(dim=1), total, torch.full_like(total, float("nan")))


def mean_minus_var(r: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """UWO per row of float ``[B, M]``: ``mean − λ·Var`` over present values (population variance, ddof 0).

    Returns:
        ``(total [B], variance [B])``.
    """
    mean = r.nanmean(dim=1)
    var = ((r - mean[:, None]) ** 2).nanmean(dim=1)
    return mean - lam * var, var


def nan_var(values: Tensor) -> Tensor:
    """Population variance across dim 1 of float ``[B, K]``, skipping NaN; 0 for rows with fewer than two values."""
    present = ~torch.isnan(values)
    count = present.sum(dim=1)
    mean = values.nanmean(dim=1, keepdim=True)
    sq = torch.where(present, (values - mean) ** 2, torch.zeros_like(values)).sum(dim=1)
    return torch.where(count > 1, sq / count.clamp(min=1), torch.zeros_like(sq))


def pareto_mask(rewards: Tensor) -> Tensor:
    """Non-dominated mask of ``rewards [N, M]`` (higher is better on every column; NaN is worst), bool ``[N]``.

    O(N²·M), fine for a batch. Columns that are all zero (a zero-weight term after sign scaling) never decide.
    """
    r = torch.where(torch.isnan(rewards), torch.full_like(rewards, -float("inf")), rewards)
    geq = (r[:, None, :] >= r[None, :, :]).all(dim=2)  # geq[j, i]: j ≥ i everywhere
    gt = (r[:, None, :] > r[None, :, :]).any(dim=2)
    dominated = (geq & gt).any(dim=0)
    return ~dominated
