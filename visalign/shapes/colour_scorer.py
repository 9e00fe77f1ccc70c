"""Continuous colour fidelity of shapes-world images: how close the drawn pixels are to the prompt's named colours.

The oracle names a pixel's colour by its chroma (each channel above half the brightest one or not), so a hue that
drifts toward a neighbouring palette colour, or an object that darkens, costs it nothing until the pixel crosses a
boundary, and then a whole attribute at once. Reward fine-tuning that trades extra objects for darker, shifted hues
(assets/shapes/README.md, Demo, point 20) therefore meets no resistance from the oracle or from a proxy that reads
colour words coarsely. This scorer prices the drift before it crosses: per foreground pixel, a Gaussian similarity
to the nearest named palette colour (the world's colours are pure, each channel 0 or 1), averaged over the
foreground.

    w(p)   = σ((max_c x_c(p) − FOREGROUND) / τ)                       soft foreground mask, in (0, 1)
    s(p)   = max_k exp(−‖x(p) − c_k‖² / (3 · 2σ_c²))                  c_k: the prompt's named colours in {0,1}³
    reward = Σ_p w(p) s(p) / (Σ_p w(p) + ε)                           in [0, 1]; under 0.07 for a black image

Everything is tensor ops, so reward backprop (DRaFT, AlignProp) gets a pixel gradient. It says nothing about shape,
count or position: use it beside a scorer that does (an ensemble or a weighted reward term).
"""

from __future__ import annotations

import torch
from torch import Tensor

from visalign.scorers.base import RawScore, ScoreBatch, Scorer
from visalign.scorers.card import ScorerCard
from visalign.shapes.grammar import parse_prompt
from visalign.shapes.oracle import FOREGROUND
from visalign.shapes.world import COLOURS, CountPrompt, MotionPrompt, RelationPrompt

# The foreground mask is the oracle's threshold (FOREGROUND), softened over about ±2τ.
DEFAULT_TEMPERATURE = 0.05
# Per-channel tolerance: a pixel 0.25 off its colour in every channel keeps exp(-0.5) ≈ 0.61 of the reward.
DEFAULT_SIGMA = 0.25
_EPS = 1e-6


def named_colours(prompts: list[str], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The palette colours each prompt names, as ``[B, K, 3]`` in {0, 1} (K = 2; a one-colour prompt repeats it)."""
    rows = []
    for prompt in prompts:
        spec = parse_prompt(prompt)
        if isinstance(spec, RelationPrompt):
            names = [spec.first.colour, spec.second.colour]
        elif isinstance(spec, (CountPrompt, MotionPrompt)):
            names = [spec.thing.colour] * 2
        else:  # pragma: no cover - the grammar has no other kinds
            raise ValueError(f"Prompt {prompt!r} is no shapes-world caption with a colour.")
        rows.append([[c / 255.0 for c in COLOURS[name]] for name in names])
    return torch.tensor(rows, device=device, dtype=dtype)


def colour_fidelity(frames: Tensor, colours: Tensor, *, sigma: float = DEFAULT_SIGMA,
                    temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Foreground-weighted similarity of every pixel to its nearest named colour.

    Args:
        frames: ``[N, 3, H, W]`` RGB in [0, 1] (black background).
        colours: ``[N, K, 3]`` target colours in [0, 1].

    Returns:
        ``[N]`` in [0, 1]; 1 when every foreground pixel is exactly a named colour, under 0.07 for an all-black
        frame (black is far from every palette colour).
    """
    weight = torch.sigmoid((frames.amax(dim=1) - FOREGROUND) / temperature)  # [N, H, W]
    diff = frames.unsqueeze(1) - colours[:, :, :, None, None]  # [N, K, 3, H, W]
    sim = torch.exp(-diff.pow(2).mean(dim=2) / (2 * sigma**2)).amax(dim=1)  # [N, H, W]
    return (weight * sim).flatten(1).sum(1) / (weight.flatten(1).sum(1) + _EPS)


class ShapesColourScorer(Scorer):
    """Colour fidelity of shapes-world images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]`` to their prompts.

    Card params: ``sigma`` (per-channel tolerance, default 0.25) and ``temperature`` (softness of the foreground
    mask, default 0.05). Videos are scored frame by frame and averaged.

    Returns (through ``Scorer.__call__``): reward, raw float32 ``[B]`` in [0, 1].

    >>> import torch
    >>> from visalign.scorers import ScoreBatch, get_scorer
    >>> image = torch.zeros(1, 3, 32, 32); image[0, 2, 8:24, 8:24] = 1.0  # a pure blue square
    >>> dim = image * 0.6                                                  # the same square, darker
    >>> out = get_scorer("shapes-colour")(ScoreBatch(prompts=["a blue square"] * 2, media=torch.cat([image, dim])))
    >>> [round(r, 3) for r in out.reward.tolist()]
    [0.999, 0.652]
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        self.sigma = float(card.params.get("sigma", DEFAULT_SIGMA))
        self.temperature = float(card.params.get("temperature", DEFAULT_TEMPERATURE))
        if self.sigma <= 0 or self.temperature <= 0:
            raise ValueError(f"Card {card.id}: sigma ({self.sigma}) and temperature ({self.temperature}) must be > 0.")

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        assert batch.media is not None  # check_batch guarantees media for image/video scorers
        media = batch.media.to(self.dtype)
        colours = named_colours(list(batch.prompts), media.device, media.dtype)
        if media.ndim == 5:  # video: every frame against the prompt's colours, then the mean over frames
            b, t = media.shape[:2]
            per_frame = colour_fidelity(media.flatten(0, 1), colours.repeat_interleave(t, dim=0),
                                        sigma=self.sigma, temperature=self.temperature)
            return RawScore(per_frame.view(b, t).mean(dim=1))
        return RawScore(colour_fidelity(media, colours, sigma=self.sigma, temperature=self.temperature))
