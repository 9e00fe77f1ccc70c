"""Tiny random-init weights for every scorer mechanism, written offline into a folder.

``BUILDERS`` maps a mechanism (``"module:Class"`` as named in cards) to ``"tests.tiny.<file>:<function>"``.
Each builder is ``build(card, folder: Path) -> dict`` returning overrides for ``get_scorer``
(``{"weights": {...}, "params": {...}}``); it writes its files once under ``folder`` and reuses them.
Mechanisms that need no weights (rules, wrapped callables) have no entry.
"""

from __future__ import annotations

from pathlib import Path

from visalign.registry import import_object
from visalign.scorers import Scorer, get_scorer, scorer_card

BUILDERS: dict[str, str] = {
    "visalign.scorers.clip:ClipScorer": "tests.tiny.clip:build_clip_scorer",
    "visalign.scorers.distributional:DistributionalScorer": "tests.tiny.distributional:build_tiny_distributional",
    "visalign.scorers.remote:RemoteYesScorer": "tests.tiny.remote:build_tiny_remote",
    "visalign.scorers.remote:ServedScorer": "tests.tiny.served:build_tiny_served",
    "visalign.scorers.embedding_head:EmbeddingHeadScorer": "tests.tiny.clip:build_embedding_head_scorer",
    "visalign.scorers.text:SequenceClassificationScorer": "tests.tiny.text:build_sequence_classifier",
    "visalign.scorers.vlm_yes:VlmYesScorer": "tests.tiny.vlm:build_vlm_yes",
}


def build_tiny_scorer(name: str, folder: Path) -> Scorer:
    card = scorer_card(name)
    builder_path = BUILDERS.get(card.mechanism)
    if builder_path is None:
        return get_scorer(name)
    overrides = import_object(builder_path)(card, Path(folder))
    return get_scorer(name, **overrides)
