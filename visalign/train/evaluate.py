"""The engine's evaluation hook: fixed-seed samples of held-out prompts, scored by held-out scorers and by the
training proxy, so the two curves can be compared (docs/methods.md#hacking-diagnostics, proxy vs gold).

Eval prompts are a ``.txt`` or a ``.jsonl``/``.csv`` table; a table's ``reference`` column (an image path, relative
to the table) becomes ``ScoreBatch.references`` for reference-based scorers (CLIP-I, λ-Harmonic: RPO's validation
reward), and its other columns reach the scorers as metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from visalign.media import load_image, resize_to
from visalign.scorers import ScoreBatch
from visalign.train.config import TrainConfig
from visalign.train.prompts import read_prompt_table


class Evaluator:
    """Samples the eval prompts with the eval sampler and scores them.

    Args:
        config: the run's config (``eval`` and the sampler settings of ``sample``).
        reward: the training reward (the proxy), or None.
        eval_reward: the held-out reward; the proxy itself when ``eval.scorers`` is empty.
    """

    def __init__(self, config: TrainConfig, reward: Any, eval_reward: Any) -> None:
        self.config = config
        self.reward, self.eval_reward = reward, eval_reward
        e = config.eval
        self.prompts: list[str] = []
        self.metadata: list[dict[str, Any]] = []
        if e.prompts:
            prompts, metadata = read_prompt_table(e.prompts)
            self.prompts, self.metadata = prompts[: e.max_prompts], metadata[: e.max_prompts]
            if self.eval_reward is None:
                raise ValueError("eval.prompts is set but there is nothing to score them with: give eval.scorers "
                                 "(the run has no training reward).")
        self.reference_paths = self._reference_paths(e.prompts) if self.prompts else None
        # (prompts, seed) → media replacing the DDIM rollout; set by the engine from the source's eval_sampler().
        self.sampler: Any = None

    def _reference_paths(self, table: str) -> list[Path] | None:
        rows = [m.get("reference") for m in self.metadata]
        if not any(rows):
            return None
        if not all(rows):
            raise ValueError(f"{table}: some rows have a 'reference' image and some do not; give every eval prompt "
                             "one, or none.")
        base = Path(table).resolve().parent
        return [p if (p := Path(str(r))).is_absolute() else base / p for r in rows]

    @property
    def active(self) -> bool:
        return bool(self.prompts)

    def references(self, size: tuple[int, int]) -> Tensor | None:
        """The eval prompts' reference images resized to ``size``, float ``[B, 3, H, W]`` in [0, 1], or None."""
        if self.reference_paths is None:
            return None
        return torch.stack([resize_to(load_image(p)[None], size)[0] for p in self.reference_paths])

    def __call__(self, adapter: Any) -> tuple[dict[str, float], Tensor | None]:
        """Sample and score once (under whatever weights the caller has swapped in).

        Returns:
            ``(metrics, media)``: ``eval/reward...`` of the held-out scorers and, with separate eval scorers and a
            training reward, ``eval/proxy/reward...``; the eval samples ``[B, ...]`` for the grid (None for text).
        """
        batch, media = (self._text_batch(adapter) if getattr(adapter, "modality", "image") == "text"
                        else self._media_batch(adapter))
        with self.eval_reward.frozen_transforms():  # eval samples must not move running reward statistics
            held_out = self.eval_reward(batch)
        metrics = {f"eval/{k}": v for k, v in held_out.metrics().items() if k.startswith("reward")}
        if self.reward is not None and self.eval_reward is not self.reward:
            with self.reward.frozen_transforms():
                proxy = self.reward(batch)
            metrics.update({f"eval/proxy/{k}": v for k, v in proxy.metrics().items() if k.startswith("reward")})
        return metrics, media

    def _media_batch(self, adapter: Any) -> tuple[ScoreBatch, Tensor]:
        """Eval samples of a generator on the eval sampler, one per prompt."""
        e, s = self.config.eval, self.config.sample
        res = self.config.model.resolution
        if self.sampler is not None:  # the source's own sampler (a few-step student's)
            media = self.sampler(list(self.prompts), e.seed)
        else:
            media = adapter.rollout(self.prompts, images_per_prompt=1, steps=e.steps or s.steps, guidance=s.guidance,
                                    eta=e.eta, seed=e.seed, negative_prompt=s.negative_prompt, height=res,
                                    width=res).media
        refs = self.references(tuple(media.shape[-2:]))
        batch = ScoreBatch(prompts=list(self.prompts), media=media,
                           references=None if refs is None else refs.to(media),
                           metadata=self.metadata if any(self.metadata) else None)
        return batch, media

    def _text_batch(self, adapter: Any) -> tuple[ScoreBatch, None]:
        """Eval completions of a causal LM: ``text.eval_samples_per_prompt`` per prompt at ``text.eval_temperature``
        (0 = greedy), seeded by ``eval.seed``; there is no grid."""
        t = self.config.text
        k = t.eval_samples_per_prompt
        rollout = adapter.generate(self.prompts, t, completions_per_prompt=k, seed=self.config.eval.seed,
                                   temperature=t.eval_temperature)
        metadata = [dict(m) for m in self.metadata for _ in range(k)] if any(self.metadata) else None
        return ScoreBatch(prompts=rollout.prompts, texts=rollout.texts, metadata=metadata), None
