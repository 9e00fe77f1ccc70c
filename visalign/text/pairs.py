"""The text-pairs source: preference pairs of completions from a table, tokenised for the policy (``text-dpo``).

``source.name: text-pairs`` reads ``source.pairs.path`` (a ``.jsonl`` or ``.csv`` with prompt, chosen and rejected
columns, named by ``source.pairs.prompt_column`` / ``chosen_column`` / ``rejected_column``) before the model loads,
and refuses what carries no preference: a pair whose chosen and rejected texts are identical, a missing or
non-string cell, an empty prompt. An empty completion is allowed — it is the decision to stop at once (EOS only).
Pairs are served ``source.pairs.pairs_per_step`` at a time in a seeded order, epoch after epoch (the position is
checkpointed). Each completion is tokenised without special tokens, EOS appended, and its prompt is formatted as the
online source formats it (chat template per ``text.chat_template``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from visalign.scoring import read_table
from visalign.text.batches import TextPairBatch
from visalign.text.source import load_policy
from visalign.train.sources.base import ExperienceSource, SourceContext

_NAMED = 5  # bad rows spelled out in a refusal


class TextPairDataError(ValueError):
    """A pair table that cannot be used as given; the message names the rows and what to change."""


def read_text_pairs(path: str | Path, *, prompt_column: str = "prompt", chosen_column: str = "chosen",
                    rejected_column: str = "rejected", limit: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{"prompt", "chosen", "rejected", "metadata"}`` of a pair table, checked.

    Raises:
        TextPairDataError: the file is not a table, a column is missing, or some rows are unusable (named).
    """
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise TextPairDataError(f"source.pairs.path {path} must be a .jsonl or .csv table of text pairs.")
    if not path.is_file():
        raise TextPairDataError(f"source.pairs.path {path} does not exist.")
    rows = read_table(path)[:limit]
    columns = (prompt_column, chosen_column, rejected_column)
    missing = [c for c in columns if rows and c not in rows[0]]
    if not rows or missing:
        raise TextPairDataError(f"{path}: {'no rows' if not rows else f'no column(s) {missing}'}; a text pair table "
                                f"needs columns {list(columns)} (rename them with source.pairs.*_column).")
    pairs, identical, bad = [], [], []
    for i, row in enumerate(rows):
        prompt, chosen, rejected = (row.get(c) for c in columns)
        if not all(isinstance(v, str) for v in (prompt, chosen, rejected)) or not prompt.strip():
            bad.append(i)
        elif chosen == rejected:
            identical.append(i)
        else:
            metadata = {k: v for k, v in row.items() if k not in columns}
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "metadata": metadata})
    if identical:
        raise TextPairDataError(f"{path}: {len(identical)} pair(s) have identical chosen and rejected texts (rows "
                                f"{identical[:_NAMED]}, 0-based); they carry no preference. Drop them.")
    if bad:
        raise TextPairDataError(f"{path}: {len(bad)} row(s) have an empty prompt or a missing / non-string "
                                f"completion (rows {bad[:_NAMED]}, 0-based); fix or drop them.")
    return pairs


class TextPairsSource(ExperienceSource):
    """Offline text preference pairs as :class:`TextPairBatch` (``source.name: text-pairs``)."""

    name = "text-pairs"
    produces = TextPairBatch
    provides = frozenset({"reference"})
    modality = "text"
    load_model = staticmethod(load_policy)

    def __init__(self, ctx: SourceContext, needs: frozenset[str]) -> None:
        super().__init__(ctx, needs)
        c = ctx.config.source.pairs
        if not c.path:
            raise TextPairDataError("source.pairs.path is empty: give a .jsonl/.csv with prompt, chosen, rejected "
                                    "columns.")
        self.pairs = read_text_pairs(c.path, prompt_column=c.prompt_column, chosen_column=c.chosen_column,
                                     rejected_column=c.rejected_column, limit=c.limit)
        self.per_step = c.pairs_per_step
        self.position = 0
        self.timings: dict[str, float] = {}

    def attach(self, adapter: Any) -> None:
        if getattr(adapter, "modality", None) != "text":
            raise ValueError(f"source {self.name!r} trains a causal LM, but model.model loaded a "
                             f"{type(adapter).__name__}.")
        adapter.format_prompts([self.pairs[0]["prompt"]], self.ctx.config.text)  # a missing chat template fails now
        super().attach(adapter)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.ctx.config.run.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.pairs), generator=g).tolist()

    def _take(self) -> list[int]:
        """This process's pair indices; the shared position advances by every process's share."""
        picked: list[int] = []
        for rank in range(self.ctx.dist.num_processes):
            mine = []
            for _ in range(self.per_step):
                epoch, offset = divmod(self.position, len(self.pairs))
                mine.append(self._order(epoch)[offset])
                self.position += 1
            if rank == self.ctx.dist.process_index:
                picked = mine
        return picked

    def next(self) -> TextPairBatch:
        t0 = time.perf_counter()
        rows = [self.pairs[i] for i in self._take()]
        batch = tokenize_pairs(self.adapter, rows, self.ctx.config.text)
        self.timings = {"time/source": time.perf_counter() - t0}
        return batch

    def local_metrics(self, batch: TextPairBatch) -> dict[str, float]:
        return {**self.timings, "epoch": self.position / len(self.pairs)}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def tokenize_pairs(policy: Any, rows: list[dict[str, Any]], config: Any) -> TextPairBatch:
    """A :class:`TextPairBatch` of rows ``{"prompt", "chosen", "rejected"}`` for ``policy`` (left-padded prompts,
    completions + EOS right-padded to one width, cut to ``config.max_new_tokens``)."""
    tok = policy.tokenizer
    prompts = [r["prompt"] for r in rows]
    prompt_ids, prompt_mask = policy.encode_prompts(policy.format_prompts(prompts, config), config,
                                                    templated=policy.uses_chat_template(config))

    def ids_of(text: str) -> list[int]:
        return (tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[: config.max_new_tokens]

    chosen = [ids_of(r["chosen"]) for r in rows]
    rejected = [ids_of(r["rejected"]) for r in rows]
    width = max(len(x) for x in chosen + rejected)

    def pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).float()
        return ids.to(policy.device), mask.to(policy.device)

    chosen_ids, chosen_mask = pad(chosen)
    rejected_ids, rejected_mask = pad(rejected)
    return TextPairBatch(prompts=prompts, prompt_ids=prompt_ids, prompt_mask=prompt_mask, chosen_ids=chosen_ids,
                         chosen_mask=chosen_mask, rejected_ids=rejected_ids, rejected_mask=rejected_mask,
                         weights=torch.ones(len(rows)), metadata=[r.get("metadata", {}) for r in rows])
