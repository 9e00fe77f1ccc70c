"""Caption contrast sets: for a prompt, the captions a contrastive reward normalises it against.

``ClipScorer`` mode ``contrast`` scores ``P(prompt | image)`` among the prompt and its hard negatives,
``softmax(s·cos(image, [t₀, t₁ … t_K]))₀`` — CLIP used as the zero-shot classifier it was trained to be, over the
captions that differ from the prompt in one attribute. A raw cosine moves little between a right and a wrong scene
(the shapes proxy's cosine drops 0.981 → 0.906 when four yellow squares turn red); the softmax over the near misses
turns that margin into most of the attribute's share of the reward.

A contrast set is a function ``prompt → groups``, each group ``[t₀, t₁, …, t_K]``: ``t₀`` stands for the prompt
itself (it may be a normalised wording of it) and ``t₁…t_K`` are captions that are false whenever the prompt is
true. Each group is one question (which colour? how many?); the reward is the mean over groups of the probability
of ``t₀`` within its group, so every attribute weighs the same, as in GenEval-style graders, however many wrong
answers it has. Sets are named in a table (``module:function``) and imported on first use, so a card names one
without importing its world.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache

# name → "module:function" of a ``prompt → [[t0, t1, ..., tK], ...]`` function.
CONTRAST_SETS: dict[str, str] = {
    "shapes": "visalign.shapes.negatives:contrast_captions",
}


@cache
def contrast_set(name: str) -> Callable[[str], list[list[str]]]:
    """The contrast-set function registered as ``name``.

    Raises:
        ValueError: naming the known sets when ``name`` is not one of them.
    """
    if name not in CONTRAST_SETS:
        raise ValueError(f"Unknown contrast set {name!r}; known: {sorted(CONTRAST_SETS)} "
                         "(visalign.scorers.contrasts.CONTRAST_SETS).")
    module, function = CONTRAST_SETS[name].split(":")
    return getattr(importlib.import_module(module), function)
