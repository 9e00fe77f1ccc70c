"""DDPO / Flow-GRPO: group-normalised advantages, PPO clip on per-step importance ratios, optional KL.

docs/methods.md#grpo. Every denoising step is an action sharing the trajectory's terminal reward. For each trained
step j and sample i: ``ρ = exp(logp_θ − logp_old)``, ``L_j = mean_i max(−A_i·ρ, −A_i·clip(ρ, 1−ε, 1+ε))``,
backward per step so gradients accumulate over steps and micro-batches (memory stays one step's worth).
The KL to the reference (the LoRA-disabled base model) is the closed form for two Gaussians of equal variance,
``||mu_θ − mu_ref||² / (2·std²)``, averaged over latent elements as flow_grpo does (a per-step rescale that β
absorbs). Log-probs use the mean-over-elements convention that the published clip ranges assume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from visalign.generators.rollout import Rollout, StepOutput
from visalign.objectives.base import MetricMeans, Objective, OnlineBatch, UpdateContext, micro_batches


@dataclass
class GrpoParams:
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip ε on the per-step ratio (ddpo/flow_grpo: "
                                                               "1e-4 with mean-reduced log-probs)."})
    beta: float = field(default=0.0, metadata={"help": "KL-to-reference coefficient (flow_grpo 0.01–0.04; 0 = off)."})
    inner_epochs: int = field(default=1, metadata={"help": "Passes over each rollout (each pass = optimizer "
                                                           "steps over its micro-batches)."})
    micro_batch: int = field(default=0, metadata={"help": "Samples per optimizer step; 0 = the whole batch."})
    skip_zero_advantage: bool = field(default=True, metadata={
        "help": "Leave samples with A = 0 (zero-variance groups) out of the forward passes; they carry no gradient."})
    anchor: str | None = field(default=None, metadata={
        "help": "Id of a differentiable scorer (e.g. shapes-colour) whose value on the decoded one-step x0 estimate "
                "of every trained step may not fall below the base model's (LoRA off) on the same step: a one-sided "
                "anchor with an exact gradient; null = off."})
    anchor_weight: float = field(default=1.0, metadata={
        "help": "Multiplies the anchor's hinge loss mean(relu(score_base − score_policy))."})

    def __post_init__(self) -> None:
        if self.clip_range <= 0 or self.beta < 0 or self.inner_epochs < 1 or self.micro_batch < 0:
            raise ValueError("grpo needs clip_range > 0, beta >= 0, inner_epochs >= 1, micro_batch >= 0.")
        if self.anchor_weight < 0:
            raise ValueError(f"grpo anchor_weight ({self.anchor_weight}) must be >= 0.")


def ppo_clip_loss(advantages: Tensor, log_ratio: Tensor, clip_range: float, weights: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample PPO-clip surrogate ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))``.

    Args:
        advantages: float ``[B]``.
        log_ratio: float ``[B]``, ``logp_θ − logp_old`` of one step.
        clip_range: ε.
        weights: optional float ``[B]`` per-sample loss weights.

    Returns:
        ``(loss, clipped_gt, clipped_lt)``: the weighted mean loss (scalar), and bool ``[B]`` masks of samples whose
        ratio was clipped above 1+ε and below 1−ε.
    """
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean(), ratio > 1.0 + clip_range, ratio < 1.0 - clip_range


class GrpoObjective(Objective):
    """DDPO / Flow-GRPO policy-gradient objective (``objective.name: grpo``)."""

    name = "grpo"
    Params = GrpoParams
    uniform_passes = True  # every micro-step is len(train_steps) recomputed steps, padding ones included

    def scorer_specs(self) -> dict[str, str]:
        # The anchor is a scorer the engine builds (and checks for gradients) like the reward's own terms.
        return {"anchor": self.params.anchor} if self.params.anchor is not None else {}

    def update(self, batch: OnlineBatch, ctx: UpdateContext) -> dict[str, float]:
        p: GrpoParams = self.params
        weights = batch.effective_weights
        active = torch.nonzero(weights > 0).flatten()
        if p.skip_zero_advantage:
            active = active[batch.advantages[active] != 0]
        metrics = MetricMeans()
        chunks: list[list[int]] = []
        if active.numel():
            size = p.micro_batch or int(active.numel())
            for _ in range(p.inner_epochs):
                order = active[torch.randperm(active.numel(), generator=ctx.generator)]
                chunks.extend(micro_batches(order.tolist(), size))
        steps = list(ctx.train_steps)
        for chunk in ctx.equal_micro_batches(chunks):
            if chunk is None:  # FSDP: another process has more micro-batches; the same passes, zero weight
                self._micro_step(batch, ctx, [self._padding_sample(batch)], steps, None)
            else:
                self._micro_step(batch, ctx, chunk, steps, metrics)
            metrics.add(grad_norm=ctx.optimizer_step())
        if active.numel() == 0:
            return {"active_fraction": 0.0}
        out = metrics.means()
        out["active_fraction"] = float(active.numel()) / len(batch)
        return out

    @staticmethod
    def _padding_sample(batch: OnlineBatch) -> int:
        # A kept sample: its reward is finite (a NaN-dropped one's latents are fine too, but keep the pass tame).
        kept = torch.nonzero(batch.keep).flatten()
        return int(kept[0]) if kept.numel() else 0

    def _micro_step(self, batch: OnlineBatch, ctx: UpdateContext, chunk: list[int], steps: list[int],
                    metrics: MetricMeans | None) -> None:
        """Backward through the loss of ``chunk`` at each trained step; ``metrics`` None: a padding pass whose
        loss is multiplied by 0 (its gradient is exactly zero, its forward and backward calls are a real one's)."""
        p: GrpoParams = self.params
        sub = batch.rollout.select(chunk)
        adv = batch.advantages[chunk].to(sub.latents.device)
        w = batch.weights[chunk].to(adv.device)
        for j in steps:
            out = ctx.adapter.recompute_step(sub, j)
            log_ratio = out.log_prob_mean - sub.log_probs[:, j].to(out.log_prob_mean.device)
            policy_loss, gt, lt = ppo_clip_loss(adv, log_ratio, p.clip_range, w)
            loss = policy_loss
            kl = torch.zeros(())
            ref = None
            if p.beta > 0 or p.anchor is not None:  # the LoRA-off step, shared by the KL and the anchor
                with torch.no_grad(), ctx.adapter.lora_disabled():
                    ref = ctx.adapter.recompute_step(sub, j)
            if p.beta > 0:
                kl = (((out.mean - ref.mean.detach()) ** 2) / (2 * out.std**2)).flatten(1).mean(1).mean()
                loss = loss + p.beta * kl
            if p.anchor is not None:
                hinge = self._anchor_hinge(ctx, sub, out, ref)
                loss = loss + p.anchor_weight * hinge
                if metrics is not None:
                    metrics.add(anchor_hinge=hinge)
            if metrics is None:
                (loss * 0.0).backward()
                continue
            (loss / len(steps)).backward()
            metrics.add(policy_loss=policy_loss, kl=kl, clipfrac=(gt | lt).float().mean(),
                        clipfrac_gt_one=gt.float().mean(), clipfrac_lt_one=lt.float().mean(),
                        approx_kl=0.5 * (log_ratio.detach() ** 2).mean(), ratio=log_ratio.detach().exp().mean())

    def _anchor_hinge(self, ctx: UpdateContext, sub: Rollout, out: StepOutput, ref: StepOutput) -> Tensor:
        """mean_i relu(s(decode(x0_ref,i)) − s(decode(x0_θ,i))) of the anchor scorer s at one trained step, given
        the policy's step ``out`` and the LoRA-off step ``ref``.

        Why on the one-step x0 estimate: the policy gradient sees an attribute only through the terminal reward of
        a noisy rollout, so its noise walks the weights along directions the reward barely prices (the shapes
        demo's hue drift); the anchor's gradient is exact and only acts once the policy is worse than the base.
        """
        from visalign.scorers import ScoreBatch

        if out.x0 is None or ref.x0 is None:
            raise ValueError(f"grpo anchor: {type(ctx.adapter).__name__} does not report the one-step x0 estimate.")
        scorer = ctx.scorers.get("anchor")
        if scorer is None:
            raise RuntimeError("grpo anchor: ctx.scorers has no 'anchor' (the engine builds it from scorer_specs()).")
        prompts = list(sub.prompts)
        media = ctx.adapter.decode(out.x0.to(sub.latents.dtype), grad=True)
        mine = scorer(ScoreBatch(prompts=prompts, media=media), grad=True).reward
        base = scorer(ScoreBatch(prompts=prompts, media=ctx.adapter.decode(
            ref.x0.detach().to(sub.latents.dtype)))).reward
        return torch.relu(base.to(mine.device) - mine).mean()
