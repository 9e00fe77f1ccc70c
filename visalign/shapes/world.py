"""The shapes world: its vocabulary, prompt specs, scene layouts, seeded sampling and the held-out split.

A *prompt spec* is what a caption says (``CountPrompt``, ``RelationPrompt``, ``MotionPrompt``); a *scene*
is one concrete layout that satisfies it (``Scene`` for images, ``VideoScene`` for videos), in canvas
fractions so one scene renders at any resolution. Everything is plain Python/numpy and deterministic for a
seeded ``numpy.random.Generator``.

Sizes and spacing follow the measured pitfalls in docs/shapes.md#world: at 32 px a circle needs a
half-extent of at least ~3.8 px not to look square after anti-aliasing, shapes keep >= 2.5 px apart, and a
relation's dominant axis wins by a 1.5x margin so "left of" is never a judgement call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np

# Pure RGB colours: each channel is 0 or 1, so the oracle can name a pixel's colour from its chroma alone.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNTS: tuple[int, ...] = (1, 2, 3, 4)
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

# Unit displacement of "first object relative to second" (relations) and of motion (videos), in image axes
# (x to the right, y downwards).
RELATION_VECTORS: dict[str, tuple[int, int]] = {"left_of": (-1, 0), "right_of": (1, 0), "above": (0, -1),
                                                "below": (0, 1)}
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Colour-shape pairs whose *relation* prompts are held out of training (docs/shapes.md#world). The pairs still
# appear in training as single and count prompts, so held-out prompts test composition, not new words.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
# For videos the same pairs are held out moving vertically; they still move left/right in training.
HELDOUT_MOTION: tuple[tuple[str, str, str], ...] = tuple((c, s, d) for c, s in HELDOUT_PAIRS for d in ("up", "down"))

# Layout constants, as fractions of the canvas side; at 32 px one pixel is 0.03125.
SINGLE_RADIUS = (4.5 / 32, 7.5 / 32)
COUNT_RADIUS = (3.9 / 32, 4.8 / 32)
RELATION_RADIUS = (4.0 / 32, 6.0 / 32)
MOTION_RADIUS = (4.2 / 32, 5.5 / 32)
MIN_GAP = 2.5 / 32  # between the bounding boxes of two shapes: they never touch after anti-aliasing
MARGIN = 1.0 / 32  # between a shape's bounding box and the canvas edge
AXIS_MARGIN = 1.5  # a relation's dominant-axis offset is at least 1.5x the other axis' offset
MOTION_TRAVEL = (0.25, 0.5)  # total centre displacement over a clip, fraction of the canvas side

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class Thing:
    """A coloured shape as a caption names it (``Thing("red", "circle")``)."""

    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"Unknown colour {self.colour!r}; the shapes world has {sorted(COLOURS)}.")
        if self.shape not in SHAPES:
            raise ValueError(f"Unknown shape {self.shape!r}; the shapes world has {list(SHAPES)}.")


@dataclass(frozen=True)
class CountPrompt:
    """``count`` copies of one thing ("a red circle", "three blue squares"); count 1 is a single object."""

    thing: Thing
    count: int = 1

    def __post_init__(self) -> None:
        if self.count not in COUNTS:
            raise ValueError(f"count {self.count} is outside the shapes world's counts {list(COUNTS)}.")

    @property
    def kind(self) -> str:
        return "single" if self.count == 1 else "count"


@dataclass(frozen=True)
class RelationPrompt:
    """``first`` is ``relation`` ``second`` ("a green triangle above a cyan circle"); the two things differ."""

    first: Thing
    relation: str
    second: Thing

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"Unknown relation {self.relation!r}; use one of {list(RELATIONS)}.")
        if self.first == self.second:
            raise ValueError(f"A relation needs two different things; got {self.first} twice.")

    @property
    def kind(self) -> str:
        return "relation"


@dataclass(frozen=True)
class MotionPrompt:
    """One thing moving in ``direction`` over a video ("a red circle moving left")."""

    thing: Thing
    direction: str

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"Unknown direction {self.direction!r}; use one of {list(DIRECTIONS)}.")

    @property
    def kind(self) -> str:
        return "motion"


PromptSpec = CountPrompt | RelationPrompt | MotionPrompt


@dataclass(frozen=True)
class PlacedShape:
    """One drawn shape. ``x``, ``y``: centre; ``radius``: half the bounding-box side; all canvas fractions."""

    colour: str
    shape: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """A still image: the prompt it satisfies and where each shape sits."""

    prompt: PromptSpec
    shapes: tuple[PlacedShape, ...]


@dataclass(frozen=True)
class VideoScene:
    """A clip of one shape moving in a straight line.

    ``start`` is the shape at frame 0; ``velocity`` is (dx, dy) per frame in canvas fractions; ``num_frames``
    is T. Frame ``t`` shows the shape at ``start + t * velocity``.
    """

    prompt: MotionPrompt
    start: PlacedShape
    velocity: tuple[float, float]
    num_frames: int

    def frame(self, t: int) -> PlacedShape:
        s = self.start
        return PlacedShape(s.colour, s.shape, s.x + t * self.velocity[0], s.y + t * self.velocity[1], s.radius)


# ---------------------------------------------------------------- enumeration and the split


def all_things() -> list[Thing]:
    return [Thing(c, s) for c in COLOURS for s in SHAPES]


def all_prompt_specs(kind: str) -> list[PromptSpec]:
    """Every distinct composition of one kind, in a fixed order.

    Args:
        kind: ``single`` (18), ``count`` (counts 2-4: 54), ``relation`` (18 x 17 x 4 = 1224) or ``motion`` (72).
    """
    things = all_things()
    if kind == "single":
        return [CountPrompt(t, 1) for t in things]
    if kind == "count":
        return [CountPrompt(t, n) for t in things for n in COUNTS if n > 1]
    if kind == "relation":
        return [RelationPrompt(a, r, b) for a, b in itertools.permutations(things, 2) for r in RELATIONS]
    if kind == "motion":
        return [MotionPrompt(t, d) for t in things for d in DIRECTIONS]
    raise ValueError(f"Unknown prompt kind {kind!r}; use one of ['single', 'count', 'relation', 'motion'].")


def split_of(spec: PromptSpec) -> Split:
    """``"heldout"`` for compositions never shown in base training, else ``"train"`` (deterministic)."""
    pairs = {Thing(c, s) for c, s in HELDOUT_PAIRS}
    if isinstance(spec, RelationPrompt):
        return "heldout" if spec.first in pairs or spec.second in pairs else "train"
    if isinstance(spec, MotionPrompt):
        key = (spec.thing.colour, spec.thing.shape, spec.direction)
        return "heldout" if key in HELDOUT_MOTION else "train"
    return "train"


def prompt_specs(kind: str, split: Split) -> list[PromptSpec]:
    """The compositions of one kind that fall in ``split`` (fixed order)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout'; got {split!r}.")
    return [s for s in all_prompt_specs(kind) if split_of(s) == split]


# Share of each kind among image training prompts (docs/shapes.md#world). Relations dominate because they are
# the hard, compositional part; singles are learnt almost for free.
IMAGE_MIX: dict[str, float] = {"single": 0.2, "count": 0.25, "relation": 0.55}


def sample_prompt_spec(rng: np.random.Generator, split: Split = "train",
                       mix: dict[str, float] | None = None) -> PromptSpec:
    """Draw one image prompt spec: a kind by ``mix`` (default ``IMAGE_MIX``), then a composition uniformly.

    The held-out split has only relation compositions, so ``split="heldout"`` always returns a relation.
    """
    if split == "heldout":
        pool = _specs_cached("relation", "heldout")
        return pool[int(rng.integers(len(pool)))]
    mix = mix or IMAGE_MIX
    kinds = list(mix)
    weights = np.asarray([mix[k] for k in kinds], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    pool = _specs_cached(kind, "train")
    return pool[int(rng.integers(len(pool)))]


def sample_motion_spec(rng: np.random.Generator, split: Split = "train") -> MotionPrompt:
    pool = _specs_cached("motion", split)
    return pool[int(rng.integers(len(pool)))]  # type: ignore[return-value]


_SPEC_CACHE: dict[tuple[str, str], list[PromptSpec]] = {}


def _specs_cached(kind: str, split: str) -> list[PromptSpec]:
    key = (kind, split)
    if key not in _SPEC_CACHE:
        _SPEC_CACHE[key] = prompt_specs(kind, split)  # type: ignore[arg-type]
    return _SPEC_CACHE[key]


# ---------------------------------------------------------------- layouts


class LayoutError(RuntimeError):
    """No layout satisfying a prompt was found in the allowed number of tries (should not happen)."""


def _apart(a: PlacedShape, b: PlacedShape) -> bool:
    """Bounding boxes at least ``MIN_GAP`` apart along some axis, so the drawn shapes never touch."""
    reach = a.radius + b.radius + MIN_GAP
    return abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def _random_place(rng: np.random.Generator, thing: Thing, radius_range: tuple[float, float]) -> PlacedShape:
    r = float(rng.uniform(*radius_range))
    lo, hi = MARGIN + r, 1.0 - MARGIN - r
    return PlacedShape(thing.colour, thing.shape, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), r)


def relation_holds(first: PlacedShape, second: PlacedShape, relation: str) -> bool:
    """Whether ``first`` is ``relation`` ``second`` with a clear margin (the layout rule, not the oracle's)."""
    ux, uy = RELATION_VECTORS[relation]
    dx, dy = first.x - second.x, first.y - second.y
    along, across = (dx * ux, abs(dy)) if ux else (dy * uy, abs(dx))
    return along >= first.radius + second.radius + MIN_GAP and along >= AXIS_MARGIN * across


def sample_scene(spec: PromptSpec, rng: np.random.Generator, max_tries: int = 1000) -> Scene:
    """A random layout satisfying an image prompt spec (rejection sampling, seeded by ``rng``).

    Raises:
        ValueError: for a ``MotionPrompt`` (use :func:`sample_video_scene`).
        LayoutError: if no layout is found in ``max_tries`` draws.
    """
    if isinstance(spec, MotionPrompt):
        raise ValueError(f"{spec} describes a video; use sample_video_scene().")
    for _ in range(max_tries):
        if isinstance(spec, CountPrompt):
            radius_range = SINGLE_RADIUS if spec.count == 1 else COUNT_RADIUS
            placed: list[PlacedShape] = []
            for _ in range(50 * spec.count):  # retry one object at a time; restart only if the canvas is jammed
                candidate = _random_place(rng, spec.thing, radius_range)
                if all(_apart(candidate, p) for p in placed):
                    placed.append(candidate)
                    if len(placed) == spec.count:
                        break
            if len(placed) == spec.count:
                return Scene(spec, tuple(placed))
        else:
            first = _random_place(rng, spec.first, RELATION_RADIUS)
            second = _random_place(rng, spec.second, RELATION_RADIUS)
            if _apart(first, second) and relation_holds(first, second, spec.relation):
                return Scene(spec, (first, second))
    raise LayoutError(f"No layout for {spec} in {max_tries} tries.")


def sample_video_scene(spec: MotionPrompt, rng: np.random.Generator, num_frames: int = 8) -> VideoScene:
    """A clip of ``spec.thing`` moving in ``spec.direction``, fully inside the canvas on every frame.

    Args:
        spec: the motion prompt.
        rng: seeded generator.
        num_frames: T, 2 or more (the world uses 8-16).
    """
    if num_frames < 2:
        raise ValueError(f"A motion clip needs at least 2 frames; got num_frames={num_frames}.")
    r = float(rng.uniform(*MOTION_RADIUS))
    travel = float(rng.uniform(*MOTION_TRAVEL))
    ux, uy = DIRECTION_VECTORS[spec.direction]
    lo, hi = MARGIN + r, 1.0 - MARGIN - r
    # Along the motion axis the start leaves room for the whole path; across it the position is free.
    start_along = float(rng.uniform(lo, hi - travel))
    across = float(rng.uniform(lo, hi))
    if ux:
        x0 = start_along if ux > 0 else 1.0 - start_along
        y0 = across
    else:
        y0 = start_along if uy > 0 else 1.0 - start_along
        x0 = across
    step = travel / (num_frames - 1)
    start = PlacedShape(spec.thing.colour, spec.thing.shape, x0, y0, r)
    return VideoScene(spec, start, (ux * step, uy * step), num_frames)
