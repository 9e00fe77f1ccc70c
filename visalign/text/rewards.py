"""Rewards of the text core in both directions between visalign scorers and TRL reward functions.

- A TRL reward function ``f(prompts=..., completions=..., **columns) -> list[float | None]`` is a scorer:
  ``get_scorer(f, modality="text")`` wraps it (:class:`visalign.scorers.wrap.CallableTextScorer`), and a recipe
  names it by import path in ``reward.terms`` (``scorer: pkg.module:function``; a class is instantiated first).
  ``None`` abstains (NaN; the combiner skips it).
- Any visalign text scorer is a TRL reward function: :func:`as_reward_function` returns a picklable callable with
  TRL's signature and a ``__name__`` (TRL logs rewards under it), so ``GRPOTrainer(reward_funcs=[...])`` takes it.
  Prompt-table columns passed by TRL as keywords reach the scorer as per-sample ``metadata``.

The same scorer object can serve both: ``visalign score``, a ``RewardSpec`` term and a TRL trainer score it alike.
"""

from __future__ import annotations

import math
from typing import Any

from visalign.scorers import ScoreBatch, Scorer, get_scorer

__all__ = ["TrlRewardFunction", "as_reward_function"]


class TrlRewardFunction:
    """A visalign text scorer called as a TRL reward function; its reward (after the card's normalisation).

    Args:
        scorer: a text :class:`~visalign.scorers.Scorer`.
        raw: return the native score instead of the normalised reward.
    """

    def __init__(self, scorer: Scorer, *, raw: bool = False) -> None:
        if scorer.modality != "text":
            raise ValueError(f"Scorer {scorer.id!r} scores {scorer.modality}s; a TRL reward function needs a text "
                             "scorer (`visalign scorers list` shows each scorer's modality).")
        self.scorer = scorer
        self.raw = raw
        self.__name__ = scorer.id.replace("-", "_")

    def __call__(self, prompts: list[str], completions: list[Any], **columns: Any) -> list[float | None]:
        texts = [_text_of(c) for c in completions]
        prompt_texts = [_text_of(p) for p in prompts]
        n = len(texts)
        per_sample = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == n}
        metadata = [{k: v[i] for k, v in per_sample.items()} for i in range(n)] if per_sample else None
        out = self.scorer(ScoreBatch(prompts=prompt_texts, texts=texts, metadata=metadata))
        values = (out.raw if self.raw else out.reward).tolist()
        return [None if math.isnan(v) else float(v) for v in values]


def as_reward_function(scorer: Any, *, raw: bool = False, **get_scorer_kwargs: Any) -> TrlRewardFunction:
    """A TRL reward function from a text scorer id, import path or :class:`Scorer` (``get_scorer`` kwargs pass on)."""
    built = scorer if isinstance(scorer, Scorer) else get_scorer(scorer, **get_scorer_kwargs)
    return TrlRewardFunction(built, raw=raw)


def _text_of(value: Any) -> str:
    """A completion or prompt as text: TRL passes strings, or chat messages ``[{"role", "content"}, ...]`` for
    conversational data (the last message's content is the completion)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return str(value[-1]["content"])
    raise TypeError(f"A TRL reward function got {type(value).__name__}; expected a string or a list of chat "
                    "messages with 'content'.")
