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
answers it has. A card names its set by import path (``params.contrasts: package.module:function``), imported on
first use: this package names no world, and reading a card imports none. Short names can also be registered in
:data:`CONTRAST_SETS` (empty here), e.g. ``CONTRAST_SETS.add_builtin("mine", "my_pkg.sets:captions")``.
"""

from __future__ import annotations

from collections.abc import Callable

from visalign.registry import Registry, UnknownIdError

ContrastSet = Callable[[str], list[list[str]]]

# name → a ``prompt → [[t0, t1, ..., tK], ...]`` function (or its "module:function"); empty by default, for users.
CONTRAST_SETS: Registry[ContrastSet] = Registry("contrast set")


def contrast_set(spec: str, *, card_id: str | None = None) -> ContrastSet:
    """The contrast-set function that ``spec`` names.

    Args:
        spec: an import path ``"package.module:function"`` of a ``prompt → [[t0, t1, …, tK], …]`` function, or a
            name registered in :data:`CONTRAST_SETS`.
        card_id: the card whose ``params.contrasts`` this is, named in errors.

    Returns:
        The function (a callable taking one prompt string and returning its groups of captions).

    Raises:
        ValueError: naming the card and ``spec`` when it is neither a registered name nor an importable callable.
    """
    where = f"Card {card_id!r}: " if card_id else ""
    try:
        function = CONTRAST_SETS.get(spec)
    except UnknownIdError:
        raise ValueError(f"{where}unknown contrast set {spec!r} (params.contrasts); give an import path "
                         f"'package.module:function' or a name registered in visalign.scorers.contrasts."
                         f"CONTRAST_SETS (registered: {CONTRAST_SETS.list()}).") from None
    except ImportError as err:
        raise ValueError(f"{where}contrast set {spec!r} (params.contrasts) cannot be imported: {err}") from err
    if not callable(function):
        raise ValueError(f"{where}contrast set {spec!r} (params.contrasts) is a {type(function).__name__}, "
                         "not a function prompt → groups of captions.")
    return function
