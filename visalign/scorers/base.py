"""The scorer contract: ``ScoreBatch`` in, ``ScoreOutput`` out, one class per mechanism, variants as cards.

See docs/architecture.md#scorer-contract and docs/extending.md#scorers-and-rewards. A mechanism subclasses
:class:`Scorer` and implements ``load`` (heavy weights, called lazily on first use) and ``score_raw`` (a batch → raw
scores ``[B]``). The base class does everything else the contract promises: input checks, ``grad`` handling,
normalisation to a reward, dtype and shape of the output, and a pickle that carries no weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from visalign.scorers.card import ScorerCard

MODALITIES = ("image", "video", "text")
KINDS = ("pointwise", "pairwise-vs-reference", "set-level")
NEEDS = ("prompt", "reference", "exemplars", "question")


@dataclass
class ScoreBatch:
    """One batch to score; every field is paired 1:1 with the samples.

    Args:
        prompts: ``list[str]`` of length B (the condition each sample was generated for).
        media: float in [0, 1], ``[B, 3, H, W]`` (image) or ``[B, T, 3, H, W]`` (video); None for text.
        texts: completions for text scorers, ``list[str]`` of length B; None for image/video.
        references: float in [0, 1], ``[B, 3, H, W]`` (one reference per sample) or ``[B, K, 3, H, W]``
            (K references per sample); for CLIP-I, λ-Harmonic and "better than a reference" scorers.
        metadata: one dict per sample (questions, prompt ids, ...), or None.
    """

    prompts: list[str]
    media: Tensor | None = None
    texts: list[str] | None = None
    references: Tensor | None = None
    metadata: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            raise TypeError("prompts must be a list of strings, one per sample, not a single string.")
        self.prompts = list(self.prompts)
        if self.media is None and self.texts is None:
            raise ValueError("A ScoreBatch needs media (images/videos) or texts (completions).")
        n = len(self)
        for name in ("prompts", "texts", "metadata"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"ScoreBatch has {n} samples but {len(value)} {name}; pass exactly one per sample.")
        if self.media is not None and self.media.ndim not in (4, 5):
            raise ValueError(f"media must be [B, 3, H, W] or [B, T, 3, H, W]; got shape {tuple(self.media.shape)}.")
        if self.references is not None and self.references.shape[0] != n:
            raise ValueError(f"ScoreBatch has {n} samples but {self.references.shape[0]} references.")

    def __len__(self) -> int:
        return self.media.shape[0] if self.media is not None else len(self.texts or [])

    def select(self, index: list[int] | Tensor) -> ScoreBatch:
        """The sub-batch at ``index`` (used for per-sample scoring and streaming)."""
        idx = [int(i) for i in index]
        return ScoreBatch(
            prompts=[self.prompts[i] for i in idx],
            media=self.media[idx] if self.media is not None else None,
            texts=[self.texts[i] for i in idx] if self.texts is not None else None,
            references=self.references[idx] if self.references is not None else None,
            metadata=[self.metadata[i] for i in idx] if self.metadata is not None else None,
        )


@dataclass
class ScoreOutput:
    """What every scorer returns.

    Attributes:
        reward: float32 ``[B]``, normalised by the card's rule (usually into [0, 1]); NaN = does not apply.
        raw: float32 ``[B]``, the scorer's native value (cosine, logit, probability, bytes, ...).
        extras: named tensors, e.g. ``uncertainty [B]``, ``per_question [B, Q]``, ``p_yes [B]``, ``weight [B]``.
    """

    reward: Tensor
    raw: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class RawScore:
    """What ``Scorer.score_raw`` returns: native values ``[B]`` and optional extras."""

    values: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


class WeightsUnavailableError(RuntimeError):
    """Weights for a scorer could not be found locally and the hub is unreachable or disabled."""


class Scorer:
    """Base class of every scoring mechanism. Subclasses implement ``load`` and ``score_raw``.

    Args:
        card: the variant's card (id, capabilities, weights source, parameters, normalisation).
        device: where weights and inputs live (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        dtype: compute dtype for the model (inputs are cast to it; outputs are always float32).
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.card = card
        self.device = torch.device(device)
        self.dtype = dtype
        self._loaded = False

    # -- declared capabilities (read from the card, so a variant can differ from its mechanism's default) --
    @property
    def id(self) -> str:
        return self.card.id

    @property
    def modality(self) -> str:
        return self.card.modality

    @property
    def kind(self) -> str:
        return self.card.kind

    @property
    def needs(self) -> frozenset[str]:
        return frozenset(self.card.needs)

    @property
    def differentiable(self) -> bool:
        return self.card.differentiable

    @property
    def reward_range(self) -> tuple[float, float]:
        """Closed interval that ``ScoreOutput.reward`` lies in."""
        return self.card.normalizer.output_range(self.card.raw_range)

    # -- to implement --
    def load(self) -> None:
        """Load heavy weights onto ``self.device``/``self.dtype``. Called once, on the first score."""

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        """Native scores ``[B]`` for a validated batch already on this scorer's device."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_raw().")

    # -- the contract --
    def __call__(self, batch: ScoreBatch, *, grad: bool = False) -> ScoreOutput:
        """Score a batch.

        Args:
            batch: the samples and what the card says this scorer needs.
            grad: keep the autograd graph back to ``batch.media`` (only for differentiable scorers).

        Returns:
            ``ScoreOutput`` with float32 ``reward [B]`` and ``raw [B]``.
        """
        if grad and not self.differentiable:
            raise ValueError(f"Scorer {self.id!r} is not differentiable; call it with grad=False.")
        self.check_batch(batch)
        self.ensure_loaded()
        batch = self._to_device(batch)
        frames = batch.media.shape[1] if self.modality == "image" and batch.media is not None and \
            batch.media.ndim == 5 else 0
        if frames:  # an image scorer on videos scores every frame; the video's value is the mean over frames
            batch = _frames_as_images(batch)
        # no_grad, not inference_mode: inference tensors cannot be saved for backward when a reward enters a loss.
        with torch.enable_grad() if grad else torch.no_grad():
            out = self.score_raw(batch)
            raw = out.values.float().reshape(-1)
            if raw.shape[0] != len(batch):
                raise RuntimeError(f"Scorer {self.id!r} returned {raw.shape[0]} scores for {len(batch)} samples.")
            extras = out.extras
            if frames:
                per_frame = raw.reshape(-1, frames)
                raw = per_frame.mean(dim=1)
                # Per-sample extras ([B·T, ...]) are averaged over frames; batch-level ones (0-d) are kept as they are.
                extras = {k: (v.reshape(-1, frames, *v.shape[1:]).float().mean(dim=1)
                              if v.ndim >= 1 and v.shape[0] == per_frame.numel() else v) for k, v in extras.items()}
                extras["per_frame"] = per_frame
            reward = self.card.normalizer(raw)
        return ScoreOutput(reward=reward, raw=raw, extras=extras)

    def ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()
            self._loaded = True

    def check_batch(self, batch: ScoreBatch) -> None:
        """Raise ``ValueError`` naming what is missing when the batch does not fit this scorer."""
        if self.modality == "text":
            if batch.texts is None:
                raise ValueError(f"Scorer {self.id!r} scores texts; pass ScoreBatch(texts=..., prompts=...).")
        else:
            if batch.media is None:
                raise ValueError(f"Scorer {self.id!r} scores {self.modality}s; pass ScoreBatch(media=...).")
            want = 5 if self.modality == "video" else 4
            if batch.media.ndim != want and not (self.modality == "image" and batch.media.ndim == 5):
                shape = "[B, T, 3, H, W]" if want == 5 else "[B, 3, H, W]"
                got = tuple(batch.media.shape)
                raise ValueError(f"Scorer {self.id!r} wants {self.modality} media {shape}; got {got}.")
        if "reference" in self.needs and batch.references is None:
            raise ValueError(f"Scorer {self.id!r} compares against references; pass ScoreBatch(references=...) "
                             "(CLI: --references DIR).")
        if "question" in self.needs and not batch.metadata:
            raise ValueError(f"Scorer {self.id!r} needs questions in ScoreBatch.metadata[i]['questions'].")

    def _to_device(self, batch: ScoreBatch) -> ScoreBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(self.device)

        return ScoreBatch(prompts=batch.prompts, media=move(batch.media), texts=batch.texts,
                          references=move(batch.references), metadata=batch.metadata)

    # A scorer is shipped to worker processes; its weights reload there lazily instead of being pickled.
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if not isinstance(v, torch.nn.Module)}
        state["_loaded"] = False
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, modality={self.modality}, kind={self.kind})"


def _frames_as_images(batch: ScoreBatch) -> ScoreBatch:
    """``[B, T, 3, H, W]`` → ``[B·T, 3, H, W]`` with prompts, references and metadata repeated per frame."""
    b, t = batch.media.shape[:2]
    refs = batch.references
    if refs is not None:
        refs = refs.repeat_interleave(t, dim=0)
    return ScoreBatch(prompts=[p for p in batch.prompts for _ in range(t)], media=batch.media.flatten(0, 1),
                      texts=None, references=refs,
                      metadata=[m for m in batch.metadata for _ in range(t)] if batch.metadata else None)


def nan_to_range(values: Tensor, lo: float, hi: float) -> Tensor:
    """Clamp finite values into [lo, hi] and keep NaN ("does not apply") as NaN."""
    return torch.where(torch.isnan(values), values, values.clamp(lo, hi))
