"""Distributional (exemplar-set) rewards: how a sample, or a batch, relates to a set of exemplars in embedding space.

DRAGON (docs/methods.md#dragon, arXiv 2504.15217) scores on-policy samples with *instance-to-distribution* rewards
(similarity to an exemplar set) and *distribution-to-distribution* rewards (a set-level value such as the Fréchet
distance or the Vendi score, credited to each sample by leaving it out). This module builds both on top of any
embedder (``visalign.scorers.embedders``) and the set metrics of ``visalign.scorers.set_metrics``
(docs/methods.md#scorers).

- :class:`ExemplarSet`: exemplars (a folder of images or videos, a list of texts, or a media tensor) embedded
  once, with float64 mean, covariance and the covariance's eigendecomposition cached on disk as safetensors,
  keyed by the encoder id and a hash of the content.
- :class:`DistributionalScorer`: one mechanism, the mode chosen by the card (``params.mode``):

  ============  ==========  ====================================================  =============================
  mode          kind        per-sample raw value                                  ``extras["set_value"]``
  ============  ==========  ====================================================  =============================
  centroid      pointwise   cos(e(x), mean exemplar embedding), in [−1, 1]        —
  knn           pointwise   mean cosine to the k nearest exemplars, in [−1, 1]    —
  fd-change     set-level   Δ_i = FD(S \\ {i}) − FD(S); larger is better         FD(batch, exemplars)
  vendi         set-level   Δ_i = VS(S) − VS(S \\ {i}); larger = more diverse    VS(batch)
  mmd-witness   set-level   MMD witness f(x_i), in [−1, 1]                        MMD²_u(batch, exemplars)
  ============  ==========  ====================================================  =============================

  ``set_value`` is a float32 0-d tensor on the scorer's device (one value for the whole batch, not broadcast to
  ``[B]``); the vendi mode adds ``reference_value``, the exemplars' own Vendi score, for a ratio. The witness is
  set-level, not pointwise: its second term averages the kernel over the *other samples of the batch*, so a
  sample's value depends on its batch by design.

The exemplars come from the card (``params.exemplars``) or a ``params={"exemplars": ...}`` override;
``ScoreBatch`` has no exemplar field because the set is fixed for a scorer's lifetime (and its statistics cached).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.scorers.base import RawScore, ScoreBatch, Scorer
from visalign.scorers.card import ScorerCard
from visalign.scorers.embedders import embed_media, resolve_embedder
from visalign.scorers.set_metrics import (
    covariance,
    frechet_distance_to_reference,
    leave_one_out_frechet,
    leave_one_out_vendi,
    mmd2_unbiased,
    mmd_witness,
    psd_sqrt,
    vendi_score,
)

__all__ = ["CACHE_STATS", "DistributionalScorer", "ExemplarSet", "default_cache_dir"]

logger = logging.getLogger(__name__)

# Process-wide counts of exemplar-statistics cache lookups: "hit" (read from disk), "miss" (embedded anew).
CACHE_STATS: Counter[str] = Counter()
_CACHE_FORMAT = "1"  # bump when the cached tensors change meaning, so stale files are rebuilt


def default_cache_dir() -> Path:
    """``$VISALIGN_CACHE/exemplars`` if ``VISALIGN_CACHE`` is set, else ``~/.cache/visalign/exemplars``."""
    root = os.environ.get("VISALIGN_CACHE")
    return Path(root).expanduser() / "exemplars" if root else Path.home() / ".cache" / "visalign" / "exemplars"


def _can_embed(embedder: Any, side: str) -> bool:
    has = getattr(embedder, "has", None)  # ScorerEmbedder defines both methods and knows which one works
    return bool(has(side)) if callable(has) else hasattr(embedder, f"embed_{side}")


@dataclass
class ExemplarSet:
    """Embedded exemplars and their statistics.

    Attributes:
        embeddings: float32 ``[N, D]``, one row per exemplar (a video's row is the mean of its frames).
        mean: float64 ``[D]``; cov: float64 ``[D, D]`` (unbiased); cov_eigvals: float64 ``[D]`` and
            cov_eigvecs: float64 ``[D, D]``, the ``eigh`` of ``cov``, kept so Σ^{1/2} is never recomputed.
        encoder_id: the embedder's id; content_hash: sha256 of the exemplar content.
        from_cache: True when the statistics were read from the disk cache instead of embedded.
        source: a short description of where the exemplars came from, for messages.
    """

    embeddings: Tensor
    mean: Tensor
    cov: Tensor
    cov_eigvals: Tensor
    cov_eigvecs: Tensor
    encoder_id: str
    content_hash: str
    from_cache: bool = False
    source: str = ""

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @cached_property
    def cov_sqrt(self) -> Tensor:
        """Σ^{1/2}, float64 ``[D, D]``, from the cached eigendecomposition."""
        return psd_sqrt(self.cov_eigvals, self.cov_eigvecs)

    @cached_property
    def vendi(self) -> Tensor:
        """Vendi score of the exemplars themselves (float64 0-d): the diversity a batch can be compared with."""
        return vendi_score(self.embeddings)

    @classmethod
    def from_embeddings(cls, embeddings: Tensor, encoder_id: str, content_hash: str = "",
                        source: str = "") -> ExemplarSet:
        """Statistics of ``embeddings [N, D]`` (N ≥ 2): mean, covariance and its eigendecomposition, float64."""
        if embeddings.ndim != 2 or embeddings.shape[0] < 2:
            raise ValueError(f"An exemplar set needs at least 2 exemplars; {source or 'the source'} gave "
                             f"embeddings of shape {tuple(embeddings.shape)}. Add exemplars.")
        emb = embeddings.detach().float().cpu()
        if not torch.isfinite(emb).all():
            raise ValueError(f"Embeddings of the exemplars in {source or 'the source'} are not finite.")
        cov = covariance(emb)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        return cls(emb, emb.double().mean(0), cov, eigvals, eigvecs, encoder_id, content_hash, source=source)

    def to(self, device: str | torch.device) -> ExemplarSet:
        """Move the float32 embeddings to ``device``; float64 statistics stay on the CPU, where set metrics run."""
        return ExemplarSet(self.embeddings.to(device), self.mean, self.cov, self.cov_eigvals, self.cov_eigvecs,
                           self.encoder_id, self.content_hash, self.from_cache, self.source)

    # ------------------------------------------------------------------ disk cache

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the statistics to ``path`` as safetensors (atomic: a half-written file is never read)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": self.embeddings.cpu().contiguous(), "mean": self.mean, "cov": self.cov,
                   "cov_eigvals": self.cov_eigvals, "cov_eigvecs": self.cov_eigvecs.contiguous()}
        meta = {"format": _CACHE_FORMAT, "encoder_id": self.encoder_id, "content_hash": self.content_hash,
                "source": self.source}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExemplarSet:
        """Read statistics written by :meth:`save`; ``from_cache`` is True on the result."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != _CACHE_FORMAT:
            raise ValueError(f"{path}: exemplar cache format {meta.get('format')!r}, expected {_CACHE_FORMAT!r}.")
        return cls(tensors["embeddings"], tensors["mean"], tensors["cov"], tensors["cov_eigvals"],
                   tensors["cov_eigvecs"], meta["encoder_id"], meta["content_hash"], True, meta.get("source", ""))

    @classmethod
    def build(cls, source: Any, embedder: Any, *, cache_dir: str | os.PathLike[str] | None = None,
              use_cache: bool = True, max_frames: int | None = None) -> ExemplarSet:
        """Embed exemplars through ``embedder`` (or read their statistics from the cache).

        Args:
            source: a folder of images, or of videos (video files or sub-folders of frames), read with
                ``visalign.media``; a ``list[str]`` of texts (needs ``embed_texts``: cross-modal, e.g. text
                exemplars through CLIP for image samples); or media, float in [0, 1], ``[N, 3, H, W]`` or
                ``[N, T, 3, H, W]``.
            embedder: anything :func:`~visalign.scorers.embedders.resolve_embedder` returns.
            cache_dir: where statistics are cached; default :func:`default_cache_dir`.
            use_cache: read and write the cache (off: always embed, write nothing).
            max_frames: read at most this many frames per exemplar video.

        Returns:
            The set; ``from_cache`` tells whether the disk cache was used. ``CACHE_STATS`` counts hits and misses.
        """
        kind, content_hash, describe = _fingerprint(source, max_frames)
        key = hashlib.sha256(f"{_CACHE_FORMAT}|{embedder.id}|{kind}|{content_hash}".encode()).hexdigest()
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", embedder.id)[:60]
        path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = path / f"{slug}-{key[:24]}.safetensors"
        if use_cache and path.is_file():
            try:
                cached = cls.load(path)
            except Exception as err:  # a corrupt or foreign file: rebuild it rather than fail the run
                logger.warning("Ignoring unreadable exemplar cache %s (%s); rebuilding it.", path, err)
            else:
                if cached.encoder_id == embedder.id and cached.content_hash == content_hash:
                    CACHE_STATS["hit"] += 1
                    return cached
        CACHE_STATS["miss"] += 1
        with torch.no_grad():
            embeddings = _embed_source(source, kind, embedder, max_frames)
        built = cls.from_embeddings(embeddings, embedder.id, content_hash, source=describe)
        if use_cache:
            built.save(path)
        return built


def _fingerprint(source: Any, max_frames: int | None) -> tuple[str, str, str]:
    """(kind, sha256 of the content, description) of an exemplar source; kind ∈ images, videos, texts, tensor."""
    digest = hashlib.sha256()
    if isinstance(source, Tensor):
        digest.update(f"{tuple(source.shape)}|".encode())
        digest.update(source.detach().float().cpu().contiguous().numpy().tobytes())
        return "tensor", digest.hexdigest(), f"a media tensor of shape {tuple(source.shape)}"
    if isinstance(source, (list, tuple)):
        if not source or not all(isinstance(t, str) for t in source):
            raise TypeError("Text exemplars must be a non-empty list of strings.")
        for text in source:
            digest.update(text.encode("utf-8") + b"\x00")
        return "texts", digest.hexdigest(), f"{len(source)} texts"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"Exemplars must be a folder, a list of texts or a media tensor; got {type(source).__name__}.")
    from visalign.media import MediaError, list_images, list_media

    folder = Path(source)
    if not folder.is_dir():
        raise MediaError(f"Exemplar folder {folder} does not exist. Pass a folder of images or videos, or a list of "
                         "texts (params.exemplars).")
    kind = "images" if list_images(folder) else "videos"
    items = list_media(folder, "image" if kind == "images" else "video")
    digest.update(f"{kind}|{max_frames}|".encode())
    for item in items:
        files = list_images(item) if item.is_dir() else [item]
        for f in files:
            digest.update(f"{f.relative_to(folder).as_posix()}|".encode())
            digest.update(hashlib.sha256(f.read_bytes()).digest())
    return kind, digest.hexdigest(), f"{len(items)} {kind} in {folder}"


def _embed_source(source: Any, kind: str, embedder: Any, max_frames: int | None) -> Tensor:
    """Embed every exemplar → float32 ``[N, D]``."""
    name = getattr(embedder, "id", type(embedder).__name__)
    if kind == "texts":
        if not _can_embed(embedder, "texts"):
            raise TypeError(f"Embedder {name!r} has no text side (embed_texts), so it cannot embed text exemplars. "
                            "Use a text-image encoder such as 'clip-vit-b32', or give a folder of images.")
        return torch.cat([embedder.embed_texts(list(source[i:i + 64])) for i in range(0, len(source), 64)]).float()
    if not _can_embed(embedder, "images"):
        raise TypeError(f"Embedder {name!r} has no image side (embed_images), so it cannot embed media exemplars.")
    if kind == "tensor":
        return embed_media(embedder, source)
    from visalign.media import list_media, load_image, load_video

    folder = Path(source)
    if kind == "videos":
        return torch.cat([embed_media(embedder, load_video(p, max_frames)[None]) for p in list_media(folder, "video")])
    # Exemplar images may differ in size; embed runs of equal-sized images together and let the embedder resize.
    rows, run = [], []
    for path in list_media(folder, "image"):
        image = load_image(path)
        if run and (run[-1].shape != image.shape or len(run) == 32):
            rows.append(embed_media(embedder, torch.stack(run)))
            run = []
        run.append(image)
    rows.append(embed_media(embedder, torch.stack(run)))
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------------- the scorer

MODE_KINDS = {"centroid": "pointwise", "knn": "pointwise", "fd-change": "set-level", "vendi": "set-level",
              "mmd-witness": "set-level"}
# eigh-based modes: gradients are unstable for near-degenerate spectra (docs/methods.md#vendi)
_NOT_DIFFERENTIABLE = {"fd-change", "vendi"}


class DistributionalScorer(Scorer):
    """Rewards a sample (or credits it within its batch) by how it relates to an exemplar set in embedding space.

    Card ``params``:

    - ``mode``: ``centroid`` | ``knn`` | ``fd-change`` | ``vendi`` | ``mmd-witness`` (see the module docstring);
      the card's ``kind`` must match (pointwise for centroid and knn, set-level otherwise).
    - ``exemplars``: a folder of images or videos (relative paths resolve against the folder above the card's
      folder, i.e. the repository root for built-in cards, then the working directory), a list of texts, or a
      media tensor.
    - ``embedder``: ``color-histogram`` (built in, no weights), or a scorer id with ``embed_images``/
      ``embed_texts`` (``clip-vit-b32``); ``embedder_params`` / ``embedder_weights`` are passed on to it.
    - ``k`` (knn, default 5), ``bandwidth`` (mmd-witness: RBF σ in embedding units, or ``median`` for the median
      pairwise exemplar distance), ``cache_dir`` (default :func:`default_cache_dir`), ``max_frames``.

    Args:
        card: the variant's card.
        device: where embeddings are computed.
        dtype: compute dtype of a scorer-backed embedder.

    >>> from visalign.scorers import ScoreBatch, get_scorer
    >>> scorer = get_scorer("exemplar-centroid-color", params={"exemplars": torch.rand(4, 3, 16, 16),
    ...                                                       "cache_dir": None, "use_cache": False})
    >>> scorer(ScoreBatch(prompts=["a", "b"], media=torch.rand(2, 3, 16, 16))).reward.shape
    torch.Size([2])
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        p = card.params
        where = f"card {card.source or card.id}"
        self.mode = str(p.get("mode", "centroid"))
        if self.mode not in MODE_KINDS:
            raise ValueError(f"params.mode {self.mode!r} in {where} must be one of {sorted(MODE_KINDS)}.")
        if card.kind != MODE_KINDS[self.mode]:
            raise ValueError(f"Mode {self.mode!r} is {MODE_KINDS[self.mode]} but {where} declares kind "
                             f"{card.kind!r}; set kind: {MODE_KINDS[self.mode]}.")
        if card.differentiable and self.mode in _NOT_DIFFERENTIABLE:
            raise ValueError(f"Mode {self.mode!r} goes through an eigendecomposition and is not differentiable; "
                             f"set differentiable: false in {where}.")
        if p.get("exemplars") is None:
            raise ValueError(f"Scorer {card.id!r} needs exemplars: set params.exemplars in {where} (a folder of "
                             "images/videos or a list of texts), or pass params={'exemplars': ...} to get_scorer.")
        self.k = int(p.get("k", 5))
        if self.k < 1:
            raise ValueError(f"params.k in {where} must be >= 1; got {self.k}.")
        bandwidth = p.get("bandwidth", "median")
        if bandwidth != "median" and not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
            raise ValueError(f"params.bandwidth in {where} must be a positive number or 'median'; got {bandwidth!r}.")
        self._embedder: Any = None
        self._exemplars: ExemplarSet | None = None
        self._bandwidth: float | None = None

    @classmethod
    def default_card(cls, name: str) -> ScorerCard:
        """A centroid-similarity card over the colour embedder; the caller supplies ``params.exemplars``."""
        return ScorerCard(id=name, mechanism=f"{cls.__module__}:{cls.__name__}", kind="pointwise",
                          needs=("exemplars",), differentiable=True, raw_range=(-1.0, 1.0),
                          normalize={"kind": "affine", "lo": -1.0, "hi": 1.0},
                          params={"mode": "centroid", "embedder": "color-histogram"})

    # ------------------------------------------------------------------ loading

    @property
    def exemplars(self) -> ExemplarSet:
        """The exemplar set (embedded, or read from the cache, on first use)."""
        self.ensure_loaded()
        assert self._exemplars is not None
        return self._exemplars

    def load(self) -> None:
        p = self.card.params
        self._embedder = resolve_embedder(p.get("embedder", "color-histogram"), device=self.device, dtype=self.dtype,
                                          weights=p.get("embedder_weights"), params=p.get("embedder_params"))
        exemplars = ExemplarSet.build(self._exemplar_source(p["exemplars"]), self._embedder,
                                      cache_dir=p.get("cache_dir"), use_cache=bool(p.get("use_cache", True)),
                                      max_frames=p.get("max_frames"))
        self._exemplars = exemplars.to(self.device)
        bandwidth = p.get("bandwidth", "median")
        if bandwidth == "median":
            emb = exemplars.embeddings.double()
            dist = torch.cdist(emb, emb)
            off_diagonal = dist[~torch.eye(len(emb), dtype=torch.bool)]
            bandwidth = float(off_diagonal.median().clamp(min=1e-6))  # identical exemplars: keep σ > 0
        self._bandwidth = float(bandwidth)

    def _exemplar_source(self, spec: Any) -> Any:
        """A folder spec → an existing path (see the class docstring for the search order); other specs as is."""
        if not isinstance(spec, (str, os.PathLike)):
            return spec
        try:
            return self.card.resolve_path(spec)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"Exemplar folder: {err} Or pass a list of texts as params.exemplars.") from None

    # Exemplar statistics are reloaded (from the disk cache) after unpickling instead of travelling in the pickle.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_embedder=None, _exemplars=None, _bandwidth=None)
        return state

    # ------------------------------------------------------------------ scoring

    def embed(self, media: Tensor) -> Tensor:
        """Embed a batch with this scorer's embedder: ``[B, 3, H, W]`` or ``[B, T, 3, H, W]`` → float32 ``[B, D]``."""
        self.ensure_loaded()
        return embed_media(self._embedder, media.to(self.device))

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        emb = self.embed(batch.media)
        return getattr(self, "_score_" + self.mode.replace("-", "_"))(emb)

    def _score_centroid(self, emb: Tensor) -> RawScore:
        centroid = self.exemplars.mean.to(device=emb.device, dtype=emb.dtype)
        return RawScore(F.cosine_similarity(emb, centroid[None], dim=-1))

    def _score_knn(self, emb: Tensor) -> RawScore:
        ref = F.normalize(self.exemplars.embeddings.to(emb.device), dim=-1)
        sims = F.normalize(emb, dim=-1) @ ref.T  # [B, N]
        return RawScore(sims.topk(min(self.k, ref.shape[0]), dim=-1).values.mean(-1))

    def _score_fd_change(self, emb: Tensor) -> RawScore:
        ref = self.exemplars
        delta, fd = leave_one_out_frechet(emb.detach().cpu(), ref.mean, ref.cov, ref.cov_sqrt)
        return RawScore(delta.float().to(emb.device), {"set_value": fd.float().to(emb.device)})

    def _score_vendi(self, emb: Tensor) -> RawScore:
        delta, vendi = leave_one_out_vendi(emb.detach().cpu())
        return RawScore(delta.float().to(emb.device),
                        {"set_value": vendi.float().to(emb.device),
                         "reference_value": self.exemplars.vendi.float().to(emb.device)})

    def _score_mmd_witness(self, emb: Tensor) -> RawScore:
        ref = self.exemplars.embeddings.to(emb.device)
        witness = mmd_witness(emb, ref, self._bandwidth)
        mmd2 = mmd2_unbiased(emb.detach(), ref, self._bandwidth)
        return RawScore(witness, {"set_value": mmd2.float()})

    def frechet_distance(self, media: Tensor) -> Tensor:
        """FD between a batch ``[B, 3, H, W]`` (B ≥ 2) and the exemplars, float64 0-d (the set-level value)."""
        ref = self.exemplars
        return frechet_distance_to_reference(self.embed(media).detach().cpu(), ref.mean, ref.cov, ref.cov_sqrt)
