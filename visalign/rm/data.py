"""Reward-model training and evaluation data from a table (docs/methods.md#reward-models, "Data").

Two layouts, told apart by their columns, with image paths relative to the table's folder (or absolute):

* **pairs** — ``prompt, chosen, rejected`` and an optional ``tie`` column (1/true: the two are equally good; the
  order of a tie pair carries no meaning). Read by the offline pair reader
  (:func:`visalign.train.sources.pair_data.read_pairs`), which refuses pixel-identical pairs naming the rows.
* **pointwise** — ``prompt, image, label`` with a single good/bad label per image (1/0, true/false, yes/no,
  good/bad). Pairs are built SoliReward-style (:func:`visalign.rm.pairs.cross_prompt_pairs`): every good image ×
  every bad one, across prompts, seeded-subsampled to ``max_pairs``.

Every image goes into one ``[N, 3, H, W]`` tensor; a pair indexes two of them. Unreadable or missing images are
an error naming the row and the file: a reward model silently trained on fewer rows than asked is a worse bug
than a refusal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from visalign.media import MediaError, load_image, resize_to
from visalign.rm.pairs import IndexPair, cross_prompt_pairs
from visalign.scoring import read_table

POINTWISE_COLUMNS = ("prompt", "image", "label")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
_TRUE = {"1", "true", "yes", "good", "1.0"}
_FALSE = {"0", "false", "no", "bad", "0.0"}


class RmDataError(ValueError):
    """A reward-model table that cannot be used as given; the message names the table, the row and the fix."""


@dataclass
class RmData:
    """Images, their prompts and the pairs over them.

    Args:
        images: float32 ``[N, 3, H, W]`` in [0, 1].
        prompts: ``[N]`` prompt of each image.
        pairs: ``a`` preferred unless ``tie``.
        rows: the table row (0-based) of each pair (pairs layout) or of its ``a`` image (pointwise layout).
        layout: ``pairs`` or ``pointwise``.
        labels: bool ``[N]`` good/bad labels (pointwise layout only).
    """

    images: Tensor
    prompts: list[str]
    pairs: list[IndexPair]
    rows: list[int]
    layout: str
    labels: Tensor | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ties = sum(p.tie for p in self.pairs)
        return f"{len(self.images)} images, {len(self.pairs)} pairs ({ties} ties), {self.layout} layout"


def _flag(value: object, path: Path, row: int, column: str, default: bool | None = None) -> bool:
    """A boolean cell; an empty cell is ``default`` (None: required)."""
    text = "" if value is None else str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if not text and default is not None:
        return default
    raise RmDataError(f"{path}: row {row} has {column}={value!r}; use 1/0, true/false, yes/no or good/bad.")


def read_rm_table(path: str | os.PathLike[str], *, resolution: int | None = None, max_pairs: int | None = None,
                  ties: int = 0, seed: int = 0) -> RmData:
    """Read a pairs or pointwise table (see the module docstring).

    Args:
        path: a ``.jsonl`` or ``.csv`` file.
        resolution: resize every image to this square side in pixels; None needs one size throughout.
        max_pairs: pointwise layout: cap on the good × bad pairs (seeded subsample); None keeps all.
        ties: pointwise layout: same-label pairs to add as ties.
        seed: seeds the pointwise subsamples.

    Raises:
        RmDataError: unknown columns, a missing or unreadable image (row and file named), a bad label, mixed
            image sizes without ``resolution``, or no good (or no bad) image in a pointwise table.
        PairDataError: pairs layout problems, e.g. pixel-identical chosen and rejected (rows named).
    """
    path = Path(path)
    if not path.is_file():
        raise RmDataError(f"{path}: no such file; pass a .jsonl or .csv table of pairs or pointwise labels.")
    first = read_table(path)[:1]
    columns = set(first[0]) if first else set()
    if set(PAIR_COLUMNS) <= columns:
        return _read_pairs_layout(path, resolution)
    if set(POINTWISE_COLUMNS) <= columns:
        return _read_pointwise_layout(path, resolution, max_pairs, ties, seed)
    raise RmDataError(f"{path}: columns {sorted(columns)} fit neither layout; a pairs table needs "
                      f"{list(PAIR_COLUMNS)} (+ optional tie), a pointwise table {list(POINTWISE_COLUMNS)}.")


def _read_pairs_layout(path: Path, resolution: int | None) -> RmData:
    from visalign.train.sources.pair_data import read_pairs

    data = read_pairs(path, resolution=resolution)
    if data.skipped:
        s = data.skipped[0]
        raise RmDataError(f"{path}: {len(data.skipped)} row(s) unusable, first row {s.row} ({s.column}"
                          f"{', ' + s.path if s.path else ''}): {s.reason}. Fix or remove them.")
    images = torch.stack([im for r in data.records for im in (r.chosen, r.rejected)])
    prompts = [r.prompt for r in data.records for _ in range(2)]
    rows = [int(r.metadata["row"]) for r in data.records]
    pairs = [IndexPair(2 * k, 2 * k + 1, tie=_flag(r.metadata.get("tie"), path, rows[k], "tie", False))
             for k, r in enumerate(data.records)]
    return RmData(images, prompts, pairs, rows, "pairs")


def _read_pointwise_layout(path: Path, resolution: int | None, max_pairs: int | None, ties: int,
                           seed: int) -> RmData:
    images, prompts, labels = [], [], []
    for row, record in enumerate(read_table(path)):
        prompt = str(record.get("prompt") or "").strip()
        if not prompt:
            raise RmDataError(f"{path}: row {row} has an empty prompt.")
        file = Path(str(record.get("image") or "")).expanduser()
        file = file if file.is_absolute() else path.parent / file
        try:
            image = load_image(file)
        except MediaError as err:
            raise RmDataError(f"{path}: row {row}: {err} Fix the path (relative to the table's folder) or remove "
                              "the row.") from None
        images.append(resize_to(image, (resolution, resolution)) if resolution else image)
        prompts.append(prompt)
        labels.append(_flag(record.get("label"), path, row, "label"))
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        raise RmDataError(f"{path}: images come in {len(sizes)} sizes ({sorted(sizes)[:3]}); pass a resolution.")
    good = torch.tensor(labels)
    try:
        pairs = cross_prompt_pairs(good, max_pairs=max_pairs, ties=ties, seed=seed)
    except ValueError as err:
        raise RmDataError(f"{path}: {err} A pointwise table needs both good and bad images.") from None
    return RmData(torch.stack(images), prompts, pairs, [p.a for p in pairs], "pointwise", labels=good)
