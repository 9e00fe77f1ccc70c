"""Prompt sources for training and evaluation: files in, a seeded, resumable stream out.

A prompt source is a file. A ``.txt`` file holds one prompt per line. A ``.jsonl`` or ``.csv`` table holds a
``prompt`` column and any metadata columns (e.g. the objects a GenEval-style scorer should find, or a reference image
path); the metadata of each prompt travels with its samples to the scorers (``ScoreBatch.metadata``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from visalign.scoring import InputError, read_table, read_text_lines

# A missing source that looks like ``<world>:<set>``: recipes once named built-in sets that way, and those are files
# now, so the error says where such a set went rather than only "no such file".
_SET_NAME = re.compile(r"[A-Za-z_][\w-]*:[\w-]+")


def read_prompt_table(path: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """``(prompts, metadata)`` of a prompt file: metadata is one dict per prompt (the other columns of a table; empty
    dicts for a ``.txt``). Blank prompts are skipped.

    Args:
        path: a ``.txt``, ``.jsonl`` or ``.csv`` file.

    Raises:
        InputError: for a missing file, a table without a ``prompt`` column, or no prompts.
    """
    path = Path(path)
    if not path.is_file() and _SET_NAME.fullmatch(str(path)):
        raise InputError(f"{path}: no such file. Prompt sources are files: a named set such as shapes:train is now "
                         "a file such as assets/shapes/prompts/train.txt (a relative path is resolved against the "
                         "recipe's folder, then the working folder).")
    if path.suffix.lower() in (".jsonl", ".csv"):
        rows = read_table(path)
        if rows and not all(isinstance(row, dict) and "prompt" in row for row in rows):
            first = rows[0] if isinstance(rows[0], dict) else {}
            raise InputError(f"{path}: every row needs a 'prompt' column; the first row has {sorted(first)}.")
        rows = [row for row in rows if str(row["prompt"]).strip()]
        prompts = [str(row["prompt"]).strip() for row in rows]
        metadata = [{k: v for k, v in row.items() if k != "prompt"} for row in rows]
    else:
        prompts = [line.strip() for line in read_text_lines(path) if line.strip()]
        metadata = [{} for _ in prompts]
    if not prompts:
        raise InputError(f"{path}: no prompts (the file is empty or blank).")
    return prompts, metadata


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` (one per line, blanks skipped) or a ``.jsonl``/``.csv`` with a ``prompt`` column."""
    return read_prompt_table(path)[0]


@dataclass
class PromptStream:
    """Distinct prompts, drawn without replacement in a seeded order, reshuffled every epoch.

    The position (``epoch``, ``index``) is part of a checkpoint, so a resumed run draws the same prompts.

    Args:
        prompts: the prompt strings.
        seed: seeds the order of every epoch.
        metadata: optional, one dict per prompt (returned by :meth:`take_with_metadata`).
    """

    prompts: list[str]
    seed: int = 0
    metadata: list[dict[str, Any]] | None = None
    epoch: int = 0
    index: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise InputError("The prompt list is empty.")
        if self.metadata is not None and len(self.metadata) != len(self.prompts):
            raise InputError(f"Got {len(self.metadata)} metadata rows for {len(self.prompts)} prompts.")
        self._order = self._shuffle(self.epoch)

    def _shuffle(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def take_indices(self, count: int) -> list[int]:
        """Indices of the next ``count`` prompts (distinct within one call; needs ``count <= len(prompts)``)."""
        if count > len(self.prompts):
            raise InputError(f"{count} prompts per step were asked for but the prompt file has only "
                             f"{len(self.prompts)}; lower sample.prompts_per_step or add prompts.")
        out: list[int] = []
        while len(out) < count:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            candidate = self._order[self.index]
            self.index += 1
            # At an epoch boundary the new order may repeat a prompt already drawn in this call: skip it, so a
            # step never holds two groups of the same prompt (they would merge into one advantage group).
            if candidate not in out:
                out.append(candidate)
        return out

    def take(self, count: int) -> list[str]:
        """The next ``count`` prompts (distinct within one call; needs ``count <= len(prompts)``)."""
        return [self.prompts[i] for i in self.take_indices(count)]

    def take_with_metadata(self, count: int) -> tuple[list[str], list[dict[str, Any]]]:
        """The next ``count`` prompts and their metadata dicts (empty dicts without metadata)."""
        idx = self.take_indices(count)
        meta = self.metadata or [{} for _ in self.prompts]
        return [self.prompts[i] for i in idx], [dict(meta[i]) for i in idx]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffle(self.epoch)
