"""media.py: every outside form of pixels becomes float RGB in [0, 1]; bad files name themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visalign import media
from visalign.media import MediaError

RGB = (200, 100, 50)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_pil_mode_becomes_rgb_float(mode):
    base = Image.new("RGB", (8, 6), RGB)
    img = base.convert(mode)
    t = media.pil_to_tensor(img)
    assert t.shape == (3, 6, 8) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() <= 1
    if mode in ("RGB", "RGBA", "CMYK"):
        torch.testing.assert_close(t[:, 0, 0], torch.tensor(RGB) / 255.0, atol=2 / 255, rtol=0)
    if mode in ("L", "LA", "I", "F"):  # grey modes keep the luma 0.299R+0.587G+0.114B
        assert abs(t[0, 0, 0].item() - (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255) < 2 / 255


def test_sixteen_bit_uses_full_range():
    arr = np.full((4, 4), 65535 // 2, dtype=np.uint16)
    t = media.pil_to_tensor(Image.fromarray(arr))
    assert abs(t.mean().item() - 0.5) < 1e-3


def test_rgba_composites_alpha_over_black():
    img = Image.new("RGBA", (2, 2), (255, 255, 255, 128))
    t = media.pil_to_tensor(img)
    assert abs(t.mean().item() - 128 / 255) < 1e-6


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_load_image_formats(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    Image.new("RGB", (16, 12), RGB).save(path)
    t = media.load_image(path)
    assert t.shape == (3, 12, 16)
    torch.testing.assert_close(t[:, 5, 5], torch.tensor(RGB) / 255.0, atol=6 / 255, rtol=0)


def test_arrays_uint8_channels_last_and_batches():
    hwc = np.zeros((5, 7, 3), dtype=np.uint8)
    hwc[..., 0] = 255
    assert media.to_image_batch(hwc).shape == (1, 3, 5, 7)
    assert media.to_image_batch(hwc)[0, 0].min() == 1.0
    batch = media.to_image_batch(torch.zeros(2, 6, 6, 3, dtype=torch.uint8))
    assert batch.shape == (2, 3, 6, 6) and batch.dtype == torch.float32
    grey = media.to_image_batch(np.ones((1, 4, 4), dtype=np.float32) * 0.25)
    assert grey.shape == (1, 3, 4, 4) and torch.allclose(grey, torch.full_like(grey, 0.25))


def test_float_outside_unit_range_is_refused_with_a_hint():
    with pytest.raises(MediaError, match="from_vae_range"):
        media.to_image_batch(torch.full((1, 3, 4, 4), -0.5))
    torch.testing.assert_close(media.from_vae_range(torch.tensor([-1.0, 0.0, 1.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_mixed_sizes_in_one_list_raise():
    with pytest.raises(MediaError, match="share a size"):
        media.to_image_batch([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])


def test_bad_files_are_named(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty.png.*empty"):
        media.load_image(empty)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(MediaError, match="junk.jpg"):
        media.load_image(junk)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MediaError, match="truncated.png"):
        media.load_image(truncated)


def test_video_from_frame_folder_and_gif(tmp_path):
    frames = tmp_path / "clip"
    frames.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(frames / f"{i:03d}.png")
    v = media.load_video(frames)
    assert v.shape == (5, 3, 8, 8)
    assert v[:, 0, 0, 0].tolist() == sorted(v[:, 0, 0, 0].tolist())  # time order = name order
    media.save_video(v, tmp_path / "clip.gif")
    g = media.load_video(tmp_path / "clip.gif")
    assert g.shape == (5, 3, 8, 8)
    assert media.list_videos(tmp_path) == [frames, tmp_path / "clip.gif"]


def test_mp4_round_trip_with_video_extra(tmp_path):
    pytest.importorskip("imageio_ffmpeg", reason="mp4 needs the [video] extra")
    v = torch.zeros(6, 3, 16, 16)
    v[:, 1] = 0.8
    media.save_video(v, tmp_path / "c.mp4", fps=4)
    back = media.load_video(tmp_path / "c.mp4")
    assert back.shape[1:] == (3, 16, 16) and back.shape[0] == 6
    assert abs(back[:, 1].mean().item() - 0.8) < 0.05


def test_empty_folder_is_named(tmp_path):
    with pytest.raises(MediaError, match="no image media found"):
        media.list_media(tmp_path)


def test_grid_tiles_images():
    grid = media.make_grid(torch.zeros(5, 3, 4, 4), columns=3, pad=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 5 + 1)
