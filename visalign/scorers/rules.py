"""Rule scorers: colour statistics of the pixels and JPEG file size. No weights, no prompt.

* :class:`ColorStatScorer` reads one statistic from a table (:data:`COLOR_STATISTICS`) chosen by the card's
  ``params.statistic``: mean Rec. 601 luma (brightness), mean HSV saturation, luma standard deviation (RMS
  contrast) and Hasler–Süsstrunk colourfulness ("Measuring colourfulness in natural images", SPIE 2003).
  Every statistic is written in differentiable tensor ops, so these scorers serve reward backprop as well as
  monitors of over-saturation and darkening (docs/methods.md#hacking-diagnostics).
* :class:`JpegScorer` is DDPO's compressibility reward (kvablack/ddpo-pytorch ``ddpo_pytorch/rewards.py``,
  ``jpeg_incompressibility``): quantise to uint8, encode as JPEG at quality 95 with PIL, and measure the size in
  kilobytes (1 kB = 1000 bytes, as there). ddpo rewards ``-size`` for compressibility; here ``raw`` is always the
  size and the card's affine bounds (``lo > hi`` flips the sign) turn it into a reward in [0, 1].

Videos ``[B, T, 3, H, W]`` are scored frame by frame and averaged over frames.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from torch import Tensor

from visalign.registry import unknown_id_message
from visalign.scorers.base import RawScore, ScoreBatch, Scorer
from visalign.scorers.card import ScorerCard

# ITU-R BT.601 luma weights, applied to gamma-encoded RGB (Y', what "brightness" of an sRGB image usually means).
REC601_LUMA = (0.299, 0.587, 0.114)

# sqrt() has an infinite derivative at 0, and a flat image has zero variance: clamp below so that grad=True on a
# flat image gives finite (zero) gradients instead of NaN. The value this adds is at most 1e-6.
_SQRT_FLOOR = 1e-12


def _luma(frames: Tensor) -> Tensor:
    """``[N, 3, H, W]`` RGB in [0, 1] → ``[N, H, W]`` Rec. 601 luma in [0, 1]."""
    weights = frames.new_tensor(REC601_LUMA).view(1, 3, 1, 1)
    return (frames * weights).sum(dim=1)


def _safe_sqrt(x: Tensor) -> Tensor:
    return x.clamp_min(_SQRT_FLOOR).sqrt()


def brightness(frames: Tensor) -> Tensor:
    """Mean Rec. 601 luma per frame: ``[N, 3, H, W]`` in [0, 1] → ``[N]`` in [0, 1]."""
    return _luma(frames).flatten(1).mean(dim=1)


def saturation(frames: Tensor) -> Tensor:
    """Mean HSV saturation ``(max − min) / max`` per frame (0 where max = 0): ``[N, 3, H, W]`` → ``[N]`` in [0, 1].

    amax/amin route the gradient to the extreme channel of each pixel, as the HSV formula itself does.
    """
    top = frames.amax(dim=1)
    spread = top - frames.amin(dim=1)
    # Black pixels have no hue and saturation 0 by the HSV convention; clamp_min keeps their gradient finite.
    sat = torch.where(top > 0, spread / top.clamp_min(1e-8), torch.zeros_like(top))
    return sat.flatten(1).mean(dim=1)


def contrast(frames: Tensor) -> Tensor:
    """RMS contrast: population standard deviation of luma per frame, ``[N, 3, H, W]`` → ``[N]`` in [0, 0.5]."""
    return _safe_sqrt(_luma(frames).flatten(1).var(dim=1, unbiased=False))


def colorfulness(frames: Tensor) -> Tensor:
    """Hasler–Süsstrunk colourfulness ``sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²)`` on [0, 1] RGB.

    ``rg = R − G`` and ``yb = (R + G)/2 − B``. The paper works on 0–255 values; this is that number / 255, so
    its thresholds read: 15/255 slightly, 59/255 quite, 109/255 extremely colourful.

    Args:
        frames: float ``[N, 3, H, W]`` in [0, 1].

    Returns:
        float ``[N]`` in [0, 1.3·√2] (each of rg, yb lies in [−1, 1], so each σ and |μ| is at most 1).
    """
    r, g, b = frames.unbind(dim=1)
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    spread = _safe_sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    offset = _safe_sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return spread + 0.3 * offset


# statistic name → function of frames [N, 3, H, W] → [N]. A new statistic is a new row, never an elif.
# Functions, not lambdas: the scorer keeps only the name, and module-level functions keep everything picklable.
COLOR_STATISTICS: dict[str, Callable[[Tensor], Tensor]] = {
    "brightness": brightness,
    "saturation": saturation,
    "contrast": contrast,
    "colorfulness": colorfulness,
}


def _per_frame(media: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``fn`` to images ``[B, 3, H, W]`` or to every frame of videos ``[B, T, 3, H, W]`` (mean over T)."""
    if media.ndim == 4:
        return fn(media)
    b, t = media.shape[:2]
    return fn(media.reshape(b * t, *media.shape[2:])).reshape(b, t).mean(dim=1)


class ColorStatScorer(Scorer):
    """A differentiable colour statistic of the pixels, picked by name from :data:`COLOR_STATISTICS`.

    Card params:
        statistic: one of ``brightness``, ``saturation``, ``contrast``, ``colorfulness``.

    Args:
        card: the variant's card; ``params.statistic`` is checked here, so a bad card fails when it is built.
        device: where inputs are moved before scoring.
        dtype: unused (no weights); kept for the common constructor.

    Returns (from ``__call__``):
        ``ScoreOutput`` with ``raw [B]`` float32, the statistic (per frame, then mean over frames for videos).

    >>> import torch
    >>> from visalign.scorers import ScoreBatch, get_scorer
    >>> scorer = get_scorer("brightness")
    >>> scorer(ScoreBatch(prompts=["grey"], media=torch.full((1, 3, 8, 8), 0.25))).raw
    tensor([0.2500])
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        name = card.params.get("statistic")
        if name not in COLOR_STATISTICS:
            raise ValueError(unknown_id_message("colour statistic", str(name), COLOR_STATISTICS,
                                                f" Set params.statistic in card {card.source or card.id}."))
        self.statistic = name

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        media = batch.media.float()  # half-precision sums over H·W pixels lose digits; the inputs are small
        return RawScore(_per_frame(media, COLOR_STATISTICS[self.statistic]))


class JpegScorer(Scorer):
    """JPEG size in kilobytes at the card's quality (DDPO's compressibility / incompressibility reward).

    Not differentiable: the encoder quantises to uint8 and runs in PIL. Compressibility and incompressibility are
    two cards over this one class; they differ only in the sign of their affine bounds.

    Card params:
        quality: JPEG quality 1–95 passed to PIL (ddpo-pytorch uses 95).

    Returns (from ``__call__``):
        ``ScoreOutput`` with ``raw [B]`` float32 = encoded size in kB (1000 bytes), mean over frames for videos.

    >>> import torch
    >>> from visalign.scorers import ScoreBatch, get_scorer
    >>> scorer = get_scorer("jpeg-compressibility")
    >>> flat, noise = torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64)
    >>> out = scorer(ScoreBatch(prompts=["flat", "noise"], media=torch.cat([flat, noise])))
    >>> bool(out.reward[0] > out.reward[1])
    True
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        quality = card.params.get("quality", 95)
        # PIL accepts up to 100, but documents values above 95 as disabling parts of the algorithm.
        if not isinstance(quality, int) or not 1 <= quality <= 95:
            raise ValueError(f"params.quality in card {card.source or card.id} must be an integer in 1..95; "
                             f"got {quality!r}.")
        self.quality = quality

    def _kilobytes(self, image: Tensor) -> float:
        from visalign.media import to_pil  # uint8 quantisation lives in media.py, rounding as ddpo does

        buffer = io.BytesIO()  # in memory: scorers never write files
        to_pil(image).save(buffer, format="JPEG", quality=self.quality)
        return buffer.tell() / 1000

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        media = batch.media
        frames = media.reshape(-1, *media.shape[-3:])
        sizes = torch.tensor([self._kilobytes(f) for f in frames], dtype=torch.float32)
        sizes = sizes.reshape(media.shape[0], -1).mean(dim=1)
        return RawScore(sizes.to(media.device))
