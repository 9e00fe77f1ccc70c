"""Embedders: the protocol distributional rewards build on, a weight-free colour embedder, and a resolver.

An *embedder* is any object with ``embed_images(media [B, 3, H, W]) -> [B, D]`` and/or
``embed_texts(list[str]) -> [B, D]`` (float32), plus an ``id`` string that names the encoder and its
configuration (exemplar statistics are cached under it, so two different encoders must never share an id).
Scorers that expose these two methods (CLIP, ``visalign.scorers.clip:ClipScorer``) serve as embedders through
:func:`resolve_embedder`; :class:`ColorHistogramEmbedder` is a deterministic, differentiable built-in with no
weights, cheap enough for offline tests and for colour/layout-matching rewards.

Used by ``visalign.scorers.distributional`` (docs/methods.md#dragon and #scorers: centroid/kNN similarity, Fréchet
distance, Vendi, MMD over embedding sets).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from visalign.registry import Registry, UnknownIdError

__all__ = ["ColorHistogramEmbedder", "Embedder", "EMBEDDERS", "ScorerEmbedder", "embed_media", "resolve_embedder"]


@runtime_checkable
class Embedder(Protocol):
    """What distributional rewards need from an encoder. Either method may be missing (image-only, text-only)."""

    id: str

    def embed_images(self, media: Tensor) -> Tensor:  # pragma: no cover - protocol
        """float in [0, 1], ``[B, 3, H, W]`` → float32 ``[B, D]``."""
        ...


class ColorHistogramEmbedder:
    """Soft per-channel colour histogram plus colour and spatial moments; no weights, differentiable.

    Each pixel value v of each RGB channel votes for ``bins`` evenly spaced centres with Gaussian weights
    ``exp(−(v − c)² / (2·width²))`` normalised over the bins, so the histogram has a gradient everywhere
    (a hard histogram has none). Features, concatenated per image:

    - soft histogram, ``[3 · bins]``, each channel's part sums to 1;
    - per-channel mean and standard deviation, ``[6]``, in [0, 1] and [0, 0.5];
    - per-channel centre of mass (x, y) in [−1, 1], ``[6]``: where the colour sits, so layouts differ too.

    Args:
        bins: histogram bins per channel.
        size_px: images are resized to ``size_px × size_px`` first (antialiased bilinear) so cost does not
            grow with resolution and embeddings do not depend on the input size.
        width: Gaussian width of the soft vote, in pixel-value units; default ``0.5 / bins`` (half a bin).

    >>> emb = ColorHistogramEmbedder(bins=4)
    >>> emb.embed_images(torch.rand(2, 3, 16, 16)).shape
    torch.Size([2, 24])
    """

    def __init__(self, bins: int = 8, size_px: int = 32, width: float | None = None) -> None:
        if bins < 2:
            raise ValueError(f"ColorHistogramEmbedder needs bins >= 2; got {bins}.")
        if size_px < 2:
            raise ValueError(f"ColorHistogramEmbedder needs size_px >= 2; got {size_px}.")
        self.bins = int(bins)
        self.size_px = int(size_px)
        self.width = float(width) if width is not None else 0.5 / self.bins
        if self.width <= 0:
            raise ValueError(f"ColorHistogramEmbedder needs width > 0; got {self.width}.")

    @property
    def id(self) -> str:
        # Every parameter that changes the embedding is in the id: cached exemplar statistics are keyed by it.
        return f"color-histogram-v1-b{self.bins}-s{self.size_px}-w{self.width:.6g}"

    @property
    def dim(self) -> int:
        return 3 * self.bins + 12

    def embed_images(self, media: Tensor) -> Tensor:
        """Embed images.

        Args:
            media: float in [0, 1], ``[B, 3, H, W]``.

        Returns:
            float32 ``[B, 3 · bins + 12]``; keeps the autograd graph to ``media`` when gradients are enabled.
        """
        if media.ndim != 4 or media.shape[1] != 3:
            raise ValueError(f"ColorHistogramEmbedder wants images [B, 3, H, W]; got {tuple(media.shape)}.")
        from visalign.media import resize_to

        x = resize_to(media.float(), (self.size_px, self.size_px))
        b = x.shape[0]
        pixels = x.reshape(b, 3, -1)  # [B, 3, P]
        centres = (torch.arange(self.bins, device=x.device, dtype=x.dtype) + 0.5) / self.bins
        votes = torch.exp(-0.5 * ((pixels.unsqueeze(-1) - centres) / self.width) ** 2)  # [B, 3, P, bins]
        votes = votes / votes.sum(-1, keepdim=True)
        hist = votes.mean(2).reshape(b, -1)
        mean = pixels.mean(-1)
        # sqrt(var + eps): a flat channel has zero variance, where sqrt's gradient is infinite.
        std = (pixels.var(-1, unbiased=False) + 1e-6).sqrt()
        ys = torch.linspace(-1, 1, self.size_px, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, ys, indexing="ij")
        # eps keeps a black channel's centre at the middle (0, 0) instead of 0/0.
        mass = (pixels + 1e-4) / (pixels + 1e-4).sum(-1, keepdim=True)
        centre = torch.stack([(mass * grid_x.reshape(-1)).sum(-1), (mass * grid_y.reshape(-1)).sum(-1)], -1)
        return torch.cat([hist, mean, std, centre.reshape(b, -1)], dim=1).float()

    def __repr__(self) -> str:
        return f"ColorHistogramEmbedder(bins={self.bins}, size_px={self.size_px}, width={self.width:.6g})"


class ScorerEmbedder:
    """A scorer that exposes ``embed_images``/``embed_texts`` (e.g. CLIP), used as an embedder.

    Loads the scorer's weights on first use and moves media to its device. The id combines the scorer id with
    where its weights come from, so a tiny test checkpoint and the real one never share cached statistics.
    """

    def __init__(self, scorer: Any) -> None:
        if not (hasattr(scorer, "embed_images") or hasattr(scorer, "embed_texts")):
            raise TypeError(f"Scorer {getattr(scorer, 'id', scorer)!r} has neither embed_images nor embed_texts, "
                            "so it cannot embed exemplars; pick a CLIP-style scorer or 'color-histogram'.")
        self.scorer = scorer

    @property
    def id(self) -> str:
        card = getattr(self.scorer, "card", None)
        source = card.weights_source if card is not None else type(self.scorer).__name__
        return f"{self.scorer.id}@{source}"

    def _ready(self) -> None:
        ensure = getattr(self.scorer, "ensure_loaded", None)
        if ensure is not None:
            ensure()

    def has(self, side: str) -> bool:
        return hasattr(self.scorer, f"embed_{side}")

    def embed_images(self, media: Tensor) -> Tensor:
        """float in [0, 1] ``[B, 3, H, W]`` → float32 ``[B, D]`` through the scorer's image tower."""
        if not self.has("images"):
            raise TypeError(f"Scorer {self.scorer.id!r} has no embed_images; it cannot embed images.")
        self._ready()
        device = getattr(self.scorer, "device", media.device)
        return self.scorer.embed_images(media.to(device)).float()

    def embed_texts(self, texts: list[str]) -> Tensor:
        """``list[str]`` of length B → float32 ``[B, D]`` through the scorer's text tower."""
        if not self.has("texts"):
            raise TypeError(f"Scorer {self.scorer.id!r} has no embed_texts; it cannot embed text exemplars.")
        self._ready()
        return self.scorer.embed_texts(list(texts)).float()

    def __repr__(self) -> str:
        return f"ScorerEmbedder({self.scorer!r})"


# Built-in weight-free embedders by name; scorer ids (CLIP ...) are resolved through get_scorer instead.
EMBEDDERS: Registry[type] = Registry(
    "embedder", {"color-histogram": "visalign.scorers.embedders:ColorHistogramEmbedder"})


def resolve_embedder(spec: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     weights: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> Any:
    """Turn an embedder spec into an object with ``id`` and ``embed_images`` and/or ``embed_texts``.

    Args:
        spec: an object that already has ``embed_images``/``embed_texts`` (returned as is, wrapped if it is a
            Scorer), a built-in embedder name (``"color-histogram"``), or a scorer id / ``"pkg.mod:Name"`` that
            :func:`visalign.scorers.get_scorer` builds and that exposes ``embed_images``/``embed_texts``.
        device: device of a scorer-backed embedder.
        dtype: compute dtype of a scorer-backed embedder.
        weights: weights override passed to ``get_scorer`` (e.g. ``{"local_dir": ...}``).
        params: constructor keywords of a built-in embedder, or the params override of a scorer.

    Returns:
        The embedder.

    Raises:
        KeyError: for an unknown name, listing the built-in embedders and the scorer ids.
        TypeError: when the named scorer cannot embed.
    """
    from visalign.scorers import Scorer, get_scorer

    if isinstance(spec, Scorer):
        return ScorerEmbedder(spec)
    if hasattr(spec, "embed_images") or hasattr(spec, "embed_texts"):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"Cannot use {spec!r} as an embedder: pass an object with embed_images/embed_texts, "
                        f"a built-in embedder name ({', '.join(EMBEDDERS.list())}) or a scorer id.")
    if spec in EMBEDDERS:
        try:
            return EMBEDDERS.get(spec)(**(params or {}))
        except TypeError as err:
            raise ValueError(f"Bad parameters {params} for embedder {spec!r}: {err}") from None
    try:
        scorer = get_scorer(spec, device=device, dtype=dtype, weights=weights, params=params)
    except UnknownIdError as err:
        raise UnknownIdError(f"{err} As an embedder, also accepted: {', '.join(EMBEDDERS.list())}.") from None
    return ScorerEmbedder(scorer)


def embed_media(embedder: Any, media: Tensor, chunk_size: int = 64) -> Tensor:
    """Embed images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]`` (frames averaged) → float32 ``[B, D]``.

    Videos are embedded frame by frame and the frame embeddings averaged: the cheapest video embedding that any
    image encoder supports. Work is split in chunks of ``chunk_size`` images to bound memory.
    """
    if not hasattr(embedder, "embed_images"):
        raise TypeError(f"Embedder {getattr(embedder, 'id', embedder)!r} cannot embed images (no embed_images).")
    if media.ndim == 5:
        b, t = media.shape[:2]
        return embed_media(embedder, media.reshape(b * t, *media.shape[2:]), chunk_size).reshape(b, t, -1).mean(1)
    if media.ndim != 4:
        raise ValueError(f"media must be [B, 3, H, W] or [B, T, 3, H, W]; got {tuple(media.shape)}.")
    parts = [embedder.embed_images(media[i:i + chunk_size]) for i in range(0, media.shape[0], chunk_size)]
    return torch.cat(parts).float()
