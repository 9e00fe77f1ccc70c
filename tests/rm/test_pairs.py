"""Pair construction: within-prompt pairs from scores, SoliReward cross-prompt pairs, and the identical-pair
refusal, all checked by hand."""

from __future__ import annotations

import pytest
import torch

from visalign.rm.pairs import IdenticalPairError, IndexPair, check_distinct, cross_prompt_pairs, pairs_from_scores


def test_cross_prompt_pairs_are_every_good_times_bad_across_prompts():
    # Items 0, 2 good (prompts p, q), items 1, 3, 4 bad (prompts p, q, r).
    good = torch.tensor([True, False, True, False, False])
    pairs = cross_prompt_pairs(good)
    assert [(p.a, p.b) for p in pairs] == [(0, 1), (0, 3), (0, 4), (2, 1), (2, 3), (2, 4)]
    assert not any(p.tie for p in pairs)


def test_cross_prompt_subsample_is_seeded_without_replacement_and_ties_are_same_label():
    good = torch.tensor([True, True, True, False, False, False, False])
    full = {(p.a, p.b) for p in cross_prompt_pairs(good)}
    assert len(full) == 12
    first = cross_prompt_pairs(good, max_pairs=5, ties=3, seed=4)
    again = cross_prompt_pairs(good, max_pairs=5, ties=3, seed=4)
    other = cross_prompt_pairs(good, max_pairs=5, ties=3, seed=5)
    assert first == again and first != other
    decided = [(p.a, p.b) for p in first if not p.tie]
    assert len(decided) == 5 == len(set(decided)) and set(decided) <= full
    ties = [p for p in first if p.tie]
    assert len(ties) == 3 and all(bool(good[p.a]) == bool(good[p.b]) and p.a != p.b for p in ties)
    assert len(cross_prompt_pairs(good, max_pairs=100)) == 12  # capped at what exists
    with pytest.raises(ValueError, match="needs good and bad items; got 3 good and 0 bad"):
        cross_prompt_pairs(torch.ones(3, dtype=torch.bool))


def test_pairs_from_scores_orders_by_score_within_prompts_only():
    prompts = ["p", "p", "q", "p", "q"]
    scores = torch.tensor([0.5, 1.0, 0.2, 0.5, 0.2])
    pairs = pairs_from_scores(prompts, scores, tie_eps=0.0)
    assert pairs == [IndexPair(1, 0, margin=0.5), IndexPair(0, 3, tie=True), IndexPair(1, 3, margin=0.5),
                     IndexPair(2, 4, tie=True)]
    assert [(p.a, p.b) for p in pairs_from_scores(prompts, scores, keep_ties=False)] == [(1, 0), (1, 3)]


def test_identical_pairs_are_refused_naming_the_rows():
    chosen = torch.rand(4, 3, 8, 8)
    rejected = torch.rand(4, 3, 8, 8)
    rejected[2] = chosen[2]
    check_distinct(chosen[:2], rejected[:2])
    with pytest.raises(IdenticalPairError, match=r"1 pair\(s\) have identical chosen and rejected sides: rows \[12\]"
                                                 r".*relabel them as ties"):
        check_distinct(chosen, rejected, rows=[10, 11, 12, 13])
