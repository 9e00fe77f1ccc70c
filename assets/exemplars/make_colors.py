"""Write the tiny colour exemplar set ``assets/exemplars/colors/`` (12 PNGs, 32 × 32 px, a few hundred bytes each).

Warm-coloured (red, orange, yellow, magenta) filled shapes on a dark background, placed on a fixed jitter so the
set has some spread: an exemplar set for the ``exemplar-*-color`` scorer cards, which embed it with the
weight-free ``ColorHistogramEmbedder``. Deterministic: rerunning rewrites byte-identical files.

    python assets/exemplars/make_colors.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE_PX = 32
BACKGROUND = (16, 16, 24)
COLOURS = {"red": (220, 40, 30), "orange": (240, 140, 20), "yellow": (235, 215, 40), "magenta": (210, 40, 170)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, colour: tuple[int, int, int], offset: tuple[int, int], radius: int) -> Image.Image:
    img = Image.new("RGB", (SIZE_PX, SIZE_PX), BACKGROUND)
    pen = ImageDraw.Draw(img)
    cx, cy = SIZE_PX // 2 + offset[0], SIZE_PX // 2 + offset[1]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return img


def main(folder: Path | None = None) -> None:
    folder = folder or Path(__file__).resolve().parent / "colors"
    folder.mkdir(parents=True, exist_ok=True)
    offsets = [(-6, -4), (5, 3), (0, 6), (-3, -7), (7, -2), (-5, 5)]
    index = 0
    for name, colour in COLOURS.items():
        for shape in SHAPES:
            offset = offsets[index % len(offsets)]
            radius = 6 + index % 4
            draw(shape, colour, offset, radius).save(folder / f"{index:02d}-{name}-{shape}.png", optimize=True)
            index += 1


if __name__ == "__main__":
    main()
