"""Hard-negative captions of the shapes world: one attribute changed, everything else kept.

A learned proxy (the contrastive CLIP and the yes/no VLM of ``visalign shapes build``) is only useful as a reward
if it tells "a red circle left of a blue square" from the captions that differ in exactly one bound attribute:
swapped colours ("a blue circle left of a red square"), swapped shapes, the opposite relation or the objects in the
other order, a wrong count, a wrong colour or shape. Bag-of-words features cannot separate those pairs, so they are
what the proxies train against and what their accuracy is measured on (docs/shapes.md#reward-fine-tuning: the
prototype's 86% / 70% on such pairs was too weak to carry a reward).

Every negative is *false* for any scene of the positive spec: a changed thing does not occur in the scene, a
swapped order or opposite relation contradicts the layout's dominant axis, and a changed count is a different number
of objects. The module is pure Python and seeded.
"""

from __future__ import annotations

import numpy as np

from visalign.shapes.world import COLOURS, COUNTS, RELATIONS, SHAPES, CountPrompt, PromptSpec, RelationPrompt, Thing

# Which negatives exist for which prompt kind; binding negatives (swap_*) come first because they are the hard ones.
NEGATIVE_KINDS: dict[str, tuple[str, ...]] = {
    "single": ("colour", "shape", "count"),
    "count": ("colour", "shape", "count"),
    "relation": ("swap_colours", "swap_shapes", "swap_order", "relation", "colour", "shape"),
}
OPPOSITE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


def _other(options: tuple[str, ...] | list[str], current: str, rng: np.random.Generator) -> str:
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def _relation_negative(spec: RelationPrompt, kind: str, rng: np.random.Generator) -> RelationPrompt | None:
    a, b = spec.first, spec.second
    if kind == "swap_colours":
        if a.colour == b.colour or a.shape == b.shape:
            return None  # swapping equal colours changes nothing; equal shapes make it the order swap
        return RelationPrompt(Thing(b.colour, a.shape), spec.relation, Thing(a.colour, b.shape))
    if kind == "swap_shapes":
        if a.shape == b.shape or a.colour == b.colour:
            return None
        return RelationPrompt(Thing(a.colour, b.shape), spec.relation, Thing(b.colour, a.shape))
    if kind == "swap_order":
        return RelationPrompt(b, spec.relation, a)
    if kind == "relation":
        # The opposite relation half of the time, a perpendicular one otherwise: both contradict the layout.
        relation = OPPOSITE[spec.relation] if rng.random() < 0.5 else _other(RELATIONS, spec.relation, rng)
        return RelationPrompt(a, relation, b)
    which = int(rng.integers(2))
    thing = (a, b)[which]
    if kind == "colour":
        changed = Thing(_other(list(COLOURS), thing.colour, rng), thing.shape)
    else:
        changed = Thing(thing.colour, _other(SHAPES, thing.shape, rng))
    return _replaced(spec, which, changed)


def _replaced(spec: RelationPrompt, which: int, new: Thing) -> RelationPrompt | None:
    """``spec`` with object ``which`` (0 first, 1 second) replaced by ``new``; None when ``new`` is one of the
    scene's two things (the other object *is* present, so that caption would not be false)."""
    if new in (spec.first, spec.second):
        return None
    first, second = (new, spec.second) if which == 0 else (spec.first, new)
    return RelationPrompt(first, spec.relation, second)


def hard_negative(spec: PromptSpec, kind: str, rng: np.random.Generator) -> PromptSpec | None:
    """The spec with one attribute changed so that it is false for every scene of ``spec``; None if not possible.

    Args:
        spec: a still-image prompt (``CountPrompt`` or ``RelationPrompt``).
        kind: one of ``NEGATIVE_KINDS[spec.kind]``.
        rng: draws which colour/shape/count/object changes.
    """
    if kind not in NEGATIVE_KINDS.get(spec.kind, ()):
        raise ValueError(f"No {kind!r} negative for a {spec.kind} prompt; use one of {NEGATIVE_KINDS.get(spec.kind)}.")
    if isinstance(spec, RelationPrompt):
        return _relation_negative(spec, kind, rng)
    assert isinstance(spec, CountPrompt)
    thing = spec.thing
    if kind == "colour":
        return CountPrompt(Thing(_other(list(COLOURS), thing.colour, rng), thing.shape), spec.count)
    if kind == "shape":
        return CountPrompt(Thing(thing.colour, _other(SHAPES, thing.shape, rng)), spec.count)
    return CountPrompt(thing, int(_other([str(c) for c in COUNTS], str(spec.count), rng)))


def sample_hard_negative(spec: PromptSpec, rng: np.random.Generator,
                         kinds: tuple[str, ...] | None = None) -> tuple[str, PromptSpec]:
    """A random applicable negative of ``spec``: ``(kind, negative spec)``.

    Kinds are tried in a random order until one applies (every prompt has at least the colour negative).
    """
    options = list(kinds or NEGATIVE_KINDS[spec.kind])
    for i in rng.permutation(len(options)):
        negative = hard_negative(spec, options[int(i)], rng)
        if negative is not None:
            return options[int(i)], negative
    raise ValueError(f"No hard negative of kinds {options} exists for {spec}.")


# Contrast groups: which negative kinds compete with the true caption in one softmax. Each group is one question the
# oracle grades separately (which colour? which shape? how many? which way round?), so a mean over groups weighs
# the attributes the way the oracle's reward does.
CONTRAST_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "count": {"colour": ("colour",), "shape": ("shape",), "count": ("count",)},
    "relation": {"colour": ("colour", "swap_colours"), "shape": ("shape", "swap_shapes"),
                 "position": ("relation", "swap_order")},
}


def hard_negatives_by_kind(spec: PromptSpec) -> dict[str, list[PromptSpec]]:
    """Every one-attribute negative of a still-image ``spec`` by negative kind (``NEGATIVE_KINDS``), fixed order.

    Count prompts: each other colour, shape and count. Relations: the colour, shape and order swaps (when they change
    the scene), each other relation, and each other colour or shape of either object (when the changed thing is not
    the other object, which is present).
    """
    if isinstance(spec, CountPrompt):
        thing = spec.thing
        return {"colour": [CountPrompt(Thing(c, thing.shape), spec.count) for c in COLOURS if c != thing.colour],
                "shape": [CountPrompt(Thing(thing.colour, s), spec.count) for s in SHAPES if s != thing.shape],
                "count": [CountPrompt(thing, n) for n in COUNTS if n != spec.count]}
    if not isinstance(spec, RelationPrompt):
        raise ValueError(f"Hard negatives are defined for still-image prompts; got {spec}.")
    a, b = spec.first, spec.second
    rng = np.random.default_rng(0)  # the swaps draw nothing; the generator only satisfies the signature
    found: dict[str, list[PromptSpec]] = {
        kind: [n] if (n := _relation_negative(spec, kind, rng)) is not None else []
        for kind in ("swap_colours", "swap_shapes", "swap_order")}
    found["relation"] = [RelationPrompt(a, r, b) for r in RELATIONS if r != spec.relation]
    found["colour"], found["shape"] = [], []
    for which, thing in enumerate((a, b)):
        for kind, new_things in (("colour", [Thing(c, thing.shape) for c in COLOURS if c != thing.colour]),
                                 ("shape", [Thing(thing.colour, s) for s in SHAPES if s != thing.shape])):
            found[kind] += [n for new in new_things if (n := _replaced(spec, which, new)) is not None]
    return found


def contrast_captions(prompt: str) -> list[list[str]]:
    """Contrast groups of a shapes prompt: per attribute, ``[t0, negatives...]`` (canonical captions).

    The shapes world's contrast set (:mod:`visalign.scorers.contrasts`; cards name it as ``params.contrasts:
    visalign.shapes.negatives:contrast_captions``): ``t0`` is the prompt's canonical caption, and each group holds
    the negatives that answer one attribute differently (``CONTRAST_GROUPS``). One template per kind, so a softmax
    over a group compares content, not wording.
    """
    from visalign.shapes.grammar import canonical_caption, parse_prompt

    spec = parse_prompt(prompt)
    by_kind = hard_negatives_by_kind(spec)
    groups = CONTRAST_GROUPS["relation" if isinstance(spec, RelationPrompt) else "count"]
    positive = canonical_caption(spec)
    return [[positive] + [canonical_caption(n) for kind in kinds for n in by_kind[kind]] for kinds in groups.values()]
