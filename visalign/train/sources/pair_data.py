"""Offline preference pairs for Diffusion-DPO-style training: one prompt, a preferred and a dispreferred image.

Reads three kinds of source into memory as canonical tensors (float32 ``[3, H, W]`` in [0, 1], converted by
:mod:`visalign.media`):

- a ``.jsonl`` or ``.csv`` table whose image columns hold file paths, relative to the table's folder or absolute;
- a folder written by ``datasets.Dataset.save_to_disk`` or ``datasets.DatasetDict.save_to_disk``;
- a Hugging Face dataset id, loaded with ``datasets.load_dataset(id, split=split)``.

In ``datasets`` sources an image cell may be a ``datasets.Image`` feature (read undecoded, so one corrupt image
is skipped instead of aborting the read), a ``{"bytes": ..., "path": ...}`` dict, raw encoded bytes, a PIL image
or a path string (relative to the current directory). Rows come either as ``chosen``/``rejected`` columns
(Diffusion-DPO, Wallace et al. 2023, arXiv:2311.12908) or, with ``label_column``, as Pick-a-Pic-style rows of two
images and a preference label (Kirstain et al. 2023, arXiv:2305.01569).

Unreadable images and empty prompts are listed in :attr:`PairData.skipped` and left out, as ``visalign score``
does with unreadable files; a pair whose two images are identical carries no preference and is refused.
``datasets`` is imported only for folder and hub sources (the ``[data]`` extra).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from visalign.media import MediaError, load_image, pil_to_tensor, resize_to
from visalign.scoring import InputError, read_table

TABLE_SUFFIXES = (".jsonl", ".csv")
_SUMMARY_SKIPPED = 3  # skipped rows spelled out in the one-line summary
_REFUSED_NAMED = 5  # identical pairs named in the refusal


class PairDataError(ValueError):
    """A preference-pair source that cannot be used as given; the message names the source and what to change."""


@dataclass
class PairRecord:
    """One preference pair.

    Args:
        prompt: the prompt both images were generated for (never empty).
        chosen (`Tensor`): the preferred image, float32 in [0, 1], ``[3, H, W]``.
        rejected (`Tensor`): the dispreferred image, float32 in [0, 1], the same shape as ``chosen``.
        metadata: the row's other columns as read (a label column included), plus ``"row"``: the row's 0-based
            index in the source.
    """

    prompt: str
    chosen: Tensor
    rejected: Tensor
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkippedPair:
    """A source row left out: ``column`` is the column at fault, ``path`` the image file when there is one."""

    row: int
    column: str
    path: str | None
    reason: str


@dataclass
class PairData:
    """The pairs read from ``source``, in source order, and the rows skipped on the way."""

    records: list[PairRecord]
    skipped: list[SkippedPair]
    source: str

    def summary(self) -> str:
        """One line: ``"N pairs read from SOURCE, K skipped"`` and the first few skipped rows with their reasons."""
        head = f"{len(self.records)} pairs read from {self.source}, {len(self.skipped)} skipped"
        if not self.skipped:
            return head
        parts = []
        for s in self.skipped[:_SUMMARY_SKIPPED]:
            where = f"{s.column}, {s.path}" if s.path else s.column
            parts.append(f"row {s.row} ({where}): {s.reason}")
        more = len(self.skipped) - _SUMMARY_SKIPPED
        tail = f"; and {more} more" if more > 0 else ""
        return f"{head}: " + "; ".join(parts) + tail


@dataclass
class _Identical:
    row: int
    why: str


@dataclass
class _Source:
    rows: Iterable[dict[str, Any]]
    columns: list[str]
    base_dir: Path  # relative image paths are resolved against it
    name: str


# ---------------------------------------------------------------- the reader


def read_pairs(source: str | os.PathLike[str], *, resolution: int | None = None, split: str = "train",
               prompt_column: str = "prompt", chosen_column: str = "chosen", rejected_column: str = "rejected",
               label_column: str | None = None, limit: int | None = None) -> PairData:
    """Read preference pairs from a table file, a ``datasets`` folder or a Hugging Face dataset id.

    Every record holds decoded pixels, so the whole source sits in memory: a 512 px pair is about 6 MB.

    Args:
        source: a ``.jsonl``/``.csv`` file, a ``save_to_disk`` folder, or a hub dataset id (tried when no local
            file or folder of that name exists).
        resolution: side in pixels; both images of every pair are resized to ``resolution × resolution``
            (antialiased bilinear, aspect ratio not kept). ``None`` keeps the source size; a rejected image of
            another size than its chosen one is then resized to the chosen one's size.
        split: the split to read from a ``DatasetDict`` folder or a hub dataset.
        prompt_column: the column holding the prompt.
        chosen_column: the column holding the preferred image; with ``label_column``, image 0.
        rejected_column: the column holding the dispreferred image; with ``label_column``, image 1.
        label_column: for rows of two images and a label (Pick-a-Pic's ``label_0``): the label is the probability
            that image 0 (``chosen_column``) is preferred. Above 0.5 image 0 becomes ``chosen``; below 0.5 image 1
            does; exactly 0.5 is a tie and the row is skipped (reason ``"tie"``), as is a label outside [0, 1].
        limit: read only the first ``limit`` rows of the source (before any is skipped).

    Returns:
        `PairData`: ``records`` (each ``chosen``/``rejected`` float32 in [0, 1], ``[3, H, W]``, one shape across
        all records), ``skipped`` rows with reasons (missing, empty or corrupt image files, empty prompts, ties),
        and ``source``.

    Raises:
        PairDataError: a required column is missing (the message lists the columns present and the keyword to
            set); a pair's two images are the same file or pixel-identical (up to 5 rows named); every row was
            skipped; image sizes differ across rows and ``resolution`` is ``None``; or the source cannot be found.
        ImportError: a folder or hub source and ``datasets`` is not installed (the ``[data]`` extra).
    """
    if resolution is not None and resolution <= 0:
        raise PairDataError(f"resolution must be a positive number of pixels; got {resolution}.")
    if limit is not None and limit <= 0:
        raise PairDataError(f"limit must be a positive number of rows; got {limit}.")
    if chosen_column == rejected_column:
        raise PairDataError(f"chosen_column and rejected_column are both {chosen_column!r}; a pair needs two "
                            "image columns.")
    src = _open_source(source, split=split, image_columns=(chosen_column, rejected_column), limit=limit)
    _check_columns(src, prompt_column=prompt_column, chosen_column=chosen_column, rejected_column=rejected_column,
                   label_column=label_column)
    records: list[PairRecord] = []
    skipped: list[SkippedPair] = []
    identical: list[_Identical] = []
    columns = (prompt_column, chosen_column, rejected_column, label_column)
    for index, row in enumerate(src.rows):
        result = _read_row(index, row, columns, src.base_dir, resolution)
        if isinstance(result, PairRecord):
            records.append(result)
        elif isinstance(result, SkippedPair):
            skipped.append(result)
        else:
            identical.append(result)
    data = PairData(records, skipped, src.name)
    if identical:
        raise PairDataError(_refusal(src.name, identical))
    if not records:
        raise PairDataError(f"No usable pair: {data.summary()}.")
    _check_one_shape(records, src.name)
    return data


def _read_row(index: int, row: dict[str, Any], columns: tuple[str, str, str, str | None], base_dir: Path,
              resolution: int | None) -> PairRecord | SkippedPair | _Identical:
    """One source row → a record, the reason it is skipped, or why its two images are the same."""
    prompt_column, chosen_column, rejected_column, label_column = columns
    prompt = row.get(prompt_column)
    if prompt is None or not str(prompt).strip():
        return SkippedPair(index, prompt_column, None, "empty prompt")
    if label_column is not None:
        label = _label(row.get(label_column))
        if label is None:
            return SkippedPair(index, label_column, None,
                               f"label {row.get(label_column)!r} is not a number in [0, 1]")
        if label == 0.5:
            return SkippedPair(index, label_column, None, "tie")
        if label < 0.5:
            chosen_column, rejected_column = rejected_column, chosen_column
    chosen_value, rejected_value = row.get(chosen_column), row.get(rejected_column)
    same = _same_source(chosen_value, rejected_value, base_dir)
    if same:
        return _Identical(index, same)
    images = []
    for column, value in ((chosen_column, chosen_value), (rejected_column, rejected_value)):
        try:
            images.append(_to_tensor(value, base_dir))
        except MediaError as err:
            path = _path_of(value, base_dir)
            return SkippedPair(index, column, path, _reason(err, path))
    chosen, rejected = images
    if chosen.shape == rejected.shape and torch.equal(chosen, rejected):
        return _Identical(index, "pixel-identical images")
    size = (resolution, resolution) if resolution is not None else tuple(chosen.shape[-2:])
    metadata = {k: v for k, v in row.items() if k not in (prompt_column, chosen_column, rejected_column)}
    metadata["row"] = index
    return PairRecord(str(prompt), resize_to(chosen, size), resize_to(rejected, size), metadata)


def _label(value: Any) -> float | None:
    try:
        label = float(value)
    except (TypeError, ValueError):
        return None
    return label if math.isfinite(label) and 0.0 <= label <= 1.0 else None


def _refusal(name: str, identical: list[_Identical]) -> str:
    named = "; ".join(f"row {i.row} ({i.why})" for i in identical[:_REFUSED_NAMED])
    more = len(identical) - _REFUSED_NAMED
    tail = f"; and {more} more" if more > 0 else ""
    return (f"{name}: {len(identical)} pair(s) have identical chosen and rejected images: {named}{tail}. Such a "
            "pair carries no preference; remove these rows from the file.")


def _check_one_shape(records: list[PairRecord], name: str) -> None:
    first: dict[tuple[int, ...], int] = {}
    for r in records:
        first.setdefault(tuple(r.chosen.shape), r.metadata["row"])
    if len(first) > 1:
        seen = ", ".join(f"{h}×{w} (row {row})" for (_, h, w), row in list(first.items())[:4])
        raise PairDataError(f"{name}: images come in {len(first)} sizes, e.g. {seen}; pass resolution= (pixels) "
                            "to resize every pair to one square size.")


# ---------------------------------------------------------------- images


def _to_tensor(value: Any, base_dir: Path) -> Tensor:
    """One image cell (path, PIL image, encoded bytes, or ``{"bytes", "path"}``) → float32 ``[3, H, W]``."""
    if isinstance(value, Image.Image):
        return pil_to_tensor(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return _decode_bytes(bytes(value["bytes"]), value.get("path") or "<bytes>")
        if value.get("path"):
            return load_image(_resolve(value["path"], base_dir))
        raise MediaError("the image cell has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(value), "<bytes>")
    if isinstance(value, (str, os.PathLike)):
        if not str(value).strip():
            raise MediaError("no image path (empty value)")
        return load_image(_resolve(value, base_dir))
    if value is None:
        raise MediaError("no image (empty value)")
    raise MediaError(f"unsupported image value of type {type(value).__name__}; want a path, encoded bytes, "
                     "a {'bytes', 'path'} dict or a PIL image")


def _decode_bytes(data: bytes, label: str) -> Tensor:
    # Mirrors visalign.media.load_image for bytes in memory (media has no bytes reader yet); the pixels still go
    # through media's pil_to_tensor, and media's LOAD_TRUNCATED_IMAGES=False makes truncated data fail here too.
    if not data:
        raise MediaError(f"{label}: the image bytes are empty.")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return pil_to_tensor(img)
    except UnidentifiedImageError:
        raise MediaError(f"{label}: not a readable image (corrupt, or an unsupported format).") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"{label}: cannot decode image ({err}); the data is probably truncated or corrupt.") from None


def _resolve(path: str | os.PathLike[str], base_dir: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else base_dir / path


def _path_of(value: Any, base_dir: Path) -> str | None:
    """The file an image cell names, for reports; None for pixels held in memory."""
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        return str(_resolve(value["path"], base_dir))
    if isinstance(value, (str, os.PathLike)) and str(value).strip():
        return str(_resolve(value, base_dir))
    return None


def _same_source(chosen: Any, rejected: Any, base_dir: Path) -> str | None:
    """Why two image cells are the same image before decoding either (same file, same bytes), else None."""
    chosen_path, rejected_path = _path_of(chosen, base_dir), _path_of(rejected, base_dir)
    if chosen_path and rejected_path and Path(chosen_path).resolve() == Path(rejected_path).resolve():
        return f"same file {chosen_path}"
    chosen_bytes, rejected_bytes = _bytes_of(chosen), _bytes_of(rejected)
    if chosen_bytes and chosen_bytes == rejected_bytes:
        return "same encoded bytes"
    return None


def _bytes_of(value: Any) -> bytes | None:
    if isinstance(value, dict) and value.get("bytes"):
        return bytes(value["bytes"])
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return None


def _reason(err: MediaError, path: str | None) -> str:
    # media's messages open with the path; the path has its own field in SkippedPair.
    text = " ".join(str(err).split())
    for prefix in (f"{path}: ", "<bytes>: "):
        text = text.removeprefix(prefix)
    return text.rstrip(".")


# ---------------------------------------------------------------- sources


def _open_source(source: str | os.PathLike[str], *, split: str, image_columns: tuple[str, str],
                 limit: int | None) -> _Source:
    path = Path(source).expanduser()
    if path.is_file():
        return _open_table(path, limit)
    if path.is_dir():
        return _open_saved(path, split, image_columns, limit)
    if isinstance(source, os.PathLike) or path.suffix.lower() in TABLE_SUFFIXES:
        raise PairDataError(f"{source}: no such file or folder.")
    return _open_hub(str(source), split, image_columns, limit)


def _open_table(path: Path, limit: int | None) -> _Source:
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise PairDataError(f"{path}: pair tables must be .jsonl or .csv; for other formats save a datasets "
                            "folder (Dataset.save_to_disk) and pass the folder.")
    try:
        rows = read_table(path)
    except InputError as err:
        raise PairDataError(str(err)) from None
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise PairDataError(f"{path}: the table has no rows.")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PairDataError(f"{path}: row {i} is a JSON {type(row).__name__}, not an object; each line must be "
                                "one object such as {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}.")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return _Source(rows, columns, path.parent, str(path))


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError("Reading a datasets folder or a Hugging Face dataset id needs the datasets package; "
                          "install it with pip install \"visalign[data]\", or pass a .jsonl or .csv file.") from None
    return datasets


def _open_saved(path: Path, split: str, image_columns: tuple[str, str], limit: int | None) -> _Source:
    datasets = _import_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise PairDataError(f"{path}: a folder, but not one written by datasets' save_to_disk; pass such a folder, "
                            "a .jsonl or .csv file, or a Hugging Face dataset id.") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise PairDataError(f"{path}: no split {split!r}; splits present: {sorted(loaded)}. Set split=.")
        loaded = loaded[split]
    return _dataset_source(datasets, loaded, image_columns, limit, Path.cwd(), str(path))


def _open_hub(dataset_id: str, split: str, image_columns: tuple[str, str], limit: int | None) -> _Source:
    datasets = _import_datasets()
    try:
        loaded = datasets.load_dataset(dataset_id, split=split)
    except (OSError, datasets.exceptions.DatasetsError) as err:  # offline, not found, no access: all OSErrors
        raise PairDataError(f"{dataset_id!r}: no local file or folder of that name, and the Hugging Face dataset "
                            f"could not be loaded ({type(err).__name__}: {err}). Pass a local .jsonl/.csv file or a "
                            "save_to_disk folder, or go online (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE).") from None
    return _dataset_source(datasets, loaded, image_columns, limit, Path.cwd(), dataset_id)


def _dataset_source(datasets: Any, ds: Any, image_columns: tuple[str, str], limit: int | None, base_dir: Path,
                    name: str) -> _Source:
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    for column in image_columns:
        # Undecoded, so a corrupt image becomes a skipped row here instead of an exception inside datasets.
        if isinstance(ds.features.get(column), datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
    if len(ds) == 0:
        raise PairDataError(f"{name}: the dataset has no rows.")
    return _Source(ds, list(ds.column_names), base_dir, name)  # iterating a Dataset yields one dict per row


def _check_columns(src: _Source, *, prompt_column: str, chosen_column: str, rejected_column: str,
                   label_column: str | None) -> None:
    wanted = {prompt_column: ("prompt_column=", "the prompt"),
              chosen_column: ("chosen_column=", "image 0" if label_column else "the preferred image"),
              rejected_column: ("rejected_column=", "image 1" if label_column else "the dispreferred image")}
    if label_column is not None:
        wanted[label_column] = ("label_column=", "the preference label")
    missing = [(c, kw, what) for c, (kw, what) in wanted.items() if c not in src.columns]
    if missing:
        problems = "; ".join(f"no column {c!r} (set {kw} to the column holding {what})" for c, kw, what in missing)
        raise PairDataError(f"{src.name}: {problems}. Columns present: {src.columns}.")
