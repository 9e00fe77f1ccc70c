"""Tuning the CLIP proxy on the base model's own samples: the oracle's captions are true of the images they describe,
and the tuned folder is a working CLIP proxy that records its hard-negative accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from visalign.scorers import ScoreBatch, get_scorer
from visalign.shapes.grammar import caption
from visalign.shapes.oracle import Objects, detect_objects, grade_images
from visalign.shapes.render import render_scene
from visalign.shapes.tune_proxy import TuneConfig, describe_scene, tune_clip_on_samples
from visalign.shapes.world import CountPrompt, RelationPrompt, all_prompt_specs, sample_scene

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "shapes"


def test_the_description_of_a_render_is_graded_true_by_the_oracle():
    rng = np.random.default_rng(0)
    specs = [s for kind in ("single", "count", "relation") for s in all_prompt_specs(kind)]
    picked = [specs[i] for i in rng.choice(len(specs), 200, replace=False)]
    images = np.stack([render_scene(sample_scene(s, rng)) for s in picked])
    described = [describe_scene(o, rng) for o in detect_objects(images)]
    kept = [(img, d, s) for img, d, s in zip(images, described, picked, strict=True) if d is not None]
    assert len(kept) >= 150  # diagonal relations have no caption; every count scene has one
    for _, d, s in kept:
        if isinstance(s, CountPrompt):
            assert d == s  # one thing n times is described exactly
    result = grade_images(np.stack([k[0] for k in kept]), [caption(k[1]) for k in kept])
    assert result.all.all()  # relations may come out mirrored ("A left of B" as "B right of A"), still true


def test_scenes_without_a_caption_are_refused():
    rng = np.random.default_rng(0)

    def objects(colours, shapes, xs, ys):
        n = len(colours)
        return Objects(np.array(colours), np.array(shapes), np.array(xs, float), np.array(ys, float), np.full(n, 30))

    assert describe_scene(objects([], [], [], []), rng) is None  # nothing drawn
    assert describe_scene(objects([0] * 5, [0] * 5, [.1, .3, .5, .7, .9], [.5] * 5), rng) is None  # five
    assert describe_scene(objects([6], [0], [.5], [.5]), rng) is None  # an off-palette colour
    assert describe_scene(objects([0, 1], [0, 1], [.2, .6], [.2, .6]), rng) is None  # a diagonal pair
    assert describe_scene(objects([0, 1, 2], [0, 0, 0], [.1, .5, .9], [.5] * 3), rng) is None  # three things
    pair = describe_scene(objects([0, 1], [0, 1], [.2, .8], [.5, .5]), rng)
    assert isinstance(pair, RelationPrompt) and pair.relation in ("left_of", "right_of")


@pytest.mark.skipif(not (ASSETS / "t2i" / "model_index.json").is_file() or not (ASSETS / "clip").is_dir(),
                    reason="the shipped t2i and clip assets are not built")
def test_tuning_on_a_few_samples_is_deterministic_loadable_and_leaves_the_source(tmp_path):
    from visalign.shapes.prompt_sets import read_prompt_set

    source = ASSETS / "clip" / "model.safetensors"
    before = source.read_bytes()
    config = TuneConfig(sample_batches=2, prompts_per_batch=6, images_per_prompt=4, held_back=8, batch_size=4,
                        steps=3, lr=1e-3)
    prompts = read_prompt_set(ASSETS / "prompts" / "train.txt")
    metrics = tune_clip_on_samples(ASSETS / "clip", ASSETS / "t2i", tmp_path / "tuned", prompts, config,
                                   eval_images=8)
    assert source.read_bytes() == before
    assert metrics["samples_drawn"] == 48 and 12 < metrics["samples_described"] <= 48
    assert metrics["steps"] == 3
    for key in ("samples_before", "samples_after", "heldin", "heldout"):
        assert 0.0 <= metrics[key]["all"] <= 1.0 and metrics[key]["pairs"] > 0
    assert json.loads((tmp_path / "tuned" / "metrics.json").read_text())["steps"] == 3
    from safetensors.torch import load_file

    new, old = load_file(str(tmp_path / "tuned" / "model.safetensors")), load_file(str(source))
    assert any(not torch.equal(new[k], old[k]) for k in old)
    # Seeded sampling, captions and batches on one thread: the same config gives the same weights, bit for bit.
    tune_clip_on_samples(ASSETS / "clip", ASSETS / "t2i", tmp_path / "again", prompts, config, eval_images=8)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(new[k], again[k]) for k in new)
    scorer = get_scorer("shapes-clip-tuned-contrast", weights=str(tmp_path / "tuned"))
    out = scorer(ScoreBatch(prompts=["a red circle", "two blue squares"], media=torch.rand(2, 3, 32, 32)))
    assert out.reward.shape == (2,) and bool(((out.reward >= 0) & (out.reward <= 1)).all())
