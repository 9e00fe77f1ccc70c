"""ClipScorer's ``contrast`` mode: P(prompt | image) within each group of one-attribute negatives, averaged over
groups; the shapes contrast set; and what the shipped shapes CLIP makes of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny.clip import build_hf_clip
from visalign.scorers import ScoreBatch, get_scorer, scorer_card
from visalign.scorers.contrasts import CONTRAST_SETS, contrast_set
from visalign.shapes.grammar import canonical_caption, parse_prompt
from visalign.shapes.negatives import CONTRAST_GROUPS, contrast_captions, hard_negatives_by_kind
from visalign.shapes.oracle import grade_images
from visalign.shapes.render import render_scene
from visalign.shapes.world import all_prompt_specs, sample_scene

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "shapes"
MIXED = ["two red circles", "a blue square above a green triangle", "two red circles", "a cyan triangle"]


@pytest.fixture(scope="module")
def hf_dir(tiny_dir):
    return build_hf_clip(tiny_dir)


def test_contrast_is_the_mean_over_groups_of_the_softmax_within_each(hf_dir):
    scorer = get_scorer("shapes-clip-contrast", weights=str(hf_dir))
    x = torch.rand(len(MIXED), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = scorer(ScoreBatch(prompts=MIXED, media=x))
    image = scorer.embed_images(x)
    scale = scorer._backend.logit_scale().float()
    expected = []
    for i, prompt in enumerate(MIXED):
        groups = contrast_captions(prompt)
        probs = [torch.softmax(scale * scorer.embed_texts(g) @ image[i], 0)[0] for g in groups]
        expected.append(torch.stack(probs).mean())
    torch.testing.assert_close(out.raw, torch.stack(expected), atol=1e-5, rtol=0)
    first = scorer.embed_texts([canonical_caption(parse_prompt(MIXED[1]))])[0]
    torch.testing.assert_close(out.extras["cosine"][1], image[1] @ first, atol=1e-5, rtol=0)
    negatives = [t for g in contrast_captions(MIXED[1]) for t in g[1:]]
    hardest = (scorer.embed_texts(negatives) @ image[1]).max()
    torch.testing.assert_close(out.extras["margin"][1], image[1] @ first - hardest, atol=1e-5, rtol=0)


def test_contrast_reward_has_a_gradient_to_the_pixels(hf_dir):
    scorer = get_scorer("shapes-clip-contrast", weights=str(hf_dir))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    scorer(ScoreBatch(prompts=MIXED[:2], media=x), grad=True).reward.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_unknown_contrast_set_and_bad_temperature_fail_at_construction():
    with pytest.raises(ValueError, match="Card 'shapes-clip-contrast': unknown contrast set 'nope'"):
        get_scorer("shapes-clip-contrast", params={"contrasts": "nope"})
    with pytest.raises(ValueError, match="Card 'shapes-clip-contrast': contrast set 'no_such.module:f' .*cannot be "
                                         "imported"):
        get_scorer("shapes-clip-contrast", params={"contrasts": "no_such.module:f"})
    with pytest.raises(ValueError, match="Card 'shapes-clip-contrast': contrast set "
                                         "'visalign.shapes.negatives:nope' .*cannot be imported"):
        get_scorer("shapes-clip-contrast", params={"contrasts": "visalign.shapes.negatives:nope"})
    with pytest.raises(ValueError, match="temperature"):
        get_scorer("shapes-clip-contrast", params={"temperature": 0.0})
    with pytest.raises(ValueError, match="unknown contrast set"):
        contrast_set("nope")


def test_contrast_sets_are_import_paths_or_registered_names():
    """The shipped cards name the shapes set by import path; a user-registered short name works as well."""
    for card in ("shapes-clip-contrast", "shapes-clip-tuned-contrast"):
        assert contrast_set(scorer_card(card).params["contrasts"]) is contrast_captions
    assert "shapes" not in CONTRAST_SETS  # the generic package names no world
    CONTRAST_SETS.add_builtin("test-shapes", "visalign.shapes.negatives:contrast_captions")
    assert contrast_set("test-shapes", card_id="mine") is contrast_captions


def test_shapes_contrast_groups_are_one_attribute_each_and_false():
    """Each group's negatives differ from the prompt in the group's attribute only, and every one is false for a
    render of the prompt (graded by the oracle)."""
    rng = np.random.default_rng(1)
    specs = [s for kind in ("single", "count", "relation") for s in all_prompt_specs(kind)]
    for spec in [specs[int(i)] for i in rng.choice(len(specs), size=40, replace=False)]:
        kind = "relation" if spec.kind == "relation" else "count"
        groups = contrast_captions(canonical_caption(spec))
        assert len(groups) == len(CONTRAST_GROUPS[kind])
        image = render_scene(sample_scene(spec, rng))
        for group in groups:
            assert group[0] == canonical_caption(spec) and len(set(group)) == len(group) > 1
            verdict = grade_images(np.stack([image] * len(group)), group).all
            assert verdict[0] and not verdict[1:].any(), group
    by_kind = hard_negatives_by_kind(parse_prompt("two red circles"))
    assert {k: len(v) for k, v in by_kind.items()} == {"colour": 5, "shape": 2, "count": 3}


def test_shipped_clip_contrast_punishes_a_wrong_colour_more_than_the_cosine_does():
    """On renders of "two magenta circles", the red channel halved (graded blue by the oracle) costs the contrast
    reward about a third (the colour group's share), while shapes-clip's cosine moves by far less than that."""
    if not (ASSETS / "clip" / "config.json").is_file():
        pytest.skip("assets/shapes/clip is not built")
    rng = np.random.default_rng(0)
    prompt = "two magenta circles"
    x = torch.tensor(np.stack([render_scene(sample_scene(parse_prompt(prompt), rng)) for _ in range(16)]))
    shifted = x.clone()
    shifted[:, 0] *= 0.4
    assert grade_images(shifted.numpy(), [prompt] * 16).attributes["colour"].sum() == 0
    contrast, cosine = get_scorer("shapes-clip-contrast"), get_scorer("shapes-clip")
    drops = {}
    for name, scorer in (("contrast", contrast), ("cosine", cosine)):
        right = scorer(ScoreBatch(prompts=[prompt] * 16, media=x)).reward.mean()
        wrong = scorer(ScoreBatch(prompts=[prompt] * 16, media=shifted)).reward.mean()
        drops[name] = float(right - wrong)
    assert drops["contrast"] > 0.25 and drops["contrast"] > 1.5 * drops["cosine"], drops
