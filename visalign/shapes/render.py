"""Rasterise shapes-world scenes into visalign's canonical pixels.

Shapes are drawn with PIL at ``SUPERSAMPLE``x the target resolution and box-downsampled
(``Image.reduce``), which gives anti-aliased edges whose pixel value is the covered fraction of the pure
colour. Output follows the canonical layout of docs/architecture.md#canonical-data: float32 in [0, 1], ``[3, H, W]``
for an image and ``[T, 3, H, W]`` for a video, black background. Rendering is a pure function of the scene, so a seeded
scene sampler makes the whole pipeline deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from visalign.shapes.world import COLOURS, PlacedShape, Scene, VideoScene

SUPERSAMPLE = 4
MIN_SIZE_PX, MAX_SIZE_PX = 16, 256


def _check_size(size_px: int) -> None:
    if not MIN_SIZE_PX <= size_px <= MAX_SIZE_PX:
        raise ValueError(f"size_px={size_px} is outside [{MIN_SIZE_PX}, {MAX_SIZE_PX}]; "
                         "the world is designed for 32-64 px.")


def _draw(draw: ImageDraw.ImageDraw, shape: PlacedShape, canvas_px: int) -> None:
    # Pixel i covers [i, i+1); PIL boxes include both end pixels, hence the -1 on the far side.
    cx, cy, r = shape.x * canvas_px, shape.y * canvas_px, shape.radius * canvas_px
    fill = COLOURS[shape.colour]
    left, top, right, bottom = cx - r, cy - r, cx + r - 1, cy + r - 1
    if shape.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif shape.shape == "triangle":
        # Upright isosceles triangle filling its bounding box: apex top-centre, base along the bottom.
        draw.polygon([(cx - 0.5, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        raise ValueError(f"Cannot draw shape {shape.shape!r}.")


def render_shapes(shapes: Sequence[PlacedShape], size_px: int = 32) -> np.ndarray:
    """Draw shapes on a black square canvas.

    Args:
        shapes: shapes with centres and radii in canvas fractions.
        size_px: output side H = W in pixels (16-256; the world uses 32-64).

    Returns:
        float32 ``[3, H, W]`` in [0, 1].
    """
    _check_size(size_px)
    canvas_px = size_px * SUPERSAMPLE
    img = Image.new("RGB", (canvas_px, canvas_px), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for shape in shapes:
        _draw(draw, shape, canvas_px)
    small = np.asarray(img.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0  # box filter → anti-aliasing
    return np.ascontiguousarray(small.transpose(2, 0, 1))


def render_scene(scene: Scene, size_px: int = 32) -> np.ndarray:
    """A still scene → float32 ``[3, H, W]`` in [0, 1]."""
    return render_shapes(scene.shapes, size_px)


def render_video(scene: VideoScene, size_px: int = 32) -> np.ndarray:
    """A motion clip → float32 ``[T, 3, H, W]`` in [0, 1], frames in time order."""
    return np.stack([render_shapes([scene.frame(t)], size_px) for t in range(scene.num_frames)])


def render_batch(scenes: Sequence[Scene] | Sequence[VideoScene], size_px: int = 32) -> np.ndarray:
    """Scenes → float32 ``[B, 3, H, W]`` (stills) or ``[B, T, 3, H, W]`` (clips of equal length) in [0, 1]."""
    if not scenes:
        raise ValueError("render_batch needs at least one scene.")
    if all(isinstance(s, VideoScene) for s in scenes):
        lengths = {s.num_frames for s in scenes}  # type: ignore[union-attr]
        if len(lengths) > 1:
            raise ValueError(f"Clips in one batch must have equal num_frames; got {sorted(lengths)}.")
        return np.stack([render_video(s, size_px) for s in scenes])  # type: ignore[arg-type]
    if any(isinstance(s, VideoScene) for s in scenes):
        raise ValueError("render_batch got a mix of stills and clips; render them in separate batches.")
    return np.stack([render_scene(s, size_px) for s in scenes])  # type: ignore[arg-type]
