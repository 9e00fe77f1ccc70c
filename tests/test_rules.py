"""Rule scorers against hand-computed values: colour statistics (visalign/scorers/rules.py) and JPEG size."""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image

from visalign.scorers import ScoreBatch, get_scorer, scorer_card
from visalign.scorers.rules import COLOR_STATISTICS, ColorStatScorer


def solid(r: float, g: float, b: float, size: int = 8) -> torch.Tensor:
    """One solid-colour image ``[1, 3, size, size]``."""
    return torch.tensor([r, g, b]).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def halves(size: int = 8) -> torch.Tensor:
    """Left half black, right half white, ``[1, 3, size, size]``."""
    image = torch.zeros(1, 3, size, size)
    image[..., size // 2:] = 1.0
    return image


def raw_of(name: str, media: torch.Tensor) -> torch.Tensor:
    return get_scorer(name)(ScoreBatch(prompts=[""] * media.shape[0], media=media)).raw


# (scorer id, image, expected raw, why)
COLOUR_CASES = [
    ("brightness", solid(0.5, 0.5, 0.5), 0.5, "grey: luma = value"),
    ("brightness", solid(1.0, 0.0, 0.0), 0.299, "pure red: the Rec. 601 red weight"),
    ("brightness", solid(0.0, 0.0, 1.0), 0.114, "pure blue: the Rec. 601 blue weight"),
    ("brightness", halves(), 0.5, "half black, half white"),
    ("saturation", solid(1.0, 0.0, 0.0), 1.0, "pure red is fully saturated"),
    ("saturation", solid(0.5, 0.5, 0.5), 0.0, "grey has no saturation"),
    ("saturation", solid(0.0, 0.0, 0.0), 0.0, "black: 0 by the HSV convention, not NaN"),
    ("saturation", solid(0.8, 0.4, 0.6), 0.5, "(max - min) / max = 0.4 / 0.8"),
    ("contrast", solid(0.3, 0.6, 0.9), 0.0, "flat image"),
    ("contrast", halves(), 0.5, "half 0, half 1: the largest possible std"),
    ("colorfulness", solid(0.5, 0.5, 0.5), 0.0, "grey"),
    ("colorfulness", solid(1.0, 0.0, 0.0), 0.3 * math.sqrt(1.0 + 0.25), "red: rg = 1, yb = 0.5, no spread"),
]


@pytest.mark.parametrize(("name", "image", "expected", "why"), COLOUR_CASES, ids=[c[3] for c in COLOUR_CASES])
def test_colour_statistic_matches_hand_value(name, image, expected, why):
    assert raw_of(name, image).item() == pytest.approx(expected, abs=2e-6), why


def test_brightness_reward_is_raw_and_contrast_reward_is_scaled_by_its_bound():
    batch = ScoreBatch(prompts=["", ""], media=torch.cat([solid(0.2, 0.2, 0.2), halves()]))
    bright = get_scorer("brightness")(batch)
    torch.testing.assert_close(bright.reward, bright.raw)
    contrast = get_scorer("contrast")(batch)
    torch.testing.assert_close(contrast.reward, contrast.raw / 0.5)


def test_video_is_the_mean_over_frames():
    black, white, red = solid(0, 0, 0)[0], solid(1, 1, 1)[0], solid(1, 0, 0)[0]
    video = torch.stack([torch.stack([black, white]), torch.stack([red, red])])  # [2, 2, 3, 8, 8]
    torch.testing.assert_close(raw_of("brightness", video), torch.tensor([0.5, 0.299]))
    torch.testing.assert_close(raw_of("saturation", video), torch.tensor([0.0, 1.0]))


def test_brightness_gradient_is_the_luma_weight_per_pixel():
    image = torch.rand(1, 3, 4, 4, requires_grad=True)
    get_scorer("brightness")(ScoreBatch(prompts=[""], media=image), grad=True).reward.sum().backward()
    expected = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).expand(1, 3, 4, 4) / 16
    torch.testing.assert_close(image.grad, expected)


@pytest.mark.parametrize("statistic", sorted(COLOR_STATISTICS))
def test_gradient_is_finite_on_flat_and_black_images(statistic):
    # sqrt at zero variance and max = 0 in the saturation formula are where NaN gradients come from.
    media = torch.cat([solid(0.4, 0.4, 0.4), solid(0, 0, 0)]).requires_grad_(True)
    card = scorer_card("brightness").with_overrides(params={"statistic": statistic})
    ColorStatScorer(card)(ScoreBatch(prompts=["", ""], media=media), grad=True).reward.sum().backward()
    assert torch.isfinite(media.grad).all()


def test_unknown_statistic_lists_the_known_ones():
    card = scorer_card("brightness").with_overrides(params={"statistic": "sharpness"})
    with pytest.raises(ValueError, match="Unknown colour statistic 'sharpness'.*brightness, colorfulness"):
        ColorStatScorer(card)


def pil_jpeg_kb(image: torch.Tensor, quality: int) -> float:
    """The ddpo-pytorch recipe, written out independently: uint8 by rounding, PIL JPEG, bytes / 1000."""
    array = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def test_jpeg_raw_is_the_encoded_size_in_kilobytes():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([pil_jpeg_kb(im, 95) for im in images])
    torch.testing.assert_close(raw_of("jpeg-compressibility", images), expected)
    torch.testing.assert_close(raw_of("jpeg-incompressibility", images), expected)


def test_noise_is_less_compressible_than_a_flat_image():
    flat = solid(0.5, 0.5, 0.5, size=64)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    batch = ScoreBatch(prompts=["flat", "noise"], media=torch.cat([flat, noise]))
    compress, incompress = get_scorer("jpeg-compressibility")(batch), get_scorer("jpeg-incompressibility")(batch)
    assert compress.raw[1] > 3 * compress.raw[0]  # ~5.4 kB vs ~0.7 kB at quality 95
    assert compress.reward[0] > compress.reward[1]
    assert incompress.reward[1] > incompress.reward[0]
    # The two cards are mirror images: lo/hi = 500/0 and 0/500.
    torch.testing.assert_close(compress.reward, 1 - incompress.reward)
    torch.testing.assert_close(incompress.reward, incompress.raw / 500)


def test_jpeg_quality_comes_from_the_card():
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    low = get_scorer("jpeg-incompressibility", params={"quality": 10})
    assert low(ScoreBatch(prompts=[""], media=noise)).raw.item() == pytest.approx(pil_jpeg_kb(noise[0], 10))
    assert pil_jpeg_kb(noise[0], 10) < pil_jpeg_kb(noise[0], 95)


def test_jpeg_video_is_the_mean_over_frames():
    frames = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = sum(pil_jpeg_kb(f, 95) for f in frames) / 3
    assert raw_of("jpeg-incompressibility", frames.unsqueeze(0)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("quality", [0, 100, 95.0, "95"])
def test_jpeg_rejects_a_bad_quality(quality):
    with pytest.raises(ValueError, match="params.quality"):
        get_scorer("jpeg-compressibility", params={"quality": quality})


def test_jpeg_refuses_gradients():
    media = torch.rand(1, 3, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="not differentiable"):
        get_scorer("jpeg-compressibility")(ScoreBatch(prompts=[""], media=media), grad=True)
