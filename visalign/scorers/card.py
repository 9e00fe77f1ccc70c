"""Scorer cards: one YAML file per scorer variant (docs/extending.md#scorers-and-rewards "variants are data").

Built-in cards live in the repository's ``scorers/`` folder, installed as the package data
``visalign.cards``. Users add their own folders with ``VISALIGN_CARD_PATH`` (``os.pathsep``-separated)
or :func:`add_card_dir`. A card's file stem is its id.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from visalign.scorers.normalize import Normalizer, build_normalizer

_EXTRA_DIRS: list[Path] = []
_CARD_KEYS = {"id", "mechanism", "description", "modality", "kind", "needs", "differentiable", "range",
              "normalize", "weights", "params", "references"}


@dataclass(frozen=True)
class ScorerCard:
    """A registered scorer variant.

    Attributes:
        id: lower-case, hyphenated, never changes once released (``clip-vit-b32``).
        mechanism: ``"module:Class"`` of the :class:`~visalign.scorers.base.Scorer` subclass.
        modality: ``image`` | ``video`` | ``text``.
        kind: ``pointwise`` | ``pairwise-vs-reference`` | ``set-level``.
        needs: subset of {prompt, reference, exemplars, question}.
        differentiable: whether ``grad=True`` can return gradients to the input pixels.
        raw_range: closed interval of the native score (may be infinite).
        normalize: the card mapping of the reward rule (see ``visalign.scorers.normalize``).
        weights: where weights come from (``hub_id``, ``local_dir``, ``file``, backend names ...).
        params: mechanism parameters (templates, modes, constants with their source named in the card).
        source: the file the card was read from, for messages.
    """

    id: str
    mechanism: str
    modality: str = "image"
    kind: str = "pointwise"
    needs: tuple[str, ...] = ("prompt",)
    differentiable: bool = False
    raw_range: tuple[float, float] = (float("-inf"), float("inf"))
    normalize: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        from visalign.scorers.base import KINDS, MODALITIES, NEEDS

        where = f" in card {self.source or self.id}"
        if self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r}{where} must be one of {MODALITIES}.")
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r}{where} must be one of {KINDS}.")
        bad = set(self.needs) - set(NEEDS)
        if bad:
            raise ValueError(f"needs {sorted(bad)}{where} are not among {NEEDS}.")
        if self.raw_range[0] > self.raw_range[1]:
            raise ValueError(f"range {self.raw_range}{where} must be [low, high].")
        self.normalizer  # noqa: B018 -- validate the rule now, not at the first score

    @cached_property
    def normalizer(self) -> Normalizer:
        return build_normalizer(self.normalize)

    def with_overrides(self, *, weights: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
                       **fields: Any) -> ScorerCard:
        """A copy with ``weights``/``params`` merged key by key and other fields replaced."""
        return replace(self, weights={**self.weights, **(weights or {})}, params={**self.params, **(params or {})},
                       **fields)

    def resolve_path(self, spec: str | os.PathLike[str]) -> Path:
        """A path named in this card: absolute as is; relative against the folder above the card's folder (the
        repository root for built-in cards), then the working directory. The first that exists wins.

        Raises:
            FileNotFoundError: naming the card, the path and every place tried.
        """
        path = Path(spec).expanduser()
        if path.is_absolute():
            return path
        candidates = ([Path(self.source).resolve().parent.parent / path] if self.source else [])
        candidates.append(Path.cwd() / path)
        for candidate in candidates:
            if candidate.exists():
                return candidate
        tried = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(f"Path {str(spec)!r} of scorer {self.id!r} not found (tried {tried}). "
                                "Pass an absolute path instead.")

    @property
    def weights_source(self) -> str:
        """A short human description of where weights come from (for ``visalign scorers list``)."""
        w = self.weights
        for key in ("local_dir", "file", "hub_id", "pretrained", "model"):
            if key in w:
                return f"{key}={w[key]}"
        return "none (rule)"

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "") -> ScorerCard:
        unknown = set(data) - _CARD_KEYS
        if unknown:
            raise ValueError(f"Unknown key(s) {sorted(unknown)} in card {source}; allowed: {sorted(_CARD_KEYS)}.")
        if "id" not in data or "mechanism" not in data:
            raise ValueError(f"Card {source} must set 'id' and 'mechanism'.")
        lo, hi = data.get("range", [float("-inf"), float("inf")])
        return cls(id=str(data["id"]), mechanism=str(data["mechanism"]), modality=data.get("modality", "image"),
                   kind=data.get("kind", "pointwise"), needs=tuple(data.get("needs", ["prompt"])),
                   differentiable=bool(data.get("differentiable", False)), raw_range=(float(lo), float(hi)),
                   normalize=dict(data.get("normalize") or {}), weights=dict(data.get("weights") or {}),
                   params=dict(data.get("params") or {}), description=str(data.get("description", "")).strip(),
                   source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, require_stem: bool = True) -> ScorerCard:
        """Read a card file; ``require_stem`` (card folders) insists the file is named ``<id>.yaml``, which an
        explicit card path (``get_scorer("runs/rm/card.yaml")``) need not be."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"Card {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"Card {path} must be a YAML mapping.")
        card = cls.from_mapping(data, source=str(path))
        if require_stem and card.id != path.stem:
            raise ValueError(f"Card {path} declares id {card.id!r}; the file must be named {card.id}.yaml.")
        return card


def package_data_dir(package: str, source_folder: str) -> Path:
    """Folder of shipped data: the installed package ``package``, or ``source_folder`` of a source checkout.

    A checkout run in place (``python -m visalign`` from the repository root) imports ``visalign`` from the
    working tree, where ``visalign.cards`` is not a sub-folder, so fall back to the repository layout.
    """
    try:
        # Cards are data folders without __init__.py (namespace packages): read the folder from __path__.
        return Path(next(iter(importlib.import_module(package).__path__)))
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[2] / source_folder
        if folder.is_dir():
            return folder
        raise


def builtin_card_dir() -> Path:
    return package_data_dir("visalign.cards", "scorers")


def add_card_dir(path: str | os.PathLike[str]) -> None:
    """Make the cards in ``path`` (``*.yaml``) available to :func:`get_scorer` in this process."""
    p = Path(path)
    if not p.is_dir():
        raise NotADirectoryError(f"Card folder {p} does not exist.")
    if p not in _EXTRA_DIRS:
        _EXTRA_DIRS.append(p)


def card_dirs() -> list[Path]:
    env = [Path(p) for p in os.environ.get("VISALIGN_CARD_PATH", "").split(os.pathsep) if p]
    return [builtin_card_dir(), *env, *_EXTRA_DIRS]


def card_paths() -> dict[str, Path]:
    """id → card file over every card folder; a later folder may not silently shadow an earlier id."""
    found: dict[str, Path] = {}
    for folder in card_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if path.stem in found:
                raise ValueError(f"Scorer id {path.stem!r} is defined twice: {found[path.stem]} and {path}.")
            found[path.stem] = path
    return found


def load_card(name: str) -> ScorerCard:
    return ScorerCard.from_file(card_paths()[name])
