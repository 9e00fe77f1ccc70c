"""CLIP-similarity scorers: CLIPScore, PickScore/HPS-style logits, CLIP-I and λ-Harmonic, one class for all.

Variants are cards (``scorers/clip-*.yaml``, ``pickscore.yaml``, ``hpsv2.yaml``, ...). A card picks a backend
with ``weights.backend`` and a scoring rule with ``params.mode``:

- ``open_clip``: an open_clip architecture name + pretrained tag (its safetensors file is fetched from the hub),
  a converted local ``file``, or a ``local_dir`` holding ``open_clip_config.json`` and
  ``open_clip_model.safetensors`` (or ``model.safetensors``).
- ``hf``: a transformers ``CLIPModel`` from a hub id or a local folder (``use_safetensors=True``); mean, std and
  sizes are read from the folder's ``CLIPImageProcessor`` config (``processor_id`` when the weights repo has none).

Modes (docs/methods.md#scorers and #rpo-harmonic):

- ``clipscore``: ``w·max(cos(img, text), 0)``, w from the card (2.5 in Hessel et al., arXiv 2104.08718);
- ``cosine``: the raw cosine (HPSv2's score);
- ``logit``: ``exp(logit_scale)·cos`` (PickScore, arXiv 2305.01569);
- ``clip-i``: image–image cosine to the sample's references, mean over the K references;
- ``lambda-harmonic``: ``1 / (λ/(s_I + 1e-8) + (1 − λ)/(s_T + 1e-8))`` with both cosines mapped by ``(s + 1)/2``
  (RPO, andrew-miao/RPO evaluation_metrics.py).
- ``contrast``: CLIP as a zero-shot classifier over the prompt's near misses: for each group ``[t₀ … t_K]`` of the
  card's ``contrasts`` set (an import path ``module:function``, :mod:`visalign.scorers.contrasts`; one group per
  attribute), ``softmax(s·cos(img, t_k))₀``, averaged over the groups; ``s = exp(logit_scale)`` unless the card
  gives ``temperature`` (then ``s = 1/temperature``); in [0, 1].

Preprocessing is tensor operations only (resize the shortest side with antialiasing, centre crop, normalise), so
``grad=True`` returns gradients to the pixels. Videos ``[B, T, 3, H, W]`` score as the mean of per-frame scores.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.scorers.base import RawScore, ScoreBatch, Scorer, WeightsUnavailableError
from visalign.scorers.card import ScorerCard
from visalign.scorers.contrasts import contrast_set

MODES = ("clipscore", "cosine", "logit", "clip-i", "lambda-harmonic", "contrast")
_MODES_WITH_REFERENCES = ("clip-i", "lambda-harmonic")
# RPO's guard against division by zero in the harmonic mean (andrew-miao/RPO evaluation_metrics.py).
_HARMONIC_EPS = 1e-8
# PIL resampling codes as stored in HF processor configs → torch interpolation modes.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# Safetensors names open_clip publishes on the hub; the pickled ``open_clip_pytorch_model.bin`` is never loaded.
_OPEN_CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
_OPEN_CLIP_LOCAL_FILES = ("open_clip_model.safetensors", "model.safetensors")


def weights_unavailable(scorer_id: str, tried: str, reason: str, hint: str = "") -> WeightsUnavailableError:
    """The one error for missing weights: the scorer id, what was tried, and how to point at a local copy."""
    return WeightsUnavailableError(
        f"Scorer {scorer_id!r} could not load its weights: {tried} {reason}. Point it at a local folder with "
        f"get_scorer({scorer_id!r}, weights='/path') or 'visalign score --weights {scorer_id}=/path'.{hint}")


def convert_hint(weights: dict[str, Any], target: str) -> str:
    """The sentence telling the user how to produce a converted safetensors file from a published pickle."""
    source = weights.get("convert_from", "the published .pt/.pth checkpoint")
    return f" Convert {source} once with: visalign convert-weights <downloaded file> {target}"


def expand_path(path: str | Path) -> Path:
    return Path(str(path)).expanduser()


# ---------------------------------------------------------------- tensor preprocessing


@dataclass(frozen=True)
class ImagePreprocess:
    """CLIP preprocessing as differentiable tensor ops: resize, centre crop, normalise.

    Attributes:
        crop_px: (height, width) the model sees.
        resize_px: target of the shortest side before the crop; None squashes straight to ``crop_px``.
        mean, std: per-channel normalisation constants, read from the model's processor config.
        interpolation: ``bicubic``, ``bilinear`` or ``nearest``.
        crop_offset: ``round`` (torchvision's CenterCrop, hence open_clip) or ``floor`` (HF image processors);
            the two differ by one pixel when the margin is odd.
    """

    crop_px: tuple[int, int]
    resize_px: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_offset: str = "round"

    def __call__(self, pixels: Tensor) -> Tensor:
        """Preprocess images.

        Args:
            pixels (`Tensor`): float in [0, 1], ``[N, 3, H, W]``.

        Returns:
            `Tensor`: float32 ``[N, 3, crop_h, crop_w]``, normalised by ``mean``/``std``.
        """
        x = pixels.float()
        if self.resize_px is None:
            x = self._resize(x, self.crop_px)
        else:
            h, w = x.shape[-2:]
            short, long = min(h, w), max(h, w)
            # int() truncation, as torchvision's Resize(int) and HF's get_resize_output_image_size compute it.
            new_long = int(self.resize_px * long / short)
            x = self._resize(x, (self.resize_px, new_long) if h <= w else (new_long, self.resize_px))
        x = _center_crop(x, self.crop_px, floor=self.crop_offset == "floor")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        if self.interpolation == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        # antialias=True matches PIL's filtering when downsampling; the clamp matches the uint8 image PIL
        # produces (bicubic overshoots past [0, 1] at edges).
        x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        return x.clamp(0.0, 1.0)


def _center_crop(x: Tensor, size: tuple[int, int], floor: bool) -> Tensor:
    h, w = x.shape[-2:]
    ch, cw = size
    if h < ch or w < cw:  # torchvision pads with zeros when the crop is larger than the image
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        h, w = x.shape[-2:]
    if floor:
        top, left = (h - ch) // 2, (w - cw) // 2
    else:
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[..., top:top + ch, left:left + cw]


# ---------------------------------------------------------------- backends

_TOKEN_CACHE_SIZE = 65536  # distinct prompts remembered per open_clip backend (77 ints each: ~40 MB at most)


class OpenClipBackend:
    """An open_clip model, its tokenizer and its preprocessing, loaded from safetensors only."""

    def __init__(self, scorer_id: str, weights: dict[str, Any], device: torch.device, dtype: torch.dtype):
        import open_clip

        name, checkpoint, force_cfg, quick_gelu = self._resolve(open_clip, scorer_id, weights)
        with _drop_log_records("No pretrained weights loaded", "no CLIP weights found"):
            model = open_clip.create_model(name, load_weights=False, force_quick_gelu=quick_gelu,
                                           force_preprocess_cfg=force_cfg)
        open_clip.load_checkpoint(model, str(checkpoint))
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.preprocess = _open_clip_preprocess(open_clip.get_model_preprocess_cfg(model), scorer_id)
        self.device = device

    @staticmethod
    def _resolve(open_clip: Any, scorer_id: str, weights: dict[str, Any]) -> tuple[str, Path, dict[str, Any], bool]:
        """→ (model name for open_clip, safetensors checkpoint, preprocess overrides, quick_gelu)."""
        if weights.get("local_dir"):
            folder = expand_path(weights["local_dir"])
            if not (folder / "open_clip_config.json").is_file():
                raise weights_unavailable(scorer_id, f"local folder {folder}",
                                          "has no open_clip_config.json (open_clip's local-dir layout)")
            found = [folder / f for f in _OPEN_CLIP_LOCAL_FILES if (folder / f).is_file()]
            if not found:
                raise weights_unavailable(scorer_id, f"local folder {folder}", f"has none of {_OPEN_CLIP_LOCAL_FILES}",
                                          convert_hint(weights, str(folder / _OPEN_CLIP_LOCAL_FILES[0])))
            return f"local-dir:{folder}", found[0], {}, bool(weights.get("quick_gelu", False))
        if "model" not in weights:
            raise ValueError(f"Card {scorer_id!r}: an open_clip backend needs weights.model (e.g. ViT-B-32) "
                             "or weights.local_dir.")
        name = str(weights["model"])
        if weights.get("file"):
            path = expand_path(weights["file"])
            if not path.is_file():
                raise weights_unavailable(scorer_id, f"converted checkpoint {path}", "does not exist",
                                          convert_hint(weights, str(path)))
            return name, path, {}, bool(weights.get("quick_gelu", False))
        tag = str(weights.get("pretrained", ""))
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        if not tag_cfg:
            raise ValueError(f"Card {scorer_id!r}: open_clip has no pretrained tag {tag!r} for {name!r}; known: "
                             f"{open_clip.list_pretrained_tags_by_model(name)}.")
        repo_id, _ = _split_hub_path(tag_cfg.get("hf_hub", ""))
        if not repo_id:
            raise weights_unavailable(scorer_id, f"open_clip tag {name}/{tag}", "is published only as a pickle URL",
                                      convert_hint(weights, "<folder>/open_clip_model.safetensors"))
        checkpoint = hub_safetensors(scorer_id, repo_id, _OPEN_CLIP_HUB_FILES)
        force_cfg = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        return name, checkpoint, force_cfg, bool(weights.get("quick_gelu", tag_cfg.get("quick_gelu", False)))

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokens(texts).to(self.device))

    def tokens(self, texts: list[str]) -> Tensor:
        """open_clip token ids ``[N, context]`` long, each distinct text tokenised once and remembered.

        open_clip's tokenizer is pure Python per text (ftfy, regex, BPE: ~0.3 ms a prompt, more than the tiny
        model's whole per-image cost in a batch), and a reward scores the same prompts over and over: every image of
        a prompt group, at every training step. The cache is bounded so an endless prompt stream cannot grow it.
        """
        cache = self.__dict__.setdefault("_token_cache", {})
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            if len(cache) + len(missing) > _TOKEN_CACHE_SIZE:
                cache.clear()
            cache.update(zip(missing, self.tokenizer(missing), strict=True))
        return torch.stack([cache[t] for t in texts])

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp().float().reshape(())


@contextmanager
def _drop_log_records(*fragments: str) -> Iterator[None]:
    """Hide root-logger records containing ``fragments`` while the block runs.

    The model is built empty and the safetensors checkpoint is loaded right after (so open_clip never picks a
    pickle from a folder); open_clip would otherwise warn that the model was "initialized randomly".
    """

    def keep(record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in fragments)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _split_hub_path(hub: str) -> tuple[str, str]:
    # open_clip writes "org/repo/" (default file) or "org/repo/filename"; only the repo id matters here.
    parts = hub.strip("/").split("/")
    return "/".join(parts[:2]) if len(parts) >= 2 else "", "/".join(parts[2:])


def _open_clip_preprocess(cfg: dict[str, Any], scorer_id: str) -> ImagePreprocess:
    size = cfg["size"]
    crop = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = cfg.get("resize_mode", "shortest")
    if mode == "squash":
        resize = None
    elif mode == "shortest" and crop[0] == crop[1]:
        resize = crop[0]
    else:
        raise ValueError(f"Scorer {scorer_id!r}: open_clip resize_mode {mode!r} with size {size} is not supported "
                         "by the tensor preprocessing; use 'shortest' (square) or 'squash'.")
    return ImagePreprocess(crop_px=crop, resize_px=resize, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                           interpolation=str(cfg.get("interpolation", "bicubic")))


def hub_safetensors(scorer_id: str, repo_id: str, filenames: tuple[str, ...]) -> Path:
    """Download (or find in the cache) the first of ``filenames`` in ``repo_id``; never a pickle."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename))
        except LocalEntryNotFoundError as err:  # offline or unreachable, and not cached; subclass of the next one
            offline = err
        except EntryNotFoundError:
            continue
        except RepositoryNotFoundError as err:
            raise weights_unavailable(scorer_id, f"hub id {repo_id!r}", "does not exist or is gated") from err
    if offline is not None:
        raise weights_unavailable(scorer_id, f"hub id {repo_id!r}",
                                  f"is not in the local cache and the hub is offline or unreachable ({offline})"
                                  ) from offline
    raise weights_unavailable(scorer_id, f"hub id {repo_id!r}", f"has none of the safetensors files {filenames}")


class HfClipBackend:
    """A transformers ``CLIPModel`` with the tokenizer and image-processor config of its repository."""

    def __init__(self, scorer_id: str, weights: dict[str, Any], device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        local_dir = weights.get("local_dir")
        source = str(expand_path(local_dir)) if local_dir else weights.get("hub_id")
        if not source:
            raise ValueError(f"Card {scorer_id!r}: an hf backend needs weights.hub_id or weights.local_dir.")
        processor_source = source if local_dir else weights.get("processor_id", source)
        try:
            model = CLIPModel.from_pretrained(source, use_safetensors=True)
            processor = CLIPImageProcessor.from_pretrained(processor_source)
            self.tokenizer = AutoTokenizer.from_pretrained(processor_source)
        except OSError as err:  # from_pretrained turns hub misses (LocalEntryNotFoundError) into OSError
            where = f"local folder {source}" if local_dir else f"hub id {source!r} (processor {processor_source!r})"
            raise weights_unavailable(scorer_id, where, f"is not available offline or is incomplete ({err})") from err
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.max_tokens = int(model.config.text_config.max_position_embeddings)
        self.preprocess = hf_preprocess(processor, scorer_id)
        self.device = device

    def encode_image(self, pixels: Tensor) -> Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, texts: list[str]) -> Tensor:
        # Truncate at the text tower's context (77 for CLIP), as PickScore's reference code does.
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return _pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                    attention_mask=tok["attention_mask"].to(self.device)))

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp().float().reshape(())


def _pooled(out: Any) -> Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor.
    return out if isinstance(out, Tensor) else out.pooler_output


def hf_preprocess(processor: Any, scorer_id: str) -> ImagePreprocess:
    """Read resize/crop/mean/std/resample from a ``CLIPImageProcessor`` into :class:`ImagePreprocess`."""
    size, crop = processor.size, processor.crop_size
    resample = _PIL_RESAMPLE.get(int(processor.resample))
    if resample is None:
        raise ValueError(f"Scorer {scorer_id!r}: processor resample {processor.resample!r} is not one of "
                         f"{sorted(_PIL_RESAMPLE)} (nearest, bilinear, bicubic).")
    shortest = size.get("shortest_edge") if processor.do_resize else None
    if processor.do_center_crop:
        crop_px = (int(crop.get("height")), int(crop.get("width")))
    elif size.get("height") and size.get("width"):
        crop_px = (int(size.get("height")), int(size.get("width")))
    else:
        raise ValueError(f"Scorer {scorer_id!r}: a processor that resizes the shortest edge must centre-crop.")
    if shortest is None and processor.do_resize:  # {"height", "width"} sizes squash, then crop
        squash = (int(size.get("height")), int(size.get("width")))
        if squash != crop_px:
            raise ValueError(f"Scorer {scorer_id!r}: squash size {squash} differs from crop {crop_px}; unsupported.")
    return ImagePreprocess(crop_px=crop_px, resize_px=int(shortest) if shortest else None,
                           mean=tuple(float(m) for m in processor.image_mean),
                           std=tuple(float(s) for s in processor.image_std), interpolation=resample,
                           crop_offset="floor")


BACKENDS: dict[str, type] = {"open_clip": OpenClipBackend, "hf": HfClipBackend}


# ---------------------------------------------------------------- the scorer


class ClipScorer(Scorer):
    """CLIP-similarity scorer; the card's ``weights.backend`` and ``params.mode`` pick the variant.

    Card params: ``mode`` (one of ``MODES``), ``w`` (CLIPScore weight), ``lam`` (λ of λ-Harmonic, weight of the
    image term), ``prompt_template`` (``"{}"`` by default; CLIPScore uses ``"A photo depicts {}"``).

    >>> from visalign.scorers import ScoreBatch, get_scorer
    >>> from tests.tiny.clip import build_open_clip
    >>> import tempfile, torch
    >>> scorer = get_scorer("clip-vit-b32", weights=str(build_open_clip(tempfile.mkdtemp())))
    >>> out = scorer(ScoreBatch(prompts=["a red circle"], media=torch.rand(1, 3, 32, 32)))
    >>> out.raw.shape, bool(0 <= out.raw.item() <= 2.5)
    (torch.Size([1]), True)
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        self._backend: Any = None
        self.check_params()

    # -- configuration --
    def check_params(self) -> None:
        """Validate the card's params now (no weights needed), so a bad card fails when it is built."""
        backend = self.card.weights.get("backend")
        if backend not in BACKENDS:
            raise ValueError(f"Card {self.id!r}: weights.backend {backend!r} must be one of {sorted(BACKENDS)}.")
        mode = self.mode
        if mode not in MODES:
            raise ValueError(f"Card {self.id!r}: params.mode {mode!r} must be one of {MODES}.")
        if mode in _MODES_WITH_REFERENCES and "reference" not in self.needs:
            raise ValueError(f"Card {self.id!r}: mode {mode!r} compares against references; add 'reference' to needs.")
        if mode == "lambda-harmonic" and not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"Card {self.id!r}: params.lam must be in [0, 1]; got {self.lam}.")
        if mode == "contrast":
            contrast_set(str(self.card.params.get("contrasts")), card_id=self.id)  # raises, naming card and value
            if float(self.card.params.get("temperature", 1.0)) <= 0:
                raise ValueError(f"Card {self.id!r}: params.temperature must be > 0.")

    @property
    def mode(self) -> str:
        return str(self.card.params.get("mode", "clipscore"))

    @property
    def lam(self) -> float:
        return float(self.card.params.get("lam", 0.3))

    def load(self) -> None:
        weights = dict(self.card.weights)
        if weights.get("local_dir"):
            # A card's relative folder (the shipped shapes proxy) means the repository's, not the working directory's;
            # a folder found nowhere is reported by the backend with the usual weights error.
            with contextlib.suppress(FileNotFoundError):
                weights["local_dir"] = str(self.card.resolve_path(weights["local_dir"]))
        self._backend = BACKENDS[weights["backend"]](self.id, weights, self.device, self.dtype)

    # -- embeddings (public: exemplar-set rewards are built on them) --
    def embed_images(self, media: Tensor) -> Tensor:
        """L2-normalised image embeddings. Keeps the autograd graph when grad is enabled by the caller.

        Args:
            media (`Tensor`): float in [0, 1], ``[N, 3, H, W]``, any size (resized and cropped here).

        Returns:
            `Tensor`: float32 ``[N, D]``, unit L2 norm per row.
        """
        if media.ndim != 4 or media.shape[1] != 3:
            raise ValueError(f"embed_images wants [N, 3, H, W] RGB in [0, 1]; got {tuple(media.shape)}.")
        self.ensure_loaded()
        pixels = self._backend.preprocess(media.to(self.device)).to(self.dtype)
        return F.normalize(self._backend.encode_image(pixels).float(), dim=-1)

    def embed_texts(self, texts: list[str]) -> Tensor:
        """L2-normalised text embeddings of ``texts`` as given (no prompt template applied).

        Args:
            texts: N strings; long ones are truncated at the text tower's context length.

        Returns:
            `Tensor`: float32 ``[N, D]``, unit L2 norm per row.
        """
        if isinstance(texts, str):
            raise TypeError("embed_texts wants a list of strings, not a single string.")
        self.ensure_loaded()
        # Each distinct text is encoded once: a policy-gradient batch holds every prompt images_per_prompt times,
        # and a text's embedding does not depend on the other texts of its batch.
        position = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        unique = F.normalize(self._backend.encode_text(list(position)).float(), dim=-1)
        if len(position) == len(texts):
            return unique
        return unique[torch.tensor([position[t] for t in texts], device=unique.device)]

    # -- scoring --
    def score_raw(self, batch: ScoreBatch) -> RawScore:
        frames = batch.media if batch.media.ndim == 5 else batch.media.unsqueeze(1)  # [B, T, 3, H, W]
        b, t = frames.shape[:2]
        image = self.embed_images(frames.flatten(0, 1)).view(b, t, -1)
        per_frame, extras = self._score_frames(image, batch)  # [B, T] and {name: [B, T]}
        return RawScore(per_frame.mean(1), {k: v.mean(1) for k, v in extras.items()})

    def _score_frames(self, image: Tensor, batch: ScoreBatch) -> tuple[Tensor, dict[str, Tensor]]:
        mode = self.mode
        if mode == "clip-i":
            return self._reference_cosine(image, batch.references), {}
        if mode == "contrast":
            return self._contrast_probability(image, batch.prompts)
        template = str(self.card.params.get("prompt_template", "{}"))
        text = self.embed_texts([template.format(p) for p in batch.prompts])  # [B, D]
        cosine = torch.einsum("btd,bd->bt", image, text)
        if mode == "clipscore":
            return float(self.card.params.get("w", 2.5)) * cosine.clamp(min=0.0), {"cosine": cosine}
        if mode == "cosine":
            return cosine, {}
        if mode == "logit":
            return self._backend.logit_scale() * cosine, {"cosine": cosine}
        s_image = (self._reference_cosine(image, batch.references) + 1.0) / 2.0
        s_text = (cosine + 1.0) / 2.0
        return lambda_harmonic(s_image, s_text, self.lam), {"s_image": s_image, "s_text": s_text}

    def _contrast_probability(self, image: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean over a prompt's contrast groups of ``P(t₀ | frame)`` within the group: image ``[B, T, D]`` →
        ``[B, T]`` in [0, 1].

        Groups differ in size and number; all are stacked as rows ``[G, K]`` padded with −inf logits, and each
        sample averages its own rows. Extras: ``cosine`` (to ``t₀``) and ``margin``, ``cos(t₀)`` minus the largest
        cosine of any negative.
        """
        captions = contrast_set(str(self.card.params["contrasts"]), card_id=self.id)
        groups = {p: captions(p) for p in dict.fromkeys(prompts)}
        texts = list(dict.fromkeys(t for p_groups in groups.values() for g in p_groups for t in g))
        row = {t: i for i, t in enumerate(texts)}
        embeds = self.embed_texts(texts)  # [N, D]
        rows = [(i, [row[t] for t in g]) for i, p in enumerate(prompts) for g in groups[p]]
        width = max(len(r) for _, r in rows)
        index = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        owner = torch.tensor([i for i, _ in rows])
        for k, (_, r) in enumerate(rows):
            index[k, : len(r)] = torch.tensor(r)
            valid[k, : len(r)] = True
        index, valid, owner = index.to(image.device), valid.to(image.device), owner.to(image.device)
        cosine = torch.einsum("gtd,gkd->gtk", image[owner], embeds[index])  # [G, T, K]
        temperature = self.card.params.get("temperature")
        scale = 1.0 / float(temperature) if temperature is not None else self._backend.logit_scale().float()
        probability = (scale * cosine).masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)[..., 0]  # [G, T]
        b = len(prompts)
        per_sample = torch.zeros(b, image.shape[1], device=image.device).index_add(0, owner, probability)
        counts = torch.bincount(owner, minlength=b).to(per_sample)[:, None]
        hardest = cosine[..., 1:].masked_fill(~valid[:, None, 1:], float("-inf")).amax(-1)  # [G, T]
        negatives = torch.full((b, image.shape[1]), float("-inf"), device=image.device).scatter_reduce(
            0, owner[:, None].expand_as(hardest), hardest, "amax")
        first = torch.tensor([row[groups[p][0][0]] for p in prompts], device=image.device)  # every group opens with t₀
        positive = torch.einsum("btd,bd->bt", image, embeds[first])
        return per_sample / counts, {"cosine": positive, "margin": positive - negatives}

    def _reference_cosine(self, image: Tensor, references: Tensor) -> Tensor:
        """Mean over K references of the cosine to each frame: image ``[B, T, D]`` → ``[B, T]``."""
        refs = references if references.ndim == 5 else references.unsqueeze(1)  # [B, K, 3, H, W]
        b, k = refs.shape[:2]
        ref = self.embed_images(refs.flatten(0, 1)).view(b, k, -1)
        return torch.einsum("btd,bkd->btk", image, ref).mean(-1)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_backend"] = None  # holds the model; it reloads lazily in the receiving process
        return state


def lambda_harmonic(s_image: Tensor, s_text: Tensor, lam: float) -> Tensor:
    """RPO's λ-Harmonic reward (docs/methods.md#rpo-harmonic): a weighted harmonic mean of image and text fidelity.

    Args:
        s_image (`Tensor`): image–reference similarity already mapped to [0, 1], any shape.
        s_text (`Tensor`): text–image similarity already mapped to [0, 1], same shape.
        lam: weight of the image term; λ = 1 gives ``s_image``, λ = 0 gives ``s_text`` (up to the 1e-8 guard).

    Returns:
        `Tensor`: same shape, in [0, 1].
    """
    if not 0.0 <= lam <= 1.0 or math.isnan(lam):
        raise ValueError(f"lambda_harmonic needs lam in [0, 1]; got {lam}.")
    return 1.0 / (lam / (s_image + _HARMONIC_EPS) + (1.0 - lam) / (s_text + _HARMONIC_EPS))

