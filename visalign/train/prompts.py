"""Prompt sources for training and evaluation: files in, a seeded, resumable stream out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from visalign.scoring import InputError, read_table, read_text_lines


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` (one per line, blanks skipped) or a ``.jsonl``/``.csv`` with a ``prompt`` column."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".csv"):
        return [str(row["prompt"]) for row in _rows(path) if str(row.get("prompt", "")).strip()]
    prompts = [line.strip() for line in read_text_lines(path) if line.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts (the file is empty or blank).")
    return prompts


def _rows(path: Path) -> list[dict]:
    rows = read_table(path)
    if rows and "prompt" not in rows[0]:
        raise InputError(f"{path}: no 'prompt' column; columns are {sorted(rows[0])}.")
    return rows


@dataclass
class PromptStream:
    """Distinct prompts, drawn without replacement in a seeded order, reshuffled every epoch.

    The position (``epoch``, ``index``) is part of a checkpoint, so a resumed run draws the same prompts.
    """

    prompts: list[str]
    seed: int = 0
    epoch: int = 0
    index: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise InputError("The prompt list is empty.")
        self._order = self._shuffle(self.epoch)

    def _shuffle(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def take(self, count: int) -> list[str]:
        """The next ``count`` prompts (distinct within one call; needs ``count <= len(prompts)``)."""
        if count > len(self.prompts):
            raise InputError(f"{count} prompts per step were asked for but the prompt file has only "
                             f"{len(self.prompts)}; lower sample.prompts_per_step or add prompts.")
        out = []
        while len(out) < count:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            out.append(self.prompts[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffle(self.epoch)
