"""The pure loss functions of the text objectives (docs/methods.md#text-core), TRL's formulas on token tensors.

Every function here takes tensors and returns tensors: no model, no tokenizer, so each one is checked by hand
computation in ``tests/text/test_losses.py``. Shapes: ``B`` completions (or pairs), ``C`` completion tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def k3_kl(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Per-token k3 estimate of ``KL(π_θ || π_ref)``: ``exp(ref − logp) − (ref − logp) − 1`` (≥ 0; TRL's
    ``per_token_kl``).

    Args:
        log_probs: float ``[B, C]`` under θ (with gradients); ref_log_probs: float ``[B, C]`` (constants).
    """
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1


def clipped_token_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, epsilon_low: float,
                       epsilon_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """GRPO's per-token surrogate ``−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)``, ``ρ = exp(logp − logp_old)``.

    Args:
        log_probs: float ``[B, C]`` (with gradients); old_log_probs: float ``[B, C]``, the sampling policy's.
        advantages: float ``[B]``, one per completion (every token of a completion shares it).
        epsilon_low, epsilon_high: the clip range (DAPO's asymmetric clip when they differ).

    Returns:
        ``(loss [B, C], low_clipped [B, C], high_clipped [B, C])``: the masks follow TRL — a token is clipped low
        when ``ρ < 1 − ε_low`` and ``A < 0``, high when ``ρ > 1 + ε_high`` and ``A > 0`` (the bound is active).
    """
    ratio = torch.exp(log_probs - old_log_probs)
    adv = advantages[:, None]
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
    return loss, (ratio < 1 - epsilon_low) & (adv < 0), (ratio > 1 + epsilon_high) & (adv > 0)


def _loss_grpo(per_token: Tensor, mask: Tensor, max_length: int, tokens_per_step: float) -> Tensor:
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def _loss_bnpo(per_token: Tensor, mask: Tensor, max_length: int, tokens_per_step: float) -> Tensor:
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _loss_dr_grpo(per_token: Tensor, mask: Tensor, max_length: int, tokens_per_step: float) -> Tensor:
    return (per_token * mask).sum() / (per_token.shape[0] * max_length)


def _loss_dapo(per_token: Tensor, mask: Tensor, max_length: int, tokens_per_step: float) -> Tensor:
    return (per_token * mask).sum() / max(tokens_per_step, 1.0)


# loss_type → how per-token losses [B, C] become one scalar (TRL's GRPOTrainer._compute_loss). Arguments: the
# per-token loss, the completion mask, the constant L_max (text.max_new_tokens) and the active tokens of the whole
# update divided by its micro-steps (DAPO's normaliser: every token of the update weighs the same).
LOSS_TYPES: dict[str, Callable[[Tensor, Tensor, int, float], Tensor]] = {
    "grpo": _loss_grpo,
    "bnpo": _loss_bnpo,
    "dr_grpo": _loss_dr_grpo,
    "dapo": _loss_dapo,
}


def rloo_advantages(rewards: Tensor, group_ids: Tensor, keep: Tensor | None = None) -> Tensor:
    """RLOO's leave-one-out advantages ``A_i = r_i − (Σ_{j≠i} r_j)/(G − 1)`` within each prompt group.

    Only kept samples (``keep``) count, as members and as baselines; a group with one kept sample gets 0 (it has no
    baseline), as do dropped samples.

    Args:
        rewards: float ``[B]``; group_ids: int64 ``[B]``; keep: bool ``[B]`` or None (all kept).

    Returns:
        float32 ``[B]``.
    """
    keep = torch.ones_like(rewards, dtype=torch.bool) if keep is None else keep.bool()
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for group in torch.unique(group_ids):
        members = torch.nonzero((group_ids == group) & keep).flatten()
        g = members.numel()
        if g < 2:
            continue
        r = rewards[members].float()
        out[members] = r - (r.sum() - r) / (g - 1)
    return out


def sequence_log_probs(token_log_probs: Tensor, mask: Tensor) -> Tensor:
    """``Σ_t log π(o_t | ·)`` over a completion's trained tokens: float ``[B]`` from ``[B, C]`` and the mask."""
    return (token_log_probs * mask).sum(1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float,
             *, label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[Tensor, Tensor]:
    """DPO per pair on sequence log-probs: ``h = β·[(logπ_θ(y_w) − logπ_ref(y_w)) − (logπ_θ(y_l) − logπ_ref(y_l))]``.

    ``sigmoid``: ``L = −(1−ε)·log σ(h) − ε·log σ(−h)`` (TRL's conservative DPO; ε = 0 is plain DPO);
    ``robust``: ``L = [−(1−ε)·log σ(h) + ε·log σ(−h)] / (1 − 2ε)`` (unbiased under ε label noise). At θ = ref,
    ``h = 0`` and both give ``log 2``.

    Args:
        policy_chosen, policy_rejected: float ``[P]`` sequence log-probs under θ (with gradients).
        ref_chosen, ref_rejected: float ``[P]`` under the reference (constants).

    Returns:
        ``(loss [P], h [P])``.
    """
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    nll_right, nll_wrong = -torch.nn.functional.logsigmoid(h), -torch.nn.functional.logsigmoid(-h)
    if loss_type == "sigmoid":
        loss = (1 - label_smoothing) * nll_right + label_smoothing * nll_wrong
    elif loss_type == "robust":
        loss = ((1 - label_smoothing) * nll_right - label_smoothing * nll_wrong) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"DPO loss_type {loss_type!r} is not one of ('sigmoid', 'robust').")
    return loss, h


def best_of_n(rewards: Tensor, group_ids: Tensor, keep: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The index of the highest-reward kept sample of each prompt group (ties broken at random by ``generator``,
    seeded by the engine, so a rerun picks the same).

    Args:
        rewards: float ``[B]``; group_ids: int64 ``[B]``; keep: bool ``[B]`` (groups with no kept sample pick none).

    Returns:
        int64 ``[K]`` sample indices, ascending, one per group that has a kept sample.
    """
    picked = []
    for group in torch.unique(group_ids):
        members = torch.nonzero((group_ids == group) & keep.bool()).flatten()
        if members.numel() == 0:
            continue
        r = rewards[members]
        best = torch.nonzero(r == r.max()).flatten()
        choice = best[torch.randint(best.numel(), (1,), generator=generator)] if best.numel() > 1 else best
        picked.append(int(members[choice]))
    return torch.tensor(sorted(picked), dtype=torch.long)


def best_of_n_kl_bound(n: int) -> float:
    """``log N − (N − 1)/N``: the bound on ``KL(π_BoN || π)`` of best-of-N sampling (arXiv 2401.01879)."""
    return math.log(n) - (n - 1) / n


def token_nll(token_log_probs: Tensor, mask: Tensor) -> Tensor:
    """Per-completion mean negative log-likelihood over trained tokens: float ``[B]`` (RPO's and RAFT's SFT term)."""
    return -(token_log_probs * mask).sum(1) / mask.sum(1).clamp(min=1)
