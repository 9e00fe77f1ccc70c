"""Per-family differences of transformers vision-language models, as data for :mod:`visalign.scorers.vlm_yes`.

The yes-token scorer is one mechanism; what differs between Qwen2-VL, LLaVA and Idefics3/SmolVLM is kept here:

* whether the family's chat template renders a ``system`` turn (LLaVA-1.5's drops it, so the scorer folds the
  instruction into the first user turn instead of losing it silently);
* how the pixels are preprocessed *as tensor ops* for ``grad=True`` (resize, normalise and, for Qwen2-VL, the
  family's patchify), reproducing the family's image processor so gradients reach the input pixels.

* how many placeholder tokens each image (or video) expands to, so the scorer can build the token ids with tensor
  ops (:mod:`visalign.scorers.vlm_inputs`) instead of the processor's per-sample string expansion;
* native video preprocessing (Qwen2-VL's ``pixel_values_videos`` + ``video_grid_thw``), and whether the model
  uses 3-D M-RoPE positions.

Families with a tensor path and token counts (Qwen2-VL, LLaVA) build all model inputs with tensor ops, with and
without gradients; the tests check them against the processor's outputs. A family without a tensor path (Idefics3
splits images into tiles with data-dependent padding) goes through its processor and is not differentiable; its
cards say ``differentiable: false``.

Upstream references (transformers 5.23.0): ``models/qwen2_vl/image_processing_qwen2_vl.py`` (``smart_resize``,
``patchify``), ``models/llava/image_processing_llava.py`` (CLIP-style shortest-edge resize and centre crop).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def _size_get(size: Any, key: str) -> Any:
    """Read ``key`` from a processor ``size`` that may be a dict or a ``SizeDict``."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _normalise(images: Tensor, image_processor: Any) -> Tensor:
    """(x − mean) / std with the processor's own constants; ``images`` float [N, 3, H, W] in [0, 1]."""
    mean = torch.tensor(image_processor.image_mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def _resize(images: Tensor, size: list[int]) -> Tensor:
    """Bicubic, antialiased resize (the processors' default for these families); differentiable in ``images``."""
    from torchvision.transforms.v2 import functional as tvF

    return tvF.resize(images, size, interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def qwen2_vl_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w): multiples of ``factor`` with h·w in [min_pixels, max_pixels], aspect ratio kept.

    # Copied from transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize (transformers 5.23.0)
    """
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen2_vl_pixels(image_processor: Any, images: Tensor) -> dict[str, Tensor]:
    """Qwen2-VL / Qwen2.5-VL image preprocessing as tensor ops.

    Args:
        image_processor: the loaded ``Qwen2VLImageProcessor`` (its size, patch and merge sizes, mean and std are used).
        images: float in [0, 1], ``[N, 3, H, W]``, all the same size, in the order the prompt mentions them.

    Returns:
        ``pixel_values`` float ``[N·gh·gw, 3·T·p·p]`` (T = temporal patch size, each still image repeated T times,
        as the processor does) and ``image_grid_thw`` long ``[N, 3]`` = (1, gh, gw).
    """
    patch, merge = image_processor.patch_size, image_processor.merge_size
    temporal = image_processor.temporal_patch_size
    size = image_processor.size
    n, channels, height, width = images.shape
    rh, rw = qwen2_vl_smart_resize(height, width, patch * merge, _size_get(size, "shortest_edge"),
                                   _size_get(size, "longest_edge"))
    x = _normalise(_resize(images, [rh, rw]), image_processor)
    gh, gw = rh // patch, rw // patch
    # Same memory order as the processor's patchify: merge-window-major, so the vision tower's 2×2 merge
    # groups neighbouring patches.
    x = x.reshape(n, channels, gh // merge, merge, patch, gw // merge, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    pixel_values = x.reshape(n * gh * gw, channels * temporal * patch * patch)
    grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=images.device)
    return {"pixel_values": pixel_values, "image_grid_thw": grid}


def clip_style_pixels(image_processor: Any, images: Tensor) -> dict[str, Tensor]:
    """LLaVA-1.5 (CLIP) preprocessing as tensor ops: shortest edge → S, centre crop, normalise.

    Args:
        image_processor: the loaded ``LlavaImageProcessor`` / ``CLIPImageProcessor``.
        images: float in [0, 1], ``[N, 3, H, W]``.

    Returns:
        ``pixel_values`` float ``[N, 3, crop_h, crop_w]``.
    """
    from torchvision.transforms.v2 import functional as tvF

    if getattr(image_processor, "do_pad", False):
        raise ValueError("This LLaVA processor pads images to a square (do_pad=True); the differentiable path "
                         "does not reproduce padding. Use a card with differentiable: false, or do_pad=False.")
    shortest = _size_get(image_processor.size, "shortest_edge")
    crop = image_processor.crop_size
    x = _resize(images, [shortest])
    x = tvF.center_crop(x, [_size_get(crop, "height"), _size_get(crop, "width")])
    return {"pixel_values": _normalise(x, image_processor)}


def qwen2_vl_video_pixels(video_processor: Any, videos: Tensor) -> dict[str, Tensor]:
    """Qwen2-VL native video preprocessing as tensor ops (``Qwen2VLVideoProcessor`` with ``cap_pixels_per_frame``
    false): per-frame smart resize and normalise, pad the clip to a multiple of the temporal patch by repeating its
    last frame, then patchify ``temporal_patch_size`` consecutive frames together.

    Args:
        video_processor: the loaded ``Qwen2VLVideoProcessor``.
        videos: float in [0, 1], ``[N, F, 3, H, W]``, all the same size.

    Returns:
        ``pixel_values_videos`` float ``[N·gt·gh·gw, 3·T·p·p]`` and ``video_grid_thw`` long ``[N, 3]`` = (gt, gh, gw),
        ``gt = ⌈F / T⌉``.
    """
    patch, merge = video_processor.patch_size, video_processor.merge_size
    temporal = video_processor.temporal_patch_size
    size = video_processor.size
    n, frames, channels, height, width = videos.shape
    rh, rw = qwen2_vl_smart_resize(height, width, patch * merge, _size_get(size, "shortest_edge"),
                                   _size_get(size, "longest_edge"))
    x = _normalise(_resize(videos.reshape(n * frames, channels, height, width), [rh, rw]), video_processor)
    x = x.reshape(n, frames, channels, rh, rw)
    if pad := -frames % temporal:
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    gt, gh, gw = x.shape[1] // temporal, rh // patch, rw // patch
    # Copied layout from transformers.models.qwen2_vl.video_processing_qwen2_vl.Qwen2VLVideoProcessor.patchify.
    x = x.reshape(n, gt, temporal, channels, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    pixel_values = x.reshape(n * gt * gh * gw, channels * temporal * patch * patch)
    grid = torch.tensor([[gt, gh, gw]] * n, dtype=torch.long, device=videos.device)
    return {"pixel_values_videos": pixel_values, "video_grid_thw": grid}


def qwen2_vl_token_counts(processor: Any, pixels: dict[str, Tensor]) -> Tensor:
    """Placeholder tokens per image or video: merged patches, ``t·h·w / merge²`` (``replace_image_token``)."""
    grid = pixels["image_grid_thw"] if "image_grid_thw" in pixels else pixels["video_grid_thw"]
    return grid.prod(-1) // processor.image_processor.merge_size ** 2


def llava_token_counts(processor: Any, pixels: dict[str, Tensor]) -> Tensor | None:
    """Placeholder tokens per LLaVA image: patches (+ CLS, dropped by the "default" feature strategy); None for a
    legacy processor without ``patch_size`` (the processor path then expands them)."""
    patch = getattr(processor, "patch_size", None)
    if patch is None:
        return None
    height, width = pixels["pixel_values"].shape[-2:]
    count = (height // patch) * (width // patch) + int(processor.num_additional_image_tokens or 0)
    if processor.vision_feature_select_strategy == "default":
        count -= 1
    return torch.full((pixels["pixel_values"].shape[0],), count, dtype=torch.long)


@dataclass(frozen=True)
class VlmFamily:
    """What the yes-token scorer needs to know about one family of vision-language models.

    Attributes:
        name: short family name used in messages and in a card's ``params.family``.
        model_types: ``config.model_type`` values that belong to the family.
        system_turn: the chat template renders a ``system`` message; if false, the system text is prepended to the
            first user turn instead.
        tensor_pixels: ``(image_processor, images [N, 3, H, W] in [0, 1]) -> {name: tensor}`` replacing the
            processor's pixel inputs (for every batch where it is verified to match them, and always for
            ``grad=True``); None when the family has no differentiable path.
        pixel_keys: the processor outputs that ``tensor_pixels`` replaces.
        token_counts: ``(processor, pixel inputs) -> long [N]`` placeholder tokens per image (or video), which lets
            the scorer expand placeholders with tensor ops instead of the processor's string replacement; None (or
            a None result) keeps the processor path.
        video_pixels: ``(video_processor, videos [N, F, 3, H, W]) -> {name: tensor}`` for native video input
            (``params.video_input: native``); None when the family takes videos only as frames.
        mrope: the model uses Qwen2-VL's 3-D rotary positions, which the scorer then computes vectorised and
            passes as ``position_ids`` (with the vision tower's index tensors precomputed).
    """

    name: str
    model_types: tuple[str, ...]
    system_turn: bool = True
    tensor_pixels: Callable[[Any, Tensor], dict[str, Tensor]] | None = None
    pixel_keys: tuple[str, ...] = ("pixel_values",)
    token_counts: Callable[[Any, dict[str, Tensor]], Tensor | None] | None = None
    video_pixels: Callable[[Any, Tensor], dict[str, Tensor]] | None = None
    mrope: bool = False


FAMILIES: dict[str, VlmFamily] = {
    f.name: f
    for f in (
        VlmFamily("qwen2-vl", ("qwen2_vl", "qwen2_5_vl"), tensor_pixels=qwen2_vl_pixels,
                  pixel_keys=("pixel_values", "image_grid_thw"), token_counts=qwen2_vl_token_counts,
                  video_pixels=qwen2_vl_video_pixels, mrope=True),
        VlmFamily("llava", ("llava",), system_turn=False, tensor_pixels=clip_style_pixels,
                  token_counts=llava_token_counts),
        VlmFamily("idefics3", ("idefics3", "smolvlm")),
    )
}


def family_for(model_type: str, override: str | None = None) -> VlmFamily:
    """The family of a loaded model (``config.model_type``), or the one a card names in ``params.family``."""
    from visalign.registry import UnknownIdError, unknown_id_message

    if override:
        if override not in FAMILIES:
            raise UnknownIdError(unknown_id_message("VLM family", override, FAMILIES))
        return FAMILIES[override]
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"Model type {model_type!r} is not a supported yes-token VLM family; supported model types: "
                     f"{known}. Add a VlmFamily entry in visalign/scorers/vlm_families.py, or set params.family in "
                     "the card to the closest family.")
