"""Every conversion of pixels from the outside world into visalign's canonical tensors, and back.

Canonical forms (docs/architecture.md#canonical-data): images are float RGB in [0, 1] shaped ``[B, 3, H, W]``;
videos ``[B, T, 3, H, W]`` with frames in time order. Files, PIL images of any mode (L, LA, P, RGBA,
CMYK, I;16, ...), numpy arrays, uint8 tensors, channels-last layouts and a VAE's [-1, 1] range are
converted here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_FILE_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")

# Refuse silently padded truncated files: a half-decoded image must be reported, not scored.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class MediaError(ValueError):
    """A file or array that cannot be turned into canonical media; the message names it and what to do."""


# ---------------------------------------------------------------- images


def pil_to_tensor(img: Image.Image) -> Tensor:
    """Any PIL image → float32 ``[3, H, W]`` in [0, 1].

    Alpha is composited over black (the shapes world's background, and what a generator never emits anyway);
    16/32-bit integer and float modes are rescaled by their real range, not clipped at 255.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
        return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0).expand(3, -1, -1).clone()
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return torch.from_numpy((arr / top).clip(0, 1).astype(np.float32)).unsqueeze(0).expand(3, -1, -1).clone()
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        arr = (arr / 255.0 if arr.max(initial=0) > 1.0 else arr).clip(0, 1)  # F images come in 0..1 or 0..255
        return torch.from_numpy(arr).unsqueeze(0).expand(3, -1, -1).clone()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        arr = np.asarray(rgba, dtype=np.float32) / 255.0
        rgb = arr[..., :3] * arr[..., 3:4]
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def load_image(path: str | os.PathLike[str]) -> Tensor:
    """Read an image file → float32 ``[3, H, W]`` in [0, 1].

    Raises:
        MediaError: naming the file when it is empty, truncated, corrupt or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: the file is empty (0 bytes); re-export or remove it.")
    try:
        with Image.open(path) as img:
            img.load()
            if getattr(img, "is_animated", False):
                img.seek(0)
            return pil_to_tensor(img)
    except UnidentifiedImageError:
        raise MediaError(f"{path}: not a readable image (corrupt, or an unsupported format).") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"{path}: cannot decode image ({err}); the file is probably truncated or corrupt.") from None


def array_to_tensor(x: np.ndarray | Tensor) -> Tensor:
    """numpy array or tensor of one image or a batch → float32 ``[..., 3, H, W]`` in [0, 1].

    Accepts channels-first or channels-last, 1/3/4 channels, uint8 (0..255), uint16, bool or float in [0, 1].
    Float input outside [0, 1] raises: if it is a VAE output in [-1, 1], use :func:`from_vae_range`.
    """
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.shape[-3] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.movedim(-1, -3)  # channels-last → channels-first
    if t.shape[-3] not in (1, 3, 4):
        raise MediaError(f"Cannot find the channel axis in an array of shape {tuple(t.shape)}; want [..., 3, H, W].")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.dtype in (torch.int16, torch.int32, torch.int64, torch.uint16 if hasattr(torch, "uint16") else torch.int32):
        t = t.float() / (65535.0 if t.max() > 255 else 255.0)
    elif t.dtype == torch.bool:
        t = t.float()
    else:
        t = t.float() if t.dtype == torch.float64 else t
        if t.numel() and (t.min() < -1e-6 or t.max() > 1 + 1e-6):
            raise MediaError(f"Float pixels must lie in [0, 1]; got [{t.min().item():.3g}, {t.max().item():.3g}]. "
                             "Use visalign.media.from_vae_range() for [-1, 1] tensors.")
    if t.shape[-3] == 1:
        t = t.expand(*t.shape[:-3], 3, *t.shape[-2:])
    elif t.shape[-3] == 4:
        t = t[..., :3, :, :] * t[..., 3:4, :, :]
    return t


def from_vae_range(x: Tensor) -> Tensor:
    """A VAE decoder's output in [-1, 1] → [0, 1] (clamped; differentiable inside the range)."""
    return (x / 2 + 0.5).clamp(0, 1)


def to_vae_range(x: Tensor) -> Tensor:
    """[0, 1] pixels → the [-1, 1] range VAEs encode."""
    return x * 2 - 1


MediaLike = Tensor | np.ndarray | Image.Image | str | os.PathLike


def to_image_batch(items: MediaLike | Sequence[MediaLike]) -> Tensor:
    """Anything image-like → float ``[B, 3, H, W]`` in [0, 1].

    Args:
        items: a tensor ``[3,H,W]``/``[B,3,H,W]`` (any layout ``array_to_tensor`` accepts), a PIL image, a path,
            or a list of those (all the same size).
    """
    if isinstance(items, (Tensor, np.ndarray)):
        t = array_to_tensor(items)
        return t.unsqueeze(0) if t.ndim == 3 else t
    if isinstance(items, (Image.Image, str, os.PathLike)):
        items = [items]
    tensors = [_one_image(x) for x in items]
    if not tensors:
        raise MediaError("No images given.")
    sizes = {tuple(t.shape) for t in tensors}
    if len(sizes) > 1:
        raise MediaError(f"Images in one batch must share a size; got {sorted(sizes)}. Resize them first.")
    return torch.stack(tensors)


def _one_image(x: MediaLike) -> Tensor:
    if isinstance(x, Image.Image):
        return pil_to_tensor(x)
    if isinstance(x, (str, os.PathLike)):
        return load_image(x)
    t = array_to_tensor(x)
    if t.ndim != 3:
        raise MediaError(f"Expected one image [3, H, W] in a list; got shape {tuple(t.shape)}.")
    return t


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``[..., 3, H, W]`` to ``size = (H, W)`` with antialiased bilinear (no-op if already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    out = torch.nn.functional.interpolate(flat, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*lead, *out.shape[-3:]).clamp(0, 1)


def to_pil(x: Tensor) -> Image.Image:
    """float ``[3, H, W]`` in [0, 1] → RGB PIL image."""
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def save_image(x: Tensor, path: str | os.PathLike[str]) -> None:
    """Write ``[3, H, W]`` in [0, 1] to ``path`` (format from the suffix)."""
    to_pil(x).save(path)


def make_grid(images: Tensor, columns: int | None = None, pad: int = 2) -> Tensor:
    """Tile ``[N, 3, H, W]`` into one ``[3, H', W']`` grid on a white background (row-major)."""
    n, _, h, w = images.shape
    columns = columns or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / columns))
    grid = torch.ones(3, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i]
    return grid


# ---------------------------------------------------------------- videos


def load_video(path: str | os.PathLike[str], max_frames: int | None = None) -> Tensor:
    """A folder of frames (sorted by name) or a video file → float32 ``[T, 3, H, W]`` in [0, 1].

    mp4/webm/... need the ``[video]`` extra (imageio + imageio-ffmpeg); GIFs are read with PIL.
    """
    path = Path(path)
    if path.is_dir():
        frames = list_images(path)
        if not frames:
            raise MediaError(f"{path}: a video folder must contain image frames ({', '.join(IMAGE_SUFFIXES)}).")
        frames = frames[:max_frames] if max_frames else frames
        return to_image_batch(frames)
    if not path.is_file():
        raise MediaError(f"{path}: no such video file or frame folder.")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: the file is empty (0 bytes).")
    if path.suffix.lower() == ".gif":
        return _read_gif(path, max_frames)
    return _read_video_file(path, max_frames)


def _read_gif(path: Path, max_frames: int | None) -> Tensor:
    frames = []
    try:
        with Image.open(path) as img:
            for i in range(getattr(img, "n_frames", 1)):
                if max_frames and i >= max_frames:
                    break
                img.seek(i)
                frames.append(pil_to_tensor(img.convert("RGB")))
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"{path}: cannot decode GIF ({err}).") from None
    return torch.stack(frames)


def _read_video_file(path: Path, max_frames: int | None) -> Tensor:
    try:
        import imageio.v3 as iio
    except ImportError:
        raise ImportError(f"Reading {path.suffix} videos needs imageio; install it with pip install "
                          "\"visalign[video]\", or pass a folder of frames.") from None
    try:
        frames = []
        for i, frame in enumerate(iio.imiter(path)):
            if max_frames and i >= max_frames:
                break
            frames.append(array_to_tensor(np.asarray(frame)))
    except Exception as err:  # imageio raises many backend-specific types
        raise MediaError(f"{path}: cannot decode video ({type(err).__name__}: {err}).") from None
    if not frames:
        raise MediaError(f"{path}: the video has no frames.")
    return torch.stack(frames)


def save_video(frames: Tensor, path: str | os.PathLike[str], fps: int = 8) -> None:
    """Write ``[T, 3, H, W]`` in [0, 1] as a GIF (PIL) or, with the ``[video]`` extra, as mp4."""
    path = Path(path)
    pils = [to_pil(f) for f in frames]
    if path.suffix.lower() == ".gif":
        pils[0].save(path, save_all=True, append_images=pils[1:], duration=int(1000 / fps), loop=0)
        return
    try:
        import imageio.v3 as iio
    except ImportError:
        raise ImportError("Writing mp4 needs imageio; pip install \"visalign[video]\", or save as .gif.") from None
    iio.imwrite(path, np.stack([np.asarray(p) for p in pils]), fps=fps)


# ---------------------------------------------------------------- folders


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def list_videos(folder: str | os.PathLike[str]) -> list[Path]:
    """Videos in ``folder``: video files, and sub-folders of frames, sorted by name."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith("."):
            continue
        if (p.is_file() and p.suffix.lower() in VIDEO_FILE_SUFFIXES) or (p.is_dir() and list_images(p)):
            out.append(p)
    return out


def list_media(folder: str | os.PathLike[str], modality: str = "image") -> list[Path]:
    """Media files of ``modality`` in ``folder``; raises MediaError naming the folder when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MediaError(f"{folder}: not a folder.")
    found = list_videos(folder) if modality == "video" else list_images(folder)
    if not found:
        kinds = "video files or frame folders" if modality == "video" else ", ".join(IMAGE_SUFFIXES)
        raise MediaError(f"{folder}: no {modality} media found (looked for {kinds}).")
    return found


def stack_resized(items: Iterable[Tensor], size: tuple[int, int] | None = None) -> Tensor:
    """Stack ``[3, H, W]`` (or ``[T, 3, H, W]``) tensors, resizing each to ``size`` (default: the first's size)."""
    items = list(items)
    size = size or tuple(items[0].shape[-2:])
    return torch.stack([resize_to(x, size) for x in items])
