"""The base generator's training stream: rendered scenes whose images show one object too many, sometimes.

Why the noise (docs/shapes.md#reward-fine-tuning and #targets): reward fine-tuning in a few CPU minutes can *sharpen* a
behaviour the base model already produces sometimes, but cannot *discover* one it never produces (the prototype's
relation order stayed a coin flip under GRPO). So the base model is trained to be right about the number of objects
only most of the time, on every prompt kind:

- a count prompt ("two blue squares", counts 1-4) shows, with probability ``extra_object_p``, ``count + 1``
  copies (``4 → 3``, the world has no 5);
- a relation prompt shows, with the same probability, a third object: a copy of one of the two named things,
  placed clear of both (the two named objects still satisfy the relation).

The wrong alternative is always *one* specific outcome ("one extra object"), never spread over several: CFG
sharpens a conditional by roughly ``p(x|c)^w / p(x)^(w-1)``, so a 60/40 split between two outcomes survives as a
visible mixture where 60 % right vs three 13 % wrongs would be guided away. The result is a model that is fluent
on colour and shape and over-draws by one object on a fixed share of samples of *any* prompt, including held-out
compositions, which an oracle-rewarded (or proxy-rewarded) GRPO run can shift within minutes.

Colour, shape and relation wording are never corrupted, and captions always come from the grammar, so the noise
lives in the images only. Every draw comes from one seeded ``numpy.random.Generator``: the stream is a pure
function of its seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from visalign.shapes.build import ShapesBatch
from visalign.shapes.grammar import caption
from visalign.shapes.render import render_shapes
from visalign.shapes.world import (
    IMAGE_MIX,
    MARGIN,
    MIN_GAP,
    RELATION_RADIUS,
    CountPrompt,
    PlacedShape,
    PromptSpec,
    RelationPrompt,
    sample_prompt_spec,
    sample_scene,
)


@dataclass
class NoisyStreamConfig:
    """The base generator's training stream (seeded; see the module docstring for the noise)."""

    seed: int = field(default=0, metadata={"help": "Seed of the stream; the same seed yields the same batches."})
    batch_size: int = field(default=64, metadata={"help": "Images per yielded batch."})
    size_px: int = field(default=32, metadata={"help": "Side of the square images in pixels."})
    extra_object_p: float = field(default=0.4, metadata={
        "help": "Probability that an image shows one object more than its caption says (0 = clean data)."})
    mix: dict[str, float] = field(default_factory=lambda: dict(IMAGE_MIX), metadata={
        "help": "Share of single / count / relation prompts (normalised)."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.extra_object_p < 0.5:
            raise ValueError(f"extra_object_p ({self.extra_object_p}) must be in [0, 0.5): at 0.5 or more the "
                             "caption's count is no longer the most likely image, and nothing is right 'mostly'.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least 1.")


def noisy_scene_shapes(spec: PromptSpec, rng: np.random.Generator, extra_object_p: float) -> tuple[PlacedShape, ...]:
    """The shapes drawn for one training caption: the prompt's scene, or with ``extra_object_p`` one object more.

    Args:
        spec: a single, count or relation prompt.
        rng: seeded generator (all randomness comes from it).
        extra_object_p: probability of the extra object, in [0, 0.5).

    Returns:
        The placed shapes (canvas fractions), ready for :func:`visalign.shapes.render.render_shapes`.
    """
    noisy = bool(rng.random() < extra_object_p)
    if isinstance(spec, CountPrompt):
        if noisy:
            shown = spec.count + 1 if spec.count < 4 else 3
            return sample_scene(CountPrompt(spec.thing, shown), rng).shapes
        return sample_scene(spec, rng).shapes
    if not isinstance(spec, RelationPrompt):
        raise ValueError(f"{spec} is not an image prompt; the noisy stream draws single, count and relation scenes.")
    shapes = sample_scene(spec, rng).shapes
    if not noisy:
        return shapes
    thing = spec.first if rng.random() < 0.5 else spec.second
    for _ in range(200):
        r = float(rng.uniform(*RELATION_RADIUS))
        lo, hi = MARGIN + r, 1.0 - MARGIN - r
        extra = PlacedShape(thing.colour, thing.shape, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), r)
        if all(_clear(extra, s) for s in shapes):
            return (*shapes, extra)
    return shapes  # a jammed canvas (rare): keep the clean scene rather than overlap shapes


def _clear(a: PlacedShape, b: PlacedShape) -> bool:
    # Same rule as the world's layouts: bounding boxes MIN_GAP apart along some axis, so shapes never touch.
    reach = a.radius + b.radius + MIN_GAP
    return abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def iter_noisy_image_batches(config: NoisyStreamConfig) -> Iterator[ShapesBatch]:
    """An endless, seeded stream of (image, caption) pairs with the extra-object noise.

    Yields:
        :class:`~visalign.shapes.build.ShapesBatch`: ``media`` float32 ``[B, 3, H, W]`` in [0, 1]; ``captions``
        random grammar wordings of ``specs`` (the caption's spec, not necessarily what the image shows).

    >>> batch = next(iter_noisy_image_batches(NoisyStreamConfig(batch_size=2)))
    >>> batch.media.shape
    (2, 3, 32, 32)
    """
    rng = np.random.default_rng(config.seed)
    while True:
        specs = [sample_prompt_spec(rng, "train", config.mix) for _ in range(config.batch_size)]
        media = np.stack([render_shapes(noisy_scene_shapes(s, rng, config.extra_object_p), config.size_px)
                          for s in specs])
        yield ShapesBatch(media, [caption(s, rng) for s in specs], specs)
