"""Named rules that map a scorer's native output to a reward (docs/extending.md#scorers-and-rewards: no bare ``/26`` in
a scorer).

Each rule is a small dataclass built from a card's ``normalize:`` mapping, e.g.
``{kind: affine, lo: 0.0, hi: 26.0}``. NaN ("does not apply") passes through every rule unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from visalign.registry import unknown_id_message


@dataclass(frozen=True)
class Identity:
    """reward = raw; the reward range is the card's raw range."""

    kind: ClassVar[str] = "identity"

    def __call__(self, raw: Tensor) -> Tensor:
        return raw

    def output_range(self, raw_range: tuple[float, float]) -> tuple[float, float]:
        return raw_range


@dataclass(frozen=True)
class Affine:
    """reward = (raw − lo) / (hi − lo), clamped to [0, 1] unless ``clamp`` is false.

    ``lo > hi`` is allowed and flips the sign (lower raw is better, e.g. JPEG size for compressibility).
    """

    lo: float
    hi: float
    clamp: bool = True
    kind: ClassVar[str] = "affine"

    def __post_init__(self) -> None:
        if self.lo == self.hi:
            raise ValueError(f"affine normalisation needs lo != hi; got lo = hi = {self.lo}.")

    def __call__(self, raw: Tensor) -> Tensor:
        r = (raw - self.lo) / (self.hi - self.lo)
        return torch.where(torch.isnan(r), r, r.clamp(0.0, 1.0)) if self.clamp else r

    def output_range(self, raw_range: tuple[float, float]) -> tuple[float, float]:
        if self.clamp:
            return (0.0, 1.0)
        ends = sorted(((raw_range[0] - self.lo) / (self.hi - self.lo), (raw_range[1] - self.lo) / (self.hi - self.lo)))
        return (ends[0], ends[1])


@dataclass(frozen=True)
class Sigmoid:
    """reward = σ((raw − center) / scale), in (0, 1); for unbounded logits (reward-model heads)."""

    center: float = 0.0
    scale: float = 1.0
    kind: ClassVar[str] = "sigmoid"

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"sigmoid normalisation needs scale > 0; got {self.scale}.")

    def __call__(self, raw: Tensor) -> Tensor:
        return torch.sigmoid((raw - self.center) / self.scale)

    def output_range(self, raw_range: tuple[float, float]) -> tuple[float, float]:
        return (0.0, 1.0)


@dataclass(frozen=True)
class Prob:
    """reward = raw, which is already a probability in [0, 1] (yes-token scorers)."""

    kind: ClassVar[str] = "prob"

    def __call__(self, raw: Tensor) -> Tensor:
        return raw

    def output_range(self, raw_range: tuple[float, float]) -> tuple[float, float]:
        return (0.0, 1.0)


@dataclass(frozen=True)
class Target:
    """reward = 1 within ``tolerance`` of ``target``, falling linearly to 0 over a further ``falloff``.

    For counts with a preferred value, such as a completion's length: with target 200, tolerance 50 and
    falloff 100, raw 240 → 1, raw 300 → 0.5, raw 400 → 0 (and the same below the target).
    """

    target: float
    tolerance: float = 0.0
    falloff: float = 1.0
    kind: ClassVar[str] = "target"

    def __post_init__(self) -> None:
        if self.tolerance < 0 or self.falloff <= 0:
            raise ValueError(f"target normalisation needs tolerance >= 0 and falloff > 0; got tolerance "
                             f"{self.tolerance}, falloff {self.falloff}.")

    def __call__(self, raw: Tensor) -> Tensor:
        excess = ((raw - self.target).abs() - self.tolerance).clamp_min(0.0)
        return (1.0 - excess / self.falloff).clamp(0.0, 1.0)  # clamp keeps NaN ("does not apply") as NaN

    def output_range(self, raw_range: tuple[float, float]) -> tuple[float, float]:
        return (0.0, 1.0)


Normalizer = Identity | Affine | Sigmoid | Prob | Target
NORMALIZERS: dict[str, type] = {cls.kind: cls for cls in (Identity, Affine, Sigmoid, Prob, Target)}


def build_normalizer(spec: dict[str, Any] | None) -> Normalizer:
    """Build a rule from a card mapping such as ``{kind: affine, lo: 0, hi: 26}``; None means identity."""
    if not spec:
        return Identity()
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in NORMALIZERS:
        raise ValueError(unknown_id_message("normalisation", str(kind), NORMALIZERS))
    try:
        return NORMALIZERS[kind](**spec)
    except TypeError as err:
        raise ValueError(f"Bad parameters for {kind} normalisation {spec}: {err}") from None


def is_finite_range(r: tuple[float, float]) -> bool:
    return all(math.isfinite(x) for x in r)
