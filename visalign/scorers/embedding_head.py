"""Embedding-MLP heads: an MLP on L2-normalised CLIP image embeddings (the LAION aesthetic predictor family).

The LAION improved aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor, as used by
kvablack/ddpo-pytorch ddpo_pytorch/aesthetic_scorer.py; docs/methods.md#scorers) feeds ViT-L/14 image features,
L2-normalised, through ``768→1024→128→64→16→1`` linear layers with dropouts 0.2, 0.2, 0.1 after the first three
and no activations. The card describes the layout (``head_layers``, ``head_dropout``, ``head_activation``);
:class:`EmbeddingMLP` builds it with the same ``layers.{i}`` keys, so the published weights load unchanged
once converted to safetensors (``visalign convert-weights``).

The image embedding comes from :class:`~visalign.scorers.clip.ClipScorer` (same backends, same tensor
preprocessing, so gradients reach the pixels).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from visalign.scorers.base import RawScore, ScoreBatch
from visalign.scorers.clip import ClipScorer, convert_hint, expand_path, weights_unavailable

ACTIVATIONS: dict[str, type[nn.Module] | None] = {"none": None, "relu": nn.ReLU, "gelu": nn.GELU}


class EmbeddingMLP(nn.Module):
    """Linear layers with optional activation and dropout between them, keyed ``layers.{i}`` as LAION's head.

    Args:
        layers: widths, input first (``[768, 1024, 128, 64, 16, 1]`` for LAION v2).
        dropout: one rate per linear layer (``len(layers) - 1``); a dropout module follows a linear layer only
            when its rate is > 0, which reproduces LAION's module indices 0, 2, 4, 6, 7.
        activation: ``none`` (LAION), ``relu`` or ``gelu``, inserted after every linear layer but the last.
    """

    def __init__(self, layers: list[int], dropout: list[float] | None = None, activation: str = "none"):
        super().__init__()
        n_linear = len(layers) - 1
        dropout = list(dropout) if dropout is not None else [0.0] * n_linear
        if n_linear < 1 or len(dropout) != n_linear:
            raise ValueError(f"An MLP head needs >= 2 layer widths and one dropout rate per linear layer; "
                             f"got layers={layers}, dropout={dropout}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"head activation {activation!r} must be one of {sorted(ACTIVATIONS)}.")
        modules: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(layers[:-1], layers[1:], strict=True)):
            modules.append(nn.Linear(int(d_in), int(d_out)))
            act = ACTIVATIONS[activation]
            if act is not None and i < n_linear - 1:
                modules.append(act())
            if dropout[i] > 0:
                modules.append(nn.Dropout(float(dropout[i])))
        self.layers = nn.Sequential(*modules)

    def forward(self, embedding: Tensor) -> Tensor:
        """``[N, layers[0]]`` float → ``[N]`` float, the head's native score."""
        return self.layers(embedding).squeeze(-1)


class EmbeddingHeadScorer(ClipScorer):
    """Score = MLP head on the L2-normalised CLIP image embedding; prompts are not used.

    Card weights: the CLIP backend (as for :class:`ClipScorer`) plus ``head_file`` (safetensors) and
    ``convert_from`` (what to convert when it is missing). Card params: ``head_layers``, ``head_dropout``,
    ``head_activation``. Raw scores are in the head's native range (about 1–10 for LAION v2).

    >>> from visalign.scorers import ScoreBatch, get_scorer, scorer_card
    >>> from tests.tiny.clip import build_embedding_head_scorer
    >>> import tempfile, torch
    >>> scorer = get_scorer("laion-aesthetic-v2", **build_embedding_head_scorer(
    ...     scorer_card("laion-aesthetic-v2"), tempfile.mkdtemp()))
    >>> scorer(ScoreBatch(prompts=[""], media=torch.rand(1, 3, 32, 32))).raw.shape
    torch.Size([1])
    """

    def check_params(self) -> None:
        backend = self.card.weights.get("backend")
        if backend not in ("open_clip", "hf"):
            raise ValueError(f"Card {self.id!r}: weights.backend {backend!r} must be 'open_clip' or 'hf'.")
        EmbeddingMLP(self.head_layers, self.card.params.get("head_dropout"),
                     str(self.card.params.get("head_activation", "none")))  # validates the layout; cheap

    @property
    def head_layers(self) -> list[int]:
        layers = self.card.params.get("head_layers")
        if not layers:
            raise ValueError(f"Card {self.id!r} must set params.head_layers (e.g. [768, 1024, 128, 64, 16, 1]).")
        return [int(x) for x in layers]

    def load(self) -> None:
        super().load()
        weights = self.card.weights
        if not weights.get("head_file"):
            raise ValueError(f"Card {self.id!r} must set weights.head_file (a safetensors file).")
        path = expand_path(weights["head_file"])
        if not path.is_file():
            raise weights_unavailable(self.id, f"head file {path}", "does not exist", convert_hint(weights, str(path)))
        from safetensors.torch import load_file

        head = EmbeddingMLP(self.head_layers, self.card.params.get("head_dropout"),
                            str(self.card.params.get("head_activation", "none")))
        try:
            head.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as err:  # wrong keys or shapes: the card's layout does not describe this file
            raise ValueError(f"Head file {path} does not match card {self.id!r} layout "
                             f"head_layers={self.head_layers}: {err}") from None
        self._head = head.to(self.device).eval().requires_grad_(False)  # float32: the head is small

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        frames = batch.media if batch.media.ndim == 5 else batch.media.unsqueeze(1)  # [B, T, 3, H, W]
        b, t = frames.shape[:2]
        embedding = self.embed_images(frames.flatten(0, 1))
        if embedding.shape[-1] != self.head_layers[0]:
            raise ValueError(f"Scorer {self.id!r}: the CLIP embedding has {embedding.shape[-1]} dims but the head "
                             f"expects {self.head_layers[0]}; the card's backend and head_layers disagree.")
        return RawScore(self._head(embedding).view(b, t).mean(1))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_head", None)
        return state


__all__ = ["EmbeddingHeadScorer", "EmbeddingMLP"]
