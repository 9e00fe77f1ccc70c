"""Tiny-builder for ``ServedScorer`` cards: one shared ``visalign serve`` server on 127.0.0.1 (port 0) serving the
brightness scorer, so the scorer contract runs against a real server over real sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_SHARED: Any = None


def build_tiny_served(card: Any, folder: Path) -> dict[str, Any]:
    global _SHARED
    if _SHARED is None:
        from visalign.scorers import get_scorer
        from visalign.serving.server import RewardServer, ServeConfig

        _SHARED = RewardServer({"brightness": get_scorer("brightness")}, ServeConfig(port=0)).start()
    return {"weights": {"base_url": _SHARED.url, "scorer": "brightness"}, "params": {"timeout_s": 10.0}}
