"""``shapes-colour``: the continuous colour-fidelity reward of the shapes world, checked against a plain numpy
re-computation, against rendered scenes and the oracle's colour grade, and for its pixel gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visalign.scorers import ScoreBatch, get_scorer
from visalign.shapes.grammar import parse_prompt
from visalign.shapes.oracle import FOREGROUND, grade_images
from visalign.shapes.render import render_scene
from visalign.shapes.world import COLOURS, sample_scene

PROMPTS = ["two red circles", "a blue square above a green triangle", "a cyan triangle", "three yellow squares"]


def _reference(image: np.ndarray, colours: list[tuple[int, int, int]], sigma: float, tau: float) -> float:
    """Per pixel, by loops over the named colours: the formula of visalign.shapes.colour_scorer."""
    x = image.astype(np.float64)
    weight = 1 / (1 + np.exp(-(x.max(axis=0) - FOREGROUND) / tau))
    sims = [np.exp(-((x - np.array(c, dtype=np.float64)[:, None, None] / 255) ** 2).mean(axis=0) / (2 * sigma**2))
            for c in colours]
    sim = np.max(sims, axis=0)
    return float((weight * sim).sum() / (weight.sum() + 1e-6))


def _named(prompt: str) -> list[tuple[int, int, int]]:
    spec = parse_prompt(prompt)
    things = [spec.first, spec.second] if hasattr(spec, "first") else [spec.thing]
    return [COLOURS[t.colour] for t in things]


def test_reward_matches_the_formula_pixel_by_pixel():
    scorer = get_scorer("shapes-colour", params={"sigma": 0.3, "temperature": 0.08})
    x = torch.rand(len(PROMPTS), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = scorer(ScoreBatch(prompts=PROMPTS, media=x)).reward
    expected = [_reference(x[i].numpy(), _named(p), 0.3, 0.08) for i, p in enumerate(PROMPTS)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_renders_score_near_one_and_drift_costs_before_the_oracle_notices():
    rng = np.random.default_rng(0)
    scorer = get_scorer("shapes-colour")
    renders = torch.from_numpy(np.stack([render_scene(sample_scene(parse_prompt(p), rng)) for p in PROMPTS]))
    exact = scorer(ScoreBatch(prompts=PROMPTS, media=renders)).reward
    assert (exact > 0.85).all(), exact  # anti-aliased edges are dimmer than the pure colour
    # Darken every object to 75 % and lift its off channels by 0.2 (below half the brightest channel): the oracle
    # still reads the same colours, the fidelity reward drops on every image.
    drifted = renders * 0.75
    lit = drifted.amax(dim=1, keepdim=True) > FOREGROUND
    drifted = torch.where(lit & (drifted < 0.05), drifted + 0.2, drifted)
    drifted = drifted.clamp(0, 1)
    before, after = grade_images(renders.numpy(), PROMPTS), grade_images(drifted.numpy(), PROMPTS)
    np.testing.assert_array_equal(before.attributes["colour"], after.attributes["colour"])
    assert (before.attributes["colour"] == 1).all()
    lost = exact - scorer(ScoreBatch(prompts=PROMPTS, media=drifted)).reward
    assert (lost > 0.2).all(), lost


def test_a_wrong_colour_scores_low_and_black_scores_zero():
    image = torch.zeros(2, 3, 32, 32)
    image[0, 0, 8:24, 8:24] = 1.0  # a red square
    out = get_scorer("shapes-colour")(ScoreBatch(prompts=["a red square", "a cyan square"],
                                                 media=torch.stack([image[0], image[0]])))
    assert out.reward[0] > 0.99 and out.reward[1] < 0.01
    black = get_scorer("shapes-colour")(ScoreBatch(prompts=["a red square"], media=image[1:]))
    assert black.reward.item() < 0.1  # the soft mask keeps a trace of weight on black pixels, all far from red


def test_pixel_gradient_points_toward_the_named_colour():
    x = torch.zeros(1, 3, 8, 8)
    x[0, :, 2:6, 2:6] = torch.tensor([0.8, 0.3, 0.1]).view(3, 1, 1)  # a dull orange-red patch, prompt says red
    x.requires_grad_(True)
    reward = get_scorer("shapes-colour")(ScoreBatch(prompts=["a red square"], media=x), grad=True).reward
    reward.sum().backward()
    g = x.grad[0, :, 3, 3]
    assert torch.isfinite(x.grad).all()
    assert g[0] > 0 and g[1] < 0 and g[2] < 0  # more red, less green and blue


def test_video_is_the_mean_over_frames():
    scorer = get_scorer("shapes-colour", modality="video")
    clip = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", "a blue square"]
    got = scorer(ScoreBatch(prompts=prompts, media=clip)).reward
    per_frame = torch.stack([get_scorer("shapes-colour")(ScoreBatch(prompts=prompts, media=clip[:, t])).reward
                             for t in range(3)], dim=1)
    torch.testing.assert_close(got, per_frame.mean(dim=1))


@pytest.mark.parametrize("params", [{"sigma": 0.0}, {"temperature": -1.0}])
def test_bad_params_are_refused(params):
    with pytest.raises(ValueError, match="must be > 0"):
        get_scorer("shapes-colour", params=params)
