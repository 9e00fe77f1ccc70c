"""The shipped shapes-world generators: stock diffusers loading, oracle floors, seeded build determinism, noise.

The asset tests load ``assets/shapes/t2i`` (and ``t2v``) in a *subprocess that never imports visalign*, so they
prove the folders are plain diffusers pipelines, then grade the samples with the exact oracle here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
T2I = ROOT / "assets" / "shapes" / "t2i"
T2V = ROOT / "assets" / "shapes" / "t2v"
PROMPTS = ROOT / "assets" / "shapes" / "prompts"

# Per-attribute oracle accuracy floors on the first SAMPLE_COUNT held-in prompts (seeds 1234 + i, DDIM 20, CFG 4).
# Set a few points under the values measured on the shipped model (assets/shapes/README.md), so a broken save,
# a wrong scaling factor or a tokenizer mismatch fails while sampling noise does not.
SAMPLE_COUNT = 32
T2I_FLOORS = {"colour": 0.5, "shape": 0.3, "count": 0.3}

_SAMPLE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    folder, prompts_file, out, frames = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    prompts = [line.strip() for line in open(prompts_file) if line.strip()]
    pipe = DiffusionPipeline.from_pretrained(folder)  # plain load: the folder must give an fp32 pipeline
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_frames": frames} if frames else {}
    gens = [torch.Generator().manual_seed(1234 + i) for i in range(len(prompts))]
    result = pipe(prompts, guidance_scale=4.0, num_inference_steps=20, generator=gens, output_type="np", **kwargs)
    media = np.asarray(result.frames if frames else result.images, dtype=np.float32)
    assert "visalign" not in sys.modules, "the stock load path must not need visalign"
    np.save(out, media)
    print(type(pipe).__name__)
""")


def _sample_in_plain_process(folder: Path, prompts: list[str], tmp_path: Path,
                             frames: int = 0) -> tuple[str, np.ndarray]:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "media.npy"
    command = [sys.executable, "-c", _SAMPLE_SCRIPT, str(folder), str(prompts_file), str(out), str(frames)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    media = np.load(out)
    return done.stdout.strip().splitlines()[-1], np.moveaxis(media, -1, -3)  # channels-last → [.., 3, H, W]


def test_shipped_t2i_loads_with_plain_diffusers_and_draws_gradeable_shapes(tmp_path):
    from visalign.shapes.evaluate import summarise
    from visalign.shapes.prompt_sets import read_prompt_set

    prompts = read_prompt_set(PROMPTS / "heldin_eval.txt")[:SAMPLE_COUNT]
    name, images = _sample_in_plain_process(T2I, prompts, tmp_path)
    assert name == "StableDiffusionPipeline"
    assert images.shape == (SAMPLE_COUNT, 3, 32, 32)
    summary = summarise(np.clip(images, 0, 1), prompts)
    low = {a: round(summary["attributes"][a], 3) for a, floor in T2I_FLOORS.items()
           if summary["attributes"][a] < floor}
    assert not low, f"oracle accuracy below the floors {T2I_FLOORS}: {low}; full summary {summary}"


def test_shipped_t2i_records_its_build():
    metrics = json.loads((T2I / "build.json").read_text())
    assert metrics["unet"]["steps"] > 0 and metrics["config"]["extra_object_p"] > 0
    assert {"heldin", "heldout_compositions"} <= set(metrics["eval"])
    assert metrics["check"]["steps"] > 0 and len(metrics["check"]["weights_sha256"]) == 64
    size = sum(f.stat().st_size for f in (ROOT / "assets" / "shapes").rglob("*") if f.is_file() and not f.is_symlink())
    assert size < 25e6, f"assets/shapes holds {size / 1e6:.1f} MB; the budget is 25 MB"


def test_short_unet_build_is_bit_identical_for_a_seed_and_differs_across_seeds():
    from visalign.shapes.check import short_unet_run

    tiny = {"unet_channels": (16, 32, 32), "text_width": 32}
    first = short_unet_run(T2I, seed=3, steps=3, batch_size=4, config_overrides=tiny)
    second = short_unet_run(T2I, seed=3, steps=3, batch_size=4, config_overrides=tiny)
    other = short_unet_run(T2I, seed=4, steps=3, batch_size=4, config_overrides=tiny)
    assert first.weights_sha256 == second.weights_sha256 and first.loss_mean == second.loss_mean
    assert other.weights_sha256 != first.weights_sha256
    assert np.isfinite(first.loss_mean) and 0.05 < first.loss_mean < 5.0


def test_noisy_stream_adds_exactly_one_object_at_the_configured_rate_and_never_miscolours():
    from visalign.shapes.noisy_data import NoisyStreamConfig, iter_noisy_image_batches
    from visalign.shapes.oracle import detect_objects, grade_images
    from visalign.shapes.world import CountPrompt

    batch = next(iter_noisy_image_batches(NoisyStreamConfig(seed=0, batch_size=300, extra_object_p=0.4)))
    grades = grade_images(batch.media, batch.specs)
    objects = detect_objects(batch.media)
    named = [s.count if isinstance(s, CountPrompt) else 2 for s in batch.specs]
    extra = np.array([len(o) - n for o, n in zip(objects, named, strict=True)])
    wrong_count = np.array([len(o) != n for o, n in zip(objects, named, strict=True)])
    # Count 4 shows 3 when noisy (the world has no 5); every other noisy image shows exactly one object more.
    assert set(np.unique(extra)) <= {-1, 0, 1}
    assert np.all(extra[extra == -1] == -1) and all(n == 4 for n, e in zip(named, extra, strict=True) if e == -1)
    assert 0.31 < wrong_count.mean() < 0.49, wrong_count.mean()
    assert np.all(grades.attributes["colour"] == 1.0) and np.all(grades.attributes["shape"] == 1.0)
    clean = next(iter_noisy_image_batches(NoisyStreamConfig(seed=0, batch_size=100, extra_object_p=0.0)))
    assert np.all(grade_images(clean.media, clean.specs).all)


def test_noisy_stream_is_a_pure_function_of_its_seed():
    from visalign.shapes.noisy_data import NoisyStreamConfig, iter_noisy_image_batches

    a = next(iter_noisy_image_batches(NoisyStreamConfig(seed=5, batch_size=16)))
    b = next(iter_noisy_image_batches(NoisyStreamConfig(seed=5, batch_size=16)))
    c = next(iter_noisy_image_batches(NoisyStreamConfig(seed=6, batch_size=16)))
    assert a.captions == b.captions and np.array_equal(a.media, b.media)
    assert a.captions != c.captions
    with pytest.raises(ValueError, match="extra_object_p"):
        NoisyStreamConfig(extra_object_p=0.5)


@pytest.mark.skipif(not (T2V / "model_index.json").exists(), reason="assets/shapes/t2v is not built in this checkout")
def test_shipped_t2v_loads_with_plain_diffusers_and_keeps_the_shapes_colour(tmp_path):
    from visalign.shapes.evaluate import summarise
    from visalign.shapes.prompt_sets import read_prompt_set

    prompts = read_prompt_set(PROMPTS / "video_eval.txt")[:4]
    name, clips = _sample_in_plain_process(T2V, prompts, tmp_path, frames=8)
    assert name == "AnimateDiffPipeline"
    assert clips.shape == (4, 8, 3, 32, 32)
    summary = summarise(np.clip(clips, 0, 1), prompts)
    assert summary["attributes"]["colour"] >= 0.5, summary
