"""The contract every registered scorer keeps (docs/extending.md#tests), parametrised over list_scorers().

Each scorer is built tiny and offline (tests/tiny); a new card is tested the day it is registered.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from visalign.scorers import ScoreBatch, list_scorers

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a cyan circle"]


def make_batch(scorer, n: int = 3, seed: int = 0, grad: bool = False) -> ScoreBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = (PROMPTS * n)[:n]
    media = texts = references = None
    if scorer.modality == "text":
        texts = [f"answer {i}: {'yes ' * (i + 1)}<done>" for i in range(n)]
    elif scorer.modality == "video":
        media = torch.rand(n, 4, 3, 32, 32, generator=g)
    else:
        media = torch.rand(n, 3, 32, 32, generator=g)
    if media is not None and grad:
        media.requires_grad_(True)
    if "reference" in scorer.needs:
        references = torch.rand(n, 3, 32, 32, generator=g)
    metadata = None
    if "question" in scorer.needs:
        metadata = [{"questions": ["Is there a shape?", "Is it red?"]} for _ in range(n)]
    return ScoreBatch(prompts=prompts, media=media, texts=texts, references=references, metadata=metadata)


@pytest.fixture(params=list_scorers())
def scorer(request, build_tiny_scorer):
    return build_tiny_scorer(request.param)


def test_output_is_paired_float32_finite_and_in_range(scorer):
    out = scorer(make_batch(scorer))
    assert out.reward.shape == (3,) and out.raw.shape == (3,)
    assert out.reward.dtype == torch.float32 and out.raw.dtype == torch.float32
    assert torch.isfinite(out.reward).all() and torch.isfinite(out.raw).all()
    lo, hi = scorer.reward_range
    assert (out.reward >= lo - 1e-6).all() and (out.reward <= hi + 1e-6).all(), (out.reward, scorer.reward_range)
    rlo, rhi = scorer.card.raw_range
    assert (out.raw >= rlo - 1e-6).all() and (out.raw <= rhi + 1e-6).all(), (out.raw, scorer.card.raw_range)


def test_deterministic(scorer):
    batch = make_batch(scorer)
    torch.testing.assert_close(scorer(batch).reward, scorer(batch).reward, atol=0, rtol=0)


def test_independent_of_batch_composition(scorer):
    if scorer.kind == "set-level":
        pytest.skip("set-level scorers value a sample by its effect on the batch, so the batch matters by design")
    batch = make_batch(scorer, n=3)
    together = scorer(batch).reward
    alone = torch.cat([scorer(batch.select([i])).reward for i in range(3)])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=0)


def test_gradient_reaches_pixels_iff_differentiable(scorer):
    if scorer.modality == "text":
        pytest.skip("text scorers have no pixels")
    batch = make_batch(scorer, grad=True)
    if scorer.differentiable:
        out = scorer(batch, grad=True)
        out.reward.sum().backward()
        assert batch.media.grad is not None and batch.media.grad.abs().sum() > 0
    else:
        with pytest.raises(ValueError, match="not differentiable"):
            scorer(batch, grad=True)
    # The default keeps no graph, differentiable or not.
    assert not scorer(batch).reward.requires_grad


def test_mismatched_prompt_count_raises(scorer):
    batch = make_batch(scorer)
    with pytest.raises(ValueError, match="prompts"):
        ScoreBatch(prompts=batch.prompts[:2], media=batch.media, texts=batch.texts)


def test_survives_pickle(scorer):
    batch = make_batch(scorer)
    before = scorer(batch).reward
    clone = pickle.loads(pickle.dumps(scorer))
    torch.testing.assert_close(clone(batch).reward, before, atol=1e-6, rtol=0)
