"""Plain callables as scorers: ``(media, prompts, **kwargs) -> [B]`` and TRL-style text rewards.

A reward that returns None (or NaN) for a sample abstains on it; the combiner skips it
(docs/extending.md#scorers-and-rewards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from visalign.scorers.base import RawScore, ScoreBatch, Scorer
from visalign.scorers.card import ScorerCard


def _name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__).lower().replace("_", "-")


def _as_scores(values: Any, n: int, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        out = values.float().reshape(-1)
    else:
        out = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
    if out.shape[0] != n:
        raise ValueError(f"Callable scorer {name!r} returned {out.shape[0]} values for {n} samples.")
    return out


class CallableScorer(Scorer):
    """Wrap ``fn(media, prompts, **kwargs) -> [B]`` (tensor, list or array) as an image/video scorer.

    The callable receives ``references`` and ``metadata`` as keyword arguments when the batch has them.
    Its values are used as-is (identity normalisation); it is differentiable only if it says so.
    """

    def __init__(self, fn: Callable[..., Any], *, modality: str = "image", device: str | torch.device = "cpu",
                 differentiable: bool = False, name: str | None = None):
        card = ScorerCard(id=name or _name_of(fn), mechanism=f"{type(self).__module__}:{type(self).__name__}",
                          modality=modality, differentiable=differentiable, needs=("prompt",))
        super().__init__(card, device=device)
        self.fn = fn

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        kwargs: dict[str, Any] = {}
        if batch.references is not None:
            kwargs["references"] = batch.references
        if batch.metadata is not None:
            kwargs["metadata"] = batch.metadata
        return RawScore(_as_scores(self.fn(batch.media, batch.prompts, **kwargs), len(batch), self.id))


class CallableTextScorer(Scorer):
    """Wrap a TRL-style reward ``fn(prompts=..., completions=..., **columns) -> list[float | None]`` as a text scorer.

    As TRL's trainers do, the call is by keyword and every metadata column (the prompt table's other columns)
    arrives as a keyword holding one value per sample (None where a sample lacks it); the per-sample dicts also
    arrive whole as ``metadata`` unless a column has that name.
    """

    def __init__(self, fn: Callable[..., Any], *, modality: str = "text", device: str | torch.device = "cpu",
                 name: str | None = None):
        card = ScorerCard(id=name or _name_of(fn), mechanism=f"{type(self).__module__}:{type(self).__name__}",
                          modality="text", needs=("prompt",))
        super().__init__(card, device=device)
        self.fn = fn

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        kwargs: dict[str, Any] = {}
        if batch.metadata is not None:
            keys = dict.fromkeys(k for row in batch.metadata for k in row if k not in ("prompts", "completions"))
            kwargs = {"metadata": batch.metadata, **{k: [row.get(k) for row in batch.metadata] for k in keys}}
        return RawScore(_as_scores(self.fn(prompts=batch.prompts, completions=batch.texts, **kwargs), len(batch),
                                   self.id))
