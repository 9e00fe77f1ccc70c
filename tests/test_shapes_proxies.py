"""The shapes world's learned proxies: hard negatives are really false, and the shipped CLIP / VLM folders load
through ``get_scorer`` by card id and rank true captions above hard negatives on ground-truth renders.

The floors are what the shipped weights score on this test's fixed, seeded pairs (recorded when the assets were
built; see assets/shapes/README.md) minus two points of slack for float differences between machines. A retrained
proxy that is weaker, a scorer that tokenises or preprocesses differently from training, or a card that loads the
wrong folder falls below them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from visalign.scorers import ScoreBatch, get_scorer
from visalign.shapes.build_proxies import build_eval_set, hard_negative_accuracy
from visalign.shapes.grammar import caption
from visalign.shapes.negatives import NEGATIVE_KINDS, hard_negative, sample_hard_negative
from visalign.shapes.oracle import grade_images
from visalign.shapes.render import render_scene
from visalign.shapes.world import all_prompt_specs, sample_scene

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "shapes"
EVAL_IMAGES = 120

# asset folder → {split: minimum hard-negative accuracy on build_eval_set(split, EVAL_IMAGES)}.
FLOORS = {
    "clip": {"train": 0.825, "heldout": 0.585},  # measured 0.845 / 0.605
    # Tuned on base samples it trades some relation order on renders for count on samples; measured 0.837 / 0.646.
    "clip-tuned": {"train": 0.815, "heldout": 0.625},
    # The shipped VLM reads colour (83%) but little else yet (assets/shapes/README.md); measured 0.570 / 0.555.
    "vlm": {"train": 0.55, "heldout": 0.535},
}


def test_every_hard_negative_is_false_and_the_positive_true():
    rng = np.random.default_rng(0)
    specs = [s for kind in ("single", "count", "relation") for s in all_prompt_specs(kind)]
    picks = [specs[int(i)] for i in rng.choice(len(specs), size=150, replace=False)]
    images, prompts, kinds = [], [], []
    for spec in picks:
        image = render_scene(sample_scene(spec, rng))
        for kind in NEGATIVE_KINDS[spec.kind]:
            negative = hard_negative(spec, kind, rng)
            if negative is None:
                continue
            assert negative != spec
            images += [image, image]
            prompts += [caption(spec, rng), caption(negative, rng)]
            kinds.append(kind)
    verdict = grade_images(np.stack(images), prompts).all
    assert verdict[0::2].all(), "a positive caption was graded false on its own render"
    assert not verdict[1::2].any(), "a hard negative was true for the scene it should contradict"
    assert set(kinds) == {k for ks in NEGATIVE_KINDS.values() for k in ks}


def test_binding_negatives_keep_the_words_and_change_the_meaning():
    spec = all_prompt_specs("relation")[0]  # a red circle left of a red square
    rng = np.random.default_rng(0)
    swapped = hard_negative(spec, "swap_order", rng)
    assert (swapped.first, swapped.second) == (spec.second, spec.first)
    relation = [s for s in all_prompt_specs("relation") if s.first.colour != s.second.colour
                and s.first.shape != s.second.shape][0]
    colours = hard_negative(relation, "swap_colours", rng)
    assert sorted(caption(colours).split()) == sorted(caption(relation).split())
    assert colours != relation
    assert hard_negative(spec, "swap_colours", rng) is None  # equal colours: swapping changes nothing
    with pytest.raises(ValueError, match="swap_order"):
        sample_hard_negative(all_prompt_specs("single")[0], rng, ("swap_order",))


def _score_fn(scorer):
    def score(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return scorer(ScoreBatch(prompts=captions, media=images)).raw

    return score


@pytest.mark.parametrize("card_id,folder", [("shapes-clip", "clip"), ("shapes-clip-tuned-contrast", "clip-tuned"),
                                            ("shapes-vlm", "vlm")])
def test_shipped_proxy_ranks_true_captions_above_hard_negatives(card_id, folder, tmp_path, monkeypatch):
    if not (ASSETS / folder / "config.json").is_file():
        pytest.skip(f"assets/shapes/{folder} is not built; run `visalign shapes build`.")
    monkeypatch.chdir(tmp_path)  # the card's relative folder must resolve against the repository, not the cwd
    scorer = get_scorer(card_id)
    assert scorer.card.weights["local_dir"].endswith(folder)
    if scorer.card.params.get("mode") == "contrast":  # accuracy is a cosine comparison: the same weights as cosine
        scorer = get_scorer("shapes-clip", weights={**scorer.card.weights})
    for split, floor in FLOORS[folder].items():
        accuracy = hard_negative_accuracy(_score_fn(scorer), build_eval_set(split, EVAL_IMAGES), batch_size=128)
        assert accuracy["all"] >= floor, f"{card_id} {split}: {accuracy}"
    out = scorer(ScoreBatch(prompts=["a red circle", "a blue square"], media=torch.rand(2, 3, 32, 32)))
    assert out.reward.shape == (2,) and bool(((out.reward >= 0) & (out.reward <= 1)).all())
