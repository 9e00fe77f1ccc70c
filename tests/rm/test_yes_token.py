"""The yes-token RM trainer on tiny random-init VLMs (tests/tiny/vlm.py): training moves exactly the P("Yes") that
``VlmYesScorer`` reads, and the saved card loads back as a scorer that scores the same."""

from __future__ import annotations

import pytest
import torch

from visalign.rm.losses import LossParams
from visalign.rm.pairs import IdenticalPairError, IndexPair
from visalign.rm.yes_token import YesTokenConfig, save_yes_token_rm, train_yes_token_rm
from visalign.scorers import ScoreBatch, get_scorer

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def llava_dir(tiny_dir):
    from tests.tiny.vlm import build_family

    return build_family("llava", tiny_dir)


@pytest.fixture(scope="module")
def qwen_dir(tiny_dir):
    from tests.tiny.vlm import build_family

    return build_family("qwen2-vl", tiny_dir)


def items(seed: int = 0) -> torch.Tensor:
    """8 images: 0-3 bright (the positives), 4-7 dark (the negatives)."""
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    images[4:] *= 0.2
    return images


def p_yes(scorer, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return scorer(ScoreBatch(prompts=[PROMPT] * len(images), media=images)).extras["p_yes"]


def test_yes_no_training_raises_the_scorers_p_yes_on_positives(llava_dir, tmp_path):
    torch.manual_seed(0)
    scorer = get_scorer("shapes-vlm", weights=str(llava_dir))
    images, held = items(0), items(1)
    pairs = [IndexPair(i, 4 + j) for i in range(4) for j in range(4)]
    before = p_yes(scorer, held)
    losses = train_yes_token_rm(scorer, images, [PROMPT] * 8, pairs,
                                YesTokenConfig(loss="yes-no", steps=12, pairs_per_step=4, lr=1e-2), progress=False)
    after = p_yes(scorer, held)
    assert losses[-1] < 0.5 * losses[0]
    # Held-out images of the same two kinds: P(Yes) rises on positives and falls on negatives.
    assert after[:4].mean() > before[:4].mean() + 0.3 and after[4:].mean() < before[4:].mean()
    assert bool(after[:4].min() > after[4:].max())
    assert not any(p.requires_grad for p in scorer.model.parameters())  # the judge is frozen again

    card = save_yes_token_rm(scorer, tmp_path / "rm", "tiny-rm", metrics={"note": "test"},
                             config=YesTokenConfig(loss="yes-no"))
    assert card == tmp_path / "rm" / "card.yaml" and (tmp_path / "rm" / "weights" / "config.json").is_file()
    loaded = get_scorer(str(card))
    assert loaded.id == "tiny-rm"
    torch.testing.assert_close(p_yes(loaded, held), after, rtol=1e-4, atol=1e-6)


def test_bt_ties_trains_the_log_odds_and_ties_are_pulled_together(llava_dir):
    torch.manual_seed(0)
    scorer = get_scorer("shapes-vlm", weights=str(llava_dir))
    images = items(2)
    decided = [IndexPair(i, 4 + i) for i in range(4)]
    ties = [IndexPair(0, 1, tie=True), IndexPair(2, 3, tie=True), IndexPair(4, 5, tie=True)]
    config = YesTokenConfig(loss="bt-ties", steps=12, pairs_per_step=7, lr=1e-2, params=LossParams(kappa=0.5))
    losses = train_yes_token_rm(scorer, images, [PROMPT] * 8, decided + ties, config, progress=False)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        renorm = scorer(ScoreBatch(prompts=[PROMPT] * 8, media=images)).extras["p_yes_renorm"]
    odds = torch.logit(renorm)
    assert bool((odds[:4] > odds[4:]).all())


def test_refusals_name_what_to_change(llava_dir):
    scorer = get_scorer("shapes-vlm", weights=str(llava_dir))
    images = items(3)
    images[5] = images[1]
    with pytest.raises(IdenticalPairError, match=r"rows \[1\]"):
        train_yes_token_rm(scorer, images, [PROMPT] * 8, [IndexPair(0, 4), IndexPair(1, 5)],
                           YesTokenConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match=r"tie pair.*rows \[0\].*bt-ties"):
        train_yes_token_rm(scorer, images, [PROMPT] * 8, [IndexPair(0, 4, tie=True)], YesTokenConfig(steps=1),
                           progress=False)
    with pytest.raises(ValueError, match="trains a pairwise judge but scorer 'shapes-vlm' has mode 'pointwise'"):
        train_yes_token_rm(scorer, images, [PROMPT] * 8, [IndexPair(0, 4)],
                           YesTokenConfig(loss="pairwise-yes-no", steps=1), progress=False)
    with pytest.raises(ValueError, match="Unknown reward-model loss"):
        YesTokenConfig(loss="hinge")


def test_pairwise_yes_no_trains_both_orders(qwen_dir):
    torch.manual_seed(0)
    scorer = get_scorer("pairwise-qwen2-vl-2b", weights=str(qwen_dir), params={"swap_average": False})
    images = items(4)
    pairs = [IndexPair(i, 4 + i) for i in range(4)]
    train_yes_token_rm(scorer, images, [PROMPT] * 8, pairs,
                       YesTokenConfig(loss="pairwise-yes-no", steps=12, pairs_per_step=4, lr=1e-2), progress=False)
    with torch.no_grad():
        ab = scorer(ScoreBatch(prompts=[PROMPT] * 4, media=images[:4], references=images[4:])).extras["p_yes"]
        ba = scorer(ScoreBatch(prompts=[PROMPT] * 4, media=images[4:], references=images[:4])).extras["p_yes"]
    assert bool((ab > 0.5).all()) and bool((ba < 0.5).all())


def test_gaussian_bt_trains_an_uncertainty_head_that_feeds_the_update_weights(llava_dir, tmp_path):
    from visalign.rewards.spec import RewardSpec

    torch.manual_seed(0)
    scorer = get_scorer("shapes-vlm", weights=str(llava_dir))
    images = items(5)
    # Pairs 0-3 are consistent (bright beats dark); pairs over items 4-7 flip both ways: label noise.
    pairs = [IndexPair(i, 4 + i) for i in range(4)] + [IndexPair(4, 5), IndexPair(5, 4), IndexPair(6, 7),
                                                       IndexPair(7, 6)]
    config = YesTokenConfig(loss="gaussian-bt", steps=12, pairs_per_step=8, lr=1e-2)
    losses = train_yes_token_rm(scorer, images, [PROMPT] * 8, pairs, config, progress=False)
    assert losses[-1] < losses[0]
    head = scorer.uncertainty_head
    assert head is not None and float(head.weight.abs().sum()) > 0  # it trained (it starts at zero)
    card = save_yes_token_rm(scorer, tmp_path / "rm", "tiny-unc", metrics={}, config=config)
    loaded = get_scorer(str(card))
    with torch.no_grad():
        out = loaded(ScoreBatch(prompts=[PROMPT] * 8, media=images))
        hidden = scorer.answer_log_probs([[im] for im in images], [scorer.template.format(prompt=PROMPT)] * 8,
                                         with_hidden=True)[1]
    torch.testing.assert_close(out.extras["log_sigma"], head(hidden).squeeze(-1), rtol=1e-4, atol=1e-5)
    sigma2 = torch.exp(2 * out.extras["log_sigma"])
    expected = torch.exp(-sigma2) / torch.exp(-sigma2).mean()
    torch.testing.assert_close(out.extras["weight"], expected, rtol=1e-4, atol=1e-6)
    # The reward spec multiplies a term's weight extras into the update weights.
    spec = RewardSpec.from_config({"terms": [{"scorer": loaded, "name": "rm"}]})
    update = spec.for_update(ScoreBatch(prompts=[PROMPT] * 8, media=images), group_ids=[0] * 8)
    torch.testing.assert_close(update.weights, expected / expected.mean(), rtol=1e-4, atol=1e-6)
    assert float(update.weights.std()) > 0  # the head tells samples apart


def test_pairwise_judge_eval_asks_both_orders(qwen_dir):
    from visalign.rm.evaluate import pair_metrics, score_pairs

    scorer = get_scorer("pairwise-qwen2-vl-2b", weights=str(qwen_dir), params={"swap_average": False})
    images = items(6)
    pairs = [IndexPair(i, 4 + i) for i in range(4)]
    scores = score_pairs(scorer, [PROMPT] * 8, images, pairs, batch_size=3)
    with torch.no_grad():
        ab = scorer(ScoreBatch(prompts=[PROMPT] * 4, media=images[:4], references=images[4:])).raw
        ba = scorer(ScoreBatch(prompts=[PROMPT] * 4, media=images[4:], references=images[:4])).raw
    torch.testing.assert_close(scores.p_ab, ab)
    torch.testing.assert_close(scores.p_ba, ba)
    torch.testing.assert_close(scores.gap, torch.logit((ab + 1 - ba) / 2))
    metrics = pair_metrics(scores, torch.zeros(4, dtype=torch.bool))
    assert metrics["swap_bias"] == pytest.approx(float((ab + ba - 1).mean()), abs=1e-6)
    assert metrics["swap_consistency"] == pytest.approx(float(((ab > 0.5) != (ba > 0.5)).float().mean()))
