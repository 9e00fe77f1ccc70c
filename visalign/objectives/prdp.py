"""PRDP: proximal reward difference prediction (docs/methods.md#prdp; arXiv 2402.08714, no public code).

DPO's trick applied to the trajectory-level KL-regularised RL objective: at the optimum,
``r(x0, c) = β·log(p*(τ)/p_anchor(τ)) + β·log Z(c)``, and ``Z(c)`` cancels between two trajectories of the same prompt.
So the model is trained by regression — its implicit reward ``s_θ(τ) = Σ_t [logp_sum_θ − logp_sum_anchor]`` over the
trained steps must predict the scaled reward difference of every same-prompt pair:

    Δr = (r_a − r_b) / β ,   L_RDP = mean_pairs (Δr − (s_a − s_b))²

Proximal variant (PPO-style pessimism against the rollout snapshot θ_old), with ``d_t = logp_θ − logp_anchor`` and
``d̃_t = (logp_old − logp_anchor) + clip(logp_θ − logp_old, −ε, ε)``:

    L = mean_pairs max((Δr − Σ_t(d_t^a − d_t^b))², (Δr − Σ_t(d̃_t^a − d̃_t^b))²)

``s`` uses TRUE log-densities (``reduction="sum"``); with the mean-reduced convention β would be off by a factor D.
The anchor is ``old`` (the rollout snapshot: ``s = 0`` at the start of every round, no extra forward — the rollout's
``log_probs_sum``) or ``reference`` (the LoRA-disabled base model, the KL-regularised reading). K gradient steps are
taken per rollout; a new rollout every iteration is the resampling (θ_old ← θ). Exact loss scaling, clipping rule and
anchor choice are [unverified] against the paper (docs/methods.md#prdp Confidence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from visalign.objectives.base import MetricMeans, Objective, OnlineBatch, UpdateContext
from visalign.objectives.common import (
    backward_through_steps,
    group_micro_batches,
    step_log_densities,
    within_group_pairs,
)

ANCHORS = ("old", "reference")


@dataclass
class PrdpParams:
    beta: float = field(default=10.0, metadata={"help": "KL strength β: reward differences are divided by β before "
                                                         "they are regressed on (PRDP paper: 10, [unverified])."})
    anchor: str = field(default="old", metadata={"help": "'old': log-ratios against the rollout snapshot (s = 0 at "
                                                         "each round start); 'reference': against the LoRA-disabled "
                                                         "base model (needs LoRA)."})
    clip_range: float = field(default=1.0, metadata={"help": "Proximal ε on each step's logp_sum_θ − logp_sum_old "
                                                             "(true log-density units, nats); 0 = plain L_RDP."})
    inner_steps: int = field(default=1, metadata={"help": "K: gradient passes over each rollout before the next "
                                                          "rollout resamples (θ_old ← θ)."})
    groups_per_step: int = field(default=0, metadata={"help": "Prompt groups per optimizer step (pairs stay in one "
                                                              "step); 0 = every group in one step."})

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"prdp beta must be > 0; got {self.beta}.")
        if self.anchor not in ANCHORS:
            raise ValueError(f"prdp anchor must be one of {ANCHORS}; got {self.anchor!r}.")
        if self.clip_range < 0 or self.inner_steps < 1 or self.groups_per_step < 0:
            raise ValueError("prdp needs clip_range >= 0, inner_steps >= 1 and groups_per_step >= 0.")


@dataclass
class RdpTerms:
    """The pairwise regression of one micro-batch.

    Attributes:
        loss: scalar, the weighted mean over pairs.
        target: float32 ``[P]``, ``Δr = (r_a − r_b)/β``.
        predicted: float32 ``[P]``, ``s_a − s_b`` (unclipped).
        clipped: bool ``[P]``, pairs where the proximal branch was the larger (pessimistic) one.
    """

    loss: Tensor
    target: Tensor
    predicted: Tensor
    clipped: Tensor


def rdp_loss(s: Tensor, rewards: Tensor, group_ids: Tensor, beta: float, *, s_proximal: Tensor | None = None,
             weights: Tensor | None = None) -> RdpTerms:
    """PRDP's reward-difference regression over all same-prompt pairs.

    Args:
        s: float ``[B]``, implicit rewards ``Σ_t (logp_sum_θ − logp_sum_anchor)`` (may carry gradients).
        rewards: float ``[B]``, the samples' rewards.
        group_ids: int64 ``[B]``, prompt group of each sample; pairs never cross groups.
        beta: β > 0; the target is ``(r_a − r_b)/β``.
        s_proximal: optional float ``[B]``, ``Σ_t d̃_t`` (the clipped implicit rewards): the loss per pair becomes the
            max of the two squared errors.
        weights: optional float ``[B]`` per-sample weights (``batch.effective_weights``); a pair weighs ``w_a·w_b``
            and pairs with a zero-weight sample are dropped.

    Returns:
        :class:`RdpTerms`; ``loss`` is 0 (with a graph) when there is no pair.
    """
    a, b = within_group_pairs(group_ids, weights)
    target = (rewards[a] - rewards[b]).to(s) / beta
    predicted = s[a] - s[b]
    per_pair = (target - predicted) ** 2
    clipped = torch.zeros_like(per_pair, dtype=torch.bool)
    if s_proximal is not None:
        proximal = (target - (s_proximal[a] - s_proximal[b])) ** 2
        clipped = proximal > per_pair
        per_pair = torch.maximum(per_pair, proximal)
    if weights is not None:
        per_pair = per_pair * (weights[a] * weights[b]).to(per_pair)
    loss = per_pair.mean() if per_pair.numel() else s.sum() * 0.0
    return RdpTerms(loss, target.detach(), predicted.detach(), clipped)


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two ``[P]`` tensors; NaN when either is constant or P < 2."""
    if x.numel() < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denom = xc.norm() * yc.norm()
    return float((xc * yc).sum() / denom) if denom > 0 else float("nan")


class PrdpObjective(Objective):
    """Proximal reward difference prediction (``objective.name: prdp``)."""

    name = "prdp"
    Params = PrdpParams

    def update(self, batch: OnlineBatch, ctx: UpdateContext) -> dict[str, float]:
        p: PrdpParams = self.params
        weights = batch.effective_weights
        active = torch.nonzero(weights > 0).flatten()
        first_of_pairs, _ = within_group_pairs(batch.group_ids, weights)
        if first_of_pairs.numel() == 0:
            return {"pairs": 0.0}
        steps = list(ctx.train_steps)
        rollout = batch.rollout
        old = rollout.log_probs_sum[:, steps].float()
        anchor = old if p.anchor == "old" else self._reference(ctx, batch, active, steps)
        metrics = MetricMeans()
        for k in range(p.inner_steps):
            for chunk in group_micro_batches(batch.group_ids, active, p.groups_per_step, ctx.generator):
                self._micro_step(batch, ctx, chunk, steps, old[chunk], anchor[chunk], first=k == 0, metrics=metrics)
                metrics.add(grad_norm=ctx.optimizer_step())
        return metrics.means()

    def _reference(self, ctx: UpdateContext, batch: OnlineBatch, active: Tensor, steps: list[int]) -> Tensor:
        """``logp_sum`` of every trained step under the LoRA-disabled model, ``[B, S_train]`` (0 for inactive)."""
        if ctx.adapter.lora is None:
            raise ValueError("prdp anchor='reference' needs a LoRA generator (the reference is the model with "
                             "adapters disabled); set model.lora_rank > 0 or use objective.params.anchor=old.")
        values = torch.zeros(len(batch), len(steps))
        sub = batch.rollout.select(active.tolist())
        with ctx.adapter.lora_disabled():
            values[active] = step_log_densities(ctx.adapter, sub, steps).cpu()
        return values

    def _micro_step(self, batch: OnlineBatch, ctx: UpdateContext, chunk: list[int], steps: list[int], old: Tensor,
                    anchor: Tensor, *, first: bool, metrics: MetricMeans) -> None:
        p: PrdpParams = self.params
        sub = batch.rollout.select(chunk)
        # Pass 1: the per-step log-densities under θ. On the first pass over a fresh rollout θ = θ_old, so they are
        # the rollout's own (the generators' tested ratio-1 invariant) and the forward can be skipped.
        current = old.clone() if first else step_log_densities(ctx.adapter, sub, steps).cpu()
        current.requires_grad_(True)
        s = (current - anchor).sum(dim=1)
        s_proximal = None
        if p.clip_range > 0:
            delta = (current - old).clamp(-p.clip_range, p.clip_range)
            s_proximal = ((old - anchor) + delta).sum(dim=1)
        terms = rdp_loss(s, batch.rewards[chunk], batch.group_ids[chunk], p.beta, s_proximal=s_proximal,
                         weights=batch.effective_weights[chunk])
        terms.loss.backward()
        # Pass 2: push ∂L/∂logp_sum through each step's graph, one step at a time.
        backward_through_steps(ctx.adapter, sub, steps, current.grad)
        metrics.add(loss=terms.loss, pairs=float(terms.target.numel()), implicit_reward_abs=s.detach().abs().mean(),
                    proximal_clipfrac=terms.clipped.float().mean() if terms.clipped.numel() else 0.0)
        corr = pearson(terms.predicted, terms.target)
        if corr == corr:  # NaN at round start (s = 0 is constant): leave it out of the mean rather than poison it
            metrics.add(reward_diff_corr=corr)
