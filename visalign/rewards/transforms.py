"""Reward transforms: what happens to one scorer's reward before it is weighted and aggregated
(docs/methods.md#transforms).

Order of operations (docs/methods.md#transforms): raw score → card normalisation (inside the scorer) → **transform** →
weight → aggregate (``visalign.rewards.aggregate``) → advantage (``visalign.rewards.advantages``).

Each transform is a small class in the ``TRANSFORMS`` registry (a data table, not an ``elif``); a recipe names
one as a string (``"rank"``) or a mapping (``{kind: affine, lo: 0, hi: 26}``). Every transform maps a float
``[B]`` tensor to a float ``[B]`` tensor and lets NaN ("does not apply to this sample") pass through.

Transforms that compare with a reference (``centred``, ``log-sigmoid``, ``par``) take per-sample reference
rewards: ``[B]`` (one reference value per sample, e.g. the prompt's mean reward under the pre-RL policy) or
``[B, M]`` (M reference samples per prompt). Sources: PorUna-byte/PAR ``trainers/reward_shaper.py``
(``calculate_centered``, ``calculate_relative_sigmoid``, ``RunningStats``) and arXiv 2402.00742 (log-sigmoid).

Stateful transforms (``running-zscore``) expose ``state_dict()`` / ``load_state_dict()`` so a checkpoint
resumes them exactly; stateless ones return ``{}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.registry import Registry

__all__ = ["TRANSFORMS", "Transform", "build_transform", "list_transforms"]


class Transform:
    """Base class: ``transform(rewards [B], reference=None) -> [B]``; NaN in, NaN out.

    Subclasses set ``needs_reference`` when ``reference`` is required and override ``state_dict`` /
    ``load_state_dict`` when they carry state across batches.
    """

    kind: ClassVar[str] = ""
    needs_reference: ClassVar[bool] = False

    def __call__(self, rewards: Tensor, reference: Tensor | None = None) -> Tensor:
        rewards = _check_rewards(rewards, self.kind)
        if self.needs_reference:
            reference = _check_reference(reference, rewards, self.kind)
        return self.apply(rewards, reference)

    def apply(self, rewards: Tensor, reference: Tensor | None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement apply().")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"Transform {self.kind!r} is stateless but got state {sorted(state)}.")


@dataclass
class IdentityTransform(Transform):
    """r̃ = r."""

    kind: ClassVar[str] = "identity"

    def apply(self, rewards: Tensor, reference: Tensor | None) -> Tensor:
        return rewards


@dataclass
class AffineTransform(Transform):
    """r̃ = (r − lo) / (hi − lo), clamped to [0, 1] unless ``clamp`` is false; ``lo > hi`` flips the sign.

    For a raw range that a card did not already calibrate (e.g. a callable reward in unknown units).
    """

    lo: float = 0.0
    hi: float = 1.0
    clamp: bool = True
    kind: ClassVar[str] = "affine"

    def __post_init__(self) -> None:
        if self.lo == self.hi:
            raise ValueError(f"affine transform needs lo != hi; got lo = hi = {self.lo}.")

    def apply(self, rewards: Tensor, reference: Tensor | None) -> Tensor:
        out = (rewards - self.lo) / (self.hi - self.lo)
        # clamp() would keep NaN as NaN already; torch.where keeps that explicit and the gradient intact.
        return torch.where(torch.isnan(out), out, out.clamp(0.0, 1.0)) if self.clamp else out


@dataclass
class RunningZScoreTransform(Transform):
    """r̃ = (r − μ) / (σ + eps) with running Welford statistics over every reward seen so far.

    Each call first folds the batch's finite rewards into (count, mean, M2) with Chan's parallel update, then
    whitens with the updated statistics, so the first batch is whitened by its own mean and (population) std.
    ``clip`` (in units of σ) clamps the result to [−clip, clip], i.e. r to [μ − clip·σ, μ + clip·σ] (PAR's
    ``RunningStats`` clips at one σ). Statistics are float64 Python numbers, so long runs do not drift.

    Args:
        clip: clamp bound in standard deviations, or None for no clamp.
        eps: added to σ so a constant stream maps to 0 rather than NaN.
        update: fold new batches into the statistics; set false to freeze them (evaluation).
    """

    clip: float | None = None
    eps: float = 1e-8
    update: bool = True
    count: float = field(default=0.0, repr=False)
    mean: float = field(default=0.0, repr=False)
    m2: float = field(default=0.0, repr=False)
    kind: ClassVar[str] = "running-zscore"

    def __post_init__(self) -> None:
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"running-zscore clip must be > 0 standard deviations or null; got {self.clip}.")

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 0 else 0.0

    def observe(self, rewards: Tensor) -> None:
        """Fold the finite values of ``rewards`` into the running statistics (Chan et al. pairwise update)."""
        values = rewards.detach().double()
        values = values[torch.isfinite(values)]
        n = float(values.numel())
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def apply(self, rewards: Tensor, reference: Tensor | None) -> Tensor:
        if self.update:
            self.observe(rewards)
        if self.count == 0:
            raise ValueError("running-zscore has seen no finite reward yet; it cannot whiten an all-NaN batch.")
        out = (rewards - self.mean) / (self.std + self.eps)
        if self.clip is not None:
            out = torch.where(torch.isnan(out), out, out.clamp(-self.clip, self.clip))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(f"running-zscore state is missing {sorted(missing)}; got {sorted(state)}.")
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass
class RankTransform(Transform):
    """r̃ = rank of r within the batch, scaled to [0, 1]: lowest → 0, highest → 1, ties share their mean rank.

    NaN samples are not ranked and stay NaN; a batch with a single finite value maps it to 0.5.
    Not differentiable (ranks are piecewise constant).
    """

    kind: ClassVar[str] = "rank"

    def apply(self, rewards: Tensor, reference: Tensor | None) -> Tensor:
        finite = ~torch.isnan(rewards)
        values = rewards[finite].detach()
        n = values.numel()
        out = torch.full_like(rewards, float("nan"))
        if n == 0:
            return out
        if n == 1:
            out[finite] = 0.5
            return out
        # Average rank of ties: #(strictly smaller) + (#(equal) − 1) / 2, so [3, 1, 2, 2] → [3, 0, 1.5, 1.5].
        smaller = (values[None, :] < values[:, None]).sum(dim=1).to(rewards.dtype)
        equal = (values[None, :] == values[:, None]).sum(dim=1).to(rewards.dtype)
        out[finite] = (smaller + (equal - 1) / 2) / (n - 1)
        return out


@dataclass
class CentredTransform(Transform):
    """r̃ = r − r_ref(c), with r_ref the mean of the reference rewards (``[B]`` or the nan-mean of ``[B, M]``)."""

    kind: ClassVar[str] = "centred"
    needs_reference: ClassVar[bool] = True

    def apply(self, rewards: Tensor, reference: Tensor | None) -> Tensor:
        return rewards - _reference_mean(reference)


@dataclass
class LogSigmoidTransform(Transform):
    """r̃ = log σ(r − r_ref(c)), in (−∞, 0); a sum of these over properties is log P(good on all) (logical AND).

    ``r_ref`` is the reference mean as in ``centred``; PAR's baseline chooses it as μ + σ·Φ⁻¹(0.85) of the
    prompt's pre-RL rewards, which the caller supplies as a ``[B]`` reference.
    """

    kind: ClassVar[str] = "log-sigmoid"
    needs_reference: ClassVar[bool] = True

    def apply(self, rewards: Tensor, reference: Tensor | None) -> Tensor:
        return F.logsigmoid(rewards - _reference_mean(reference))


@dataclass
class ParTransform(Transform):
    """PAR: r̃ = (1/M) Σ_m σ(k·(r − r_ref,m)), bounded in (0, 1); rises fast, then saturates (arXiv 2502.18770).

    Args:
        k: sigmoid slope (PAR uses 1).
    """

    k: float = 1.0
    kind: ClassVar[str] = "par"
    needs_reference: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ValueError(f"par transform needs slope k > 0; got {self.k}.")

    def apply(self, rewards: Tensor, reference: Tensor | None) -> Tensor:
        ref = reference if reference.ndim == 2 else reference[:, None]
        sig = torch.sigmoid(self.k * (rewards[:, None] - ref))
        # A NaN reference sample is skipped; a NaN reward stays NaN (nanmean of an all-NaN row is NaN).
        return sig.nanmean(dim=1)


TRANSFORMS: Registry[type[Transform]] = Registry("reward transform", {
    cls.kind: f"{__name__}:{cls.__name__}"
    for cls in (IdentityTransform, AffineTransform, RunningZScoreTransform, RankTransform, CentredTransform,
                LogSigmoidTransform, ParTransform)
})


def list_transforms() -> list[str]:
    """Every transform id, sorted."""
    return TRANSFORMS.list()


def build_transform(spec: str | dict[str, Any] | Transform | None) -> Transform:
    """Build a transform from a recipe entry.

    Args:
        spec: an id (``"rank"``), a mapping with ``kind`` and parameters (``{kind: par, k: 2}``), a
            ``Transform`` instance (returned as is) or None (identity).

    Returns:
        A fresh ``Transform`` (stateful ones start empty).
    """
    return TRANSFORMS.build(spec, Transform, IdentityTransform)


def _check_rewards(rewards: Tensor, kind: str) -> Tensor:
    if not isinstance(rewards, Tensor) or rewards.ndim != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"Transform {kind!r} takes rewards as a 1-D tensor [B]; got {shape}.")
    return rewards if rewards.is_floating_point() else rewards.float()


def _check_reference(reference: Tensor | None, rewards: Tensor, kind: str) -> Tensor:
    if reference is None:
        raise ValueError(f"Transform {kind!r} compares with reference rewards; pass reference [B] or [B, M] "
                         "(rewards of the pre-RL policy for the same prompts), e.g. RewardSpec(..., ref_rewards=).")
    reference = torch.as_tensor(reference, dtype=rewards.dtype, device=rewards.device)
    if reference.ndim not in (1, 2) or reference.shape[0] != rewards.shape[0]:
        raise ValueError(f"Transform {kind!r}: reference must be [B] or [B, M] with B = {rewards.shape[0]}; "
                         f"got {tuple(reference.shape)}.")
    return reference


def _reference_mean(reference: Tensor) -> Tensor:
    return reference.nanmean(dim=1) if reference.ndim == 2 else reference
