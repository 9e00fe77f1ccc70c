"""TRL-style reward functions the text tests name by import path (``tests.text.rewards:...``)."""

from __future__ import annotations


def count_a(prompts, completions, **columns):
    """Fraction of the completion's characters that are ``a`` (0 for an empty completion)."""
    return [c.count("a") / len(c) if c else 0.0 for c in completions]


def short(prompts, completions, **columns):
    """1 for a completion of at most 2 characters, else 0."""
    return [float(len(c) <= 2) for c in completions]


def bonus_column(prompts, completions, bonus=None, **columns):
    """The prompt table's ``bonus`` column, as TRL hands dataset columns to reward functions."""
    return [float(b) for b in bonus]
