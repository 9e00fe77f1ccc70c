"""The one scorer registry shared by the image, video and text sides.

>>> from visalign.scorers import get_scorer, list_scorers
>>> "brightness" in list_scorers()
True

Ids come from cards (``scorers/*.yaml``) and from ``@register_scorer`` on a Scorer subclass.
``get_scorer`` accepts an id, an import path ``"pkg.mod:Name"``, a callable or a Scorer instance and
always returns a :class:`Scorer`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from visalign.registry import Registry, UnknownIdError, import_object, is_import_path, unknown_id_message
from visalign.scorers.base import RawScore, ScoreBatch, ScoreOutput, Scorer, WeightsUnavailableError
from visalign.scorers.card import ScorerCard, add_card_dir, card_paths, load_card
from visalign.scorers.wrap import CallableScorer, CallableTextScorer

__all__ = ["RawScore", "ScoreBatch", "ScoreOutput", "Scorer", "ScorerCard", "WeightsUnavailableError",
           "CallableScorer", "CallableTextScorer", "add_card_dir", "get_scorer", "list_scorers", "register_scorer",
           "scorer_card"]

# Scorers registered in code (no card file): id → Scorer subclass with a ``default_card(id)`` classmethod.
SCORERS: Registry[type[Scorer]] = Registry("scorer")


def register_scorer(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator registering a Scorer subclass under ``name`` (it must define ``default_card``)."""
    return SCORERS.register(name)


def list_scorers() -> list[str]:
    """Every known scorer id (cards and code-registered), sorted."""
    return sorted(set(card_paths()) | set(SCORERS.list()))


def scorer_card(name: str) -> ScorerCard:
    """The card of a registered id or of a card file path; unknown ids raise with close matches and the known ids."""
    from_file = card_from_path(name)
    if from_file is not None:
        return from_file
    paths = card_paths()
    if name in paths:
        return load_card(name)
    if name in SCORERS:
        return SCORERS.get(name).default_card(name)  # type: ignore[attr-defined]
    raise UnknownIdError(unknown_id_message(
        "scorer", name, list_scorers(),
        " Other accepted forms: an import path 'pkg.module:Name', a callable (media, prompts) -> floats, or a "
        "Scorer instance. Add card folders with VISALIGN_CARD_PATH."))


def card_from_path(spec: str) -> ScorerCard | None:
    """The card of an explicit ``.yaml``/``.yml`` card file (what ``visalign rm train`` writes), else None."""
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return ScorerCard.from_file(path, require_stem=False)
    return None


def get_scorer(spec: str | Scorer | Callable[..., Any], *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, weights: dict[str, Any] | str | None = None,
               params: dict[str, Any] | None = None, modality: str = "image") -> Scorer:
    """Turn any scorer spec into a :class:`Scorer`.

    Args:
        spec: a registered id, the path of a card file (``runs/rm/card.yaml``), ``"pkg.module:Name"`` (a Scorer
            subclass or a callable), a callable
            ``(media, prompts, **kwargs) -> [B] floats`` (or ``(prompts, completions, **kwargs)`` for
            ``modality="text"``), or a Scorer instance (returned as is).
        device: device for weights and inputs.
        dtype: compute dtype (outputs are float32 regardless).
        weights: override where weights come from; a string is a local folder (``{"local_dir": ...}``).
        params: override mechanism parameters of the card.
        modality: modality of a wrapped plain callable.

    Returns:
        A Scorer whose weights load lazily on the first call.
    """
    if isinstance(spec, Scorer):
        return spec
    if isinstance(spec, str) and not is_import_path(spec):
        card = scorer_card(spec)
        if isinstance(weights, str):
            weights = {"local_dir": weights}
        card = card.with_overrides(weights=weights, params=params)
        cls = import_object(card.mechanism)
        if not (isinstance(cls, type) and issubclass(cls, Scorer)):
            raise TypeError(f"Card {card.id!r} names mechanism {card.mechanism!r}, which is not a Scorer subclass.")
        return cls(card, device=device, dtype=dtype)
    obj = import_object(spec) if isinstance(spec, str) else spec
    if isinstance(obj, type) and issubclass(obj, Scorer):
        card = obj.default_card(obj.__name__.lower())  # type: ignore[attr-defined]
        return obj(card.with_overrides(params=params), device=device, dtype=dtype)
    if isinstance(obj, type):  # a reward class such as OcrMatchReward: build it with the given params
        obj = obj(**(params or {}))
    if callable(obj):
        wrapper = CallableTextScorer if modality == "text" else CallableScorer
        return wrapper(obj, modality=modality, device=device)
    raise TypeError(f"Cannot build a scorer from {spec!r}: pass an id, 'pkg.module:Name', a callable or a Scorer.")
