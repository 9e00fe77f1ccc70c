"""Tiny-builder for ``DistributionalScorer`` cards: a private exemplar cache, and a tiny encoder when needed.

Colour cards need no weights (``ColorHistogramEmbedder``); their exemplar statistics are cached under the test's
tiny folder instead of ``~/.cache``. Cards whose embedder is a scorer id (``clip-vit-b32``) get that scorer's
tiny weights from its own builder in ``tests.tiny.BUILDERS``, passed on as ``embedder_weights``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from visalign.registry import import_object
from visalign.scorers import ScorerCard, scorer_card
from visalign.scorers.embedders import EMBEDDERS


def build_tiny_distributional(card: ScorerCard, folder: Path) -> dict[str, Any]:
    params: dict[str, Any] = {"cache_dir": str(folder / "exemplar-cache")}
    embedder = card.params.get("embedder", "color-histogram")
    if isinstance(embedder, str) and embedder not in EMBEDDERS:
        from tests.tiny import BUILDERS

        embedder_card = scorer_card(embedder)
        builder = BUILDERS.get(embedder_card.mechanism)
        if builder is None:
            pytest.skip(f"{card.id}: embedder {embedder!r} ({embedder_card.mechanism}) has no tiny builder in "
                        "tests/tiny/BUILDERS, so it cannot be built offline")
        overrides = import_object(builder)(embedder_card, folder)
        params["embedder_weights"] = overrides.get("weights", {})
        if overrides.get("params"):
            params["embedder_params"] = overrides["params"]
    return {"params": params}
