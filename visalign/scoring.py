"""Score folders of media files, or a table of text completions, with one or more scorers, streaming, in batches.

This is the library behind ``visalign score``: it pairs files with prompts (a prompt file, or a captions
table), loads media batch by batch (memory stays flat however many files there are), reports and skips
unreadable files, scores each batch with every scorer and yields one row per good file. Text scorers read a
``prompt``/``completion`` table instead (:func:`collect_text_items`), through the same scorer objects a text recipe
uses.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from visalign.media import MediaError, list_images, list_media, load_image, load_video
from visalign.scorers import ScoreBatch, Scorer


class InputError(ValueError):
    """A bad input file (prompts, captions, folders); the message names the file and what to change."""


@dataclass
class MediaItem:
    """One file to score with its prompt, optional reference file and metadata."""

    path: Path
    prompt: str = ""
    reference: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> dict[str, Any]:
        """The leading output columns of this item's row."""
        return {"file": str(self.path), "prompt": self.prompt}


@dataclass
class TextItem:
    """One completion to score: row ``index`` (1-based) of a table, its prompt and the table's other columns."""

    index: int
    prompt: str
    completion: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> dict[str, Any]:
        return {"row": self.index, "prompt": self.prompt, "completion": self.completion}


MEDIA_COLUMNS = ("file", "prompt")
TEXT_COLUMNS = ("row", "prompt", "completion")


@dataclass
class ScoredRow:
    """Scores of one file: ``rewards[id]`` and ``raws[id]`` per scorer (NaN = does not apply)."""

    item: MediaItem | TextItem
    rewards: dict[str, float]
    raws: dict[str, float]


@dataclass
class SkippedFile:
    path: Path
    reason: str


# ---------------------------------------------------------------- reading the inputs


def read_text_lines(path: str | os.PathLike[str]) -> list[str]:
    """Lines of a UTF-8 text file (trailing newline stripped, blank last line ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{path}: not valid UTF-8 (byte {err.start}, line {line}). Re-save it as UTF-8, e.g. "
                         f"iconv -f latin1 -t utf-8 {path} > fixed.txt") from None
    lines = text.splitlines()
    return lines


def read_prompts_file(path: str | os.PathLike[str], n_files: int) -> list[str]:
    """One prompt per line, paired in order with the sorted media files; the counts must match."""
    lines = read_text_lines(path)
    if len(lines) != n_files:
        raise InputError(f"{path}: has {len(lines)} prompt lines but the folder has {n_files} media files; "
                         "give exactly one line per file (in sorted file-name order), or use --captions with "
                         "a 'file' column.")
    return lines


def read_table(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` (one JSON object per line) or ``.csv`` (with a header) file."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        rows = []
        for i, line in enumerate(read_text_lines(path), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}: line {i} is not valid JSON ({err.msg}).") from None
        return rows
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(read_text_lines(path)))
    raise InputError(f"{path}: tables must be .jsonl or .csv.")


def read_captions_table(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """A JSONL or CSV table with a ``file`` column and a ``prompt`` (or ``caption``) column → file name → row."""
    rows = read_table(path)
    table: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "file" not in row:
            raise InputError(f"{path}: row {i} has no 'file' field; every row needs 'file' and 'prompt'.")
        row = dict(row)
        row["prompt"] = row.pop("prompt", row.pop("caption", ""))
        table[Path(str(row["file"])).name] = row
    return table


def collect_items(media_dir: str | os.PathLike[str], modality: str = "image", prompts_file: str | None = None,
                  captions_file: str | None = None, references_dir: str | None = None) -> list[MediaItem]:
    """Pair every media file in ``media_dir`` with its prompt, reference and metadata."""
    files = list_media(media_dir, modality)
    if prompts_file and captions_file:
        raise InputError("Pass --prompts or --captions, not both.")
    prompts = [""] * len(files)
    metadata: list[dict[str, Any]] = [{} for _ in files]
    if prompts_file:
        prompts = read_prompts_file(prompts_file, len(files))
    elif captions_file:
        table = read_captions_table(captions_file)
        missing = [f.name for f in files if f.name not in table]
        if missing:
            raise InputError(f"{captions_file}: no caption for {len(missing)} file(s), e.g. {missing[:3]}.")
        prompts = [str(table[f.name]["prompt"]) for f in files]
        metadata = [{k: v for k, v in table[f.name].items() if k not in ("file", "prompt")} for f in files]
    references: list[Path | None] = [None] * len(files)
    if references_dir:
        refs = list_images(references_dir)
        if not refs:
            raise InputError(f"{references_dir}: no reference images found.")
        by_stem = {r.stem: r for r in refs}
        if len(refs) == 1:
            references = [refs[0]] * len(files)
        else:
            missing = [f.name for f in files if f.stem not in by_stem]
            if missing:
                raise InputError(f"{references_dir}: no reference with the same name stem as {missing[:3]}; give "
                                 "one reference per file (same stem) or a single reference for all.")
            references = [by_stem[f.stem] for f in files]
    return [MediaItem(f, p, r, m) for f, p, r, m in zip(files, prompts, references, metadata, strict=True)]


def collect_text_items(path: str | os.PathLike[str]) -> list[TextItem]:
    """Rows of a ``.jsonl``/``.csv`` table with ``prompt`` and ``completion`` columns (TRL's names; ``completion``
    may be empty, which text scorers score like any other string). Other columns become metadata, which TRL-style
    reward functions receive as keyword columns."""
    rows = read_table(path)
    if not rows:
        raise InputError(f"{path}: the table has no rows; give one row per completion with 'prompt' and "
                         "'completion'.")
    items = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "completion" not in row or "prompt" not in row:
            have = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise InputError(f"{path}: row {i} needs 'prompt' and 'completion' columns (has {have}).")
        completion = row["completion"]
        if not isinstance(completion, str):
            raise InputError(f"{path}: row {i}: 'completion' must be a string, got {type(completion).__name__}.")
        meta = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
        items.append(TextItem(i, str(row["prompt"]), completion, meta))
    return items


# ---------------------------------------------------------------- scoring


def _load(item: MediaItem, modality: str, max_frames: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    media = load_video(item.path, max_frames) if modality == "video" else load_image(item.path)
    ref = load_image(item.reference) if item.reference is not None else None
    return media, ref


def _batches(items: Sequence[MediaItem], size: int) -> Iterator[Sequence[MediaItem]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def score_items(scorers: Sequence[Scorer], items: Sequence[MediaItem], *, modality: str = "image",
                batch_size: int = 16, strict: bool = False, max_frames: int | None = None,
                skipped: list[SkippedFile] | None = None) -> Iterator[ScoredRow]:
    """Yield one :class:`ScoredRow` per readable item, in input order, batch by batch.

    Unreadable files are appended to ``skipped`` (or raise :class:`MediaError` at the first one when ``strict``).
    Inside a batch, samples are grouped by shape so mixed resolutions need no resizing here (each scorer
    resizes for its own model).
    """
    skipped = skipped if skipped is not None else []
    for chunk in _batches(items, batch_size):
        loaded: list[tuple[MediaItem, torch.Tensor, torch.Tensor | None]] = []
        for item in chunk:
            try:
                media, ref = _load(item, modality, max_frames)
            except MediaError as err:
                if strict:
                    raise
                skipped.append(SkippedFile(item.path, str(err)))
                continue
            loaded.append((item, media, ref))
        yield from _score_loaded(scorers, loaded)


def _score_loaded(scorers: Sequence[Scorer], loaded: list[tuple[MediaItem, torch.Tensor, torch.Tensor | None]]
                  ) -> Iterator[ScoredRow]:
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (_, media, ref) in enumerate(loaded):
        key = (tuple(media.shape), None if ref is None else tuple(ref.shape))
        groups.setdefault(key, []).append(i)
    rows: dict[int, ScoredRow] = {}
    for index in groups.values():
        batch = ScoreBatch(
            prompts=[loaded[i][0].prompt for i in index],
            media=torch.stack([loaded[i][1] for i in index]),
            references=torch.stack([loaded[i][2] for i in index]) if loaded[index[0]][2] is not None else None,
            metadata=[loaded[i][0].metadata for i in index],
        )
        outs = {s.id: s(batch) for s in scorers}
        for j, i in enumerate(index):
            rows[i] = ScoredRow(loaded[i][0], {k: float(o.reward[j]) for k, o in outs.items()},
                                {k: float(o.raw[j]) for k, o in outs.items()})
    for i in range(len(loaded)):
        yield rows[i]


def score_text_items(scorers: Sequence[Scorer], items: Sequence[TextItem], *, batch_size: int = 16
                     ) -> Iterator[ScoredRow]:
    """Yield one :class:`ScoredRow` per completion, in table order, ``batch_size`` completions per scorer call."""
    for chunk in _batches(items, batch_size):
        batch = ScoreBatch(prompts=[it.prompt for it in chunk], texts=[it.completion for it in chunk],
                           metadata=[it.metadata for it in chunk] if any(it.metadata for it in chunk) else None)
        outs = {s.id: s(batch) for s in scorers}
        for j, item in enumerate(chunk):
            yield ScoredRow(item, {k: float(o.reward[j]) for k, o in outs.items()},
                            {k: float(o.raw[j]) for k, o in outs.items()})


# ---------------------------------------------------------------- writing and summarising


class RowWriter:
    """Streams rows to ``.csv`` or ``.jsonl`` as they arrive (flushed per row, so a crash loses nothing)."""

    def __init__(self, path: str | os.PathLike[str], scorer_ids: Sequence[str],
                 leading: Sequence[str] = MEDIA_COLUMNS):
        self.leading = tuple(leading)
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise InputError(f"--out {self.path}: use a .csv or .jsonl file name.")
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ids = list(scorer_ids)
        self._fh = open(self.path, "w", encoding="utf-8", newline="")
        self._csv = None
        if suffix == ".csv":
            self._csv = csv.writer(self._fh)
            self._csv.writerow([*self.leading, *self.ids, *(f"{i}_raw" for i in self.ids)])

    def write(self, row: ScoredRow) -> None:
        lead = row.item.columns()
        if self._csv is not None:
            self._csv.writerow([*(lead[c] for c in self.leading), *(_num(row.rewards[i]) for i in self.ids),
                                *(_num(row.raws[i]) for i in self.ids)])
        else:
            record = {**{c: lead[c] for c in self.leading},
                      "reward": {i: _json_num(row.rewards[i]) for i in self.ids},
                      "raw": {i: _json_num(row.raws[i]) for i in self.ids}}
            self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _num(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.6g}"


def _json_num(x: float) -> float | None:
    return None if math.isnan(x) else x


class RunningSummary:
    """Count, mean, std (Welford), min and max of each scorer's reward and raw value; NaNs counted apart."""

    def __init__(self, scorer_ids: Iterable[str]):
        self.stats = {i: {"n": 0, "nan": 0, "mean": 0.0, "m2": 0.0, "min": math.inf, "max": -math.inf,
                          "raw_mean": 0.0} for i in scorer_ids}

    def add(self, row: ScoredRow) -> None:
        for i, s in self.stats.items():
            x = row.rewards[i]
            if math.isnan(x):
                s["nan"] += 1
                continue
            s["n"] += 1
            delta = x - s["mean"]
            s["mean"] += delta / s["n"]
            s["m2"] += delta * (x - s["mean"])
            s["min"], s["max"] = min(s["min"], x), max(s["max"], x)
            s["raw_mean"] += (row.raws[i] - s["raw_mean"]) / s["n"]

    def rows(self) -> list[list[object]]:
        out = []
        for i, s in self.stats.items():
            n = s["n"]
            std = math.sqrt(s["m2"] / n) if n else float("nan")
            out.append([i, n, s["nan"], s["mean"] if n else float("nan"), std, s["min"] if n else float("nan"),
                        s["max"] if n else float("nan"), s["raw_mean"] if n else float("nan")])
        return out

    HEADER = ["scorer", "n", "n_nan", "reward_mean", "reward_std", "min", "max", "raw_mean"]
