"""The pairs source: offline preference pairs (prompt, chosen image, rejected image) as latent batches, for
Diffusion-DPO and λ-Harmonic RPO (docs/methods.md#diffusion-dpo, docs/methods.md#rpo-harmonic).

The pair file is read when the run is configured (:func:`visalign.train.sources.pair_data.read_pairs`; unreadable
images are listed and skipped, identical pairs refused), before the model loads. Once the generator is loaded, each
pair is encoded on first use — the images by the generator's VAE (``encode_media``), the prompt by its text encoder
without CFG (``encode_condition``) — and cached, so every family that trains gets latents in its own space. Pairs are
served in a seeded random order, one epoch after another; with several processes each takes its own
``pairs_per_step`` from the same order, so the position is one checkpointed number.

With ``label_scorer`` (RPO) each pair gets ``preference = σ(R(chosen) − R(rejected))`` from a scorer that compares
against references (λ-Harmonic, CLIP-I), the chosen image serving as the reference of both; otherwise labels are hard
(``preference = 1``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from visalign.generators.rollout import Condition
from visalign.objectives.batches import PairBatch
from visalign.scorers import ScoreBatch, get_scorer
from visalign.train.sources.base import ExperienceSource, SourceContext
from visalign.train.sources.pair_data import read_pairs

_LABEL_BATCH = 16  # pairs per scorer call while labelling


class PairsSource(ExperienceSource):
    """Offline preference pairs (``source.name: pairs``, the default of ``diffusion-dpo`` and ``rpo-harmonic``)."""

    name = "pairs"
    produces = PairBatch
    provides = frozenset({"reference"})

    def __init__(self, ctx: SourceContext, needs: frozenset[str]) -> None:
        super().__init__(ctx, needs)
        c = ctx.config.source.pairs
        self.data = read_pairs(c.path, resolution=ctx.config.model.resolution, split=c.split,
                               prompt_column=c.prompt_column, chosen_column=c.chosen_column,
                               rejected_column=c.rejected_column, label_column=c.label_column, limit=c.limit)
        if self.data.skipped:
            ctx.write(f"warning: {self.data.summary()}")
        self.size = len(self.data.records)
        self.per_step = c.pairs_per_step
        if self.per_step * ctx.dist.num_processes > self.size:
            raise ValueError(f"source.pairs.pairs_per_step is {self.per_step} (× {ctx.dist.num_processes} processes) "
                             f"but {c.path} has only {self.size} usable pairs; lower pairs_per_step.")
        self.position = 0  # pairs served so far, over all processes
        self.cache: dict[int, tuple[Tensor, Tensor, Any]] = {}
        self.preference = torch.ones(self.size)
        self.timings: dict[str, float] = {}
        self._epoch_order: tuple[int, list[int]] = (-1, [])

    def attach(self, adapter: Any) -> None:
        super().attach(adapter)
        scorer_id = self.ctx.config.source.pairs.label_scorer
        if scorer_id is not None:
            self.preference = self._labels(get_scorer(scorer_id, device=str(adapter.device)))

    def _labels(self, scorer: Any) -> Tensor:
        """``σ(R(chosen) − R(rejected))`` per pair, float32 ``[N]``, scored in chunks with the chosen image as the
        reference of both sides."""
        values = []
        for start in range(0, self.size, _LABEL_BATCH):
            rows = self.data.records[start:start + _LABEL_BATCH]
            prompts = [r.prompt for r in rows]
            chosen = torch.stack([r.chosen for r in rows])
            rejected = torch.stack([r.rejected for r in rows])
            r_w = scorer(ScoreBatch(prompts=prompts, media=chosen, references=chosen)).reward
            r_l = scorer(ScoreBatch(prompts=prompts, media=rejected, references=chosen)).reward
            values.append(torch.sigmoid(r_w.float() - r_l.float()).cpu())
        return torch.cat(values)

    def _order(self, epoch: int) -> list[int]:
        """The pair order of one epoch, a pure function of (run seed, epoch), so a resume needs only the position."""
        if self._epoch_order[0] != epoch:
            g = torch.Generator().manual_seed(self.ctx.config.run.seed * 1_000_003 + epoch)
            self._epoch_order = (epoch, torch.randperm(self.size, generator=g).tolist())
        return self._epoch_order[1]

    def _take(self) -> list[int]:
        """This process's pair indices for the iteration; the shared position advances by every process's share."""
        picked: list[int] = []
        for rank in range(self.ctx.dist.num_processes):
            mine = []
            for _ in range(self.per_step):
                epoch, offset = divmod(self.position, self.size)
                mine.append(self._order(epoch)[offset])
                self.position += 1
            if rank == self.ctx.dist.process_index:
                picked = mine
        return picked

    def _encode(self, indices: list[int]) -> None:
        """Fill the latent cache for ``indices`` (VAE latents of both images, the prompt's condition).

        One pair per encoder call: CPU kernels may round differently with another batch composition, and a resumed
        run re-encodes pairs in other groups than the uninterrupted one did, so per-pair calls keep resumes exact.
        """
        for i in indices:
            if i in self.cache:
                continue
            row = self.data.records[i]
            height, width = row.chosen.shape[-2:]
            with torch.no_grad():
                x_w = self.adapter.encode_media(row.chosen[None])
                x_l = self.adapter.encode_media(row.rejected[None])
                condition = self.adapter.encode_condition([row.prompt], [""], 1.0, height=int(height),
                                                          width=int(width))
            self.cache[i] = (x_w.cpu(), x_l.cpu(), condition)

    def next(self) -> PairBatch:
        t0 = time.perf_counter()
        indices = self._take()
        self._encode(indices)
        rows = [self.cache[i] for i in indices]
        parts = [r[2] for r in rows]
        condition = Condition(torch.cat([c.embeds for c in parts]), None,
                              {k: torch.cat([c.extras[k] for c in parts]) for k in parts[0].extras})
        device = self.adapter.device
        batch = PairBatch(prompts=[self.data.records[i].prompt for i in indices], condition=condition,
                          chosen=torch.cat([r[0] for r in rows]).to(device),
                          rejected=torch.cat([r[1] for r in rows]).to(device), weights=torch.ones(len(indices)),
                          preference=self.preference[indices].clone(),
                          metadata=[self.data.records[i].metadata for i in indices])
        self.timings = {"time/source": time.perf_counter() - t0}
        return batch

    def local_metrics(self, batch: PairBatch) -> dict[str, float]:
        return {**self.timings, "epoch": self.position / self.size}

    def grid(self, batch: PairBatch) -> tuple[Tensor, int] | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
