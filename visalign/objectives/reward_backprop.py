"""Direct reward backprop: DRaFT-K / full DRaFT, AlignProp and ReFL (docs/methods.md#reward-backprop).

The reward's gradient flows from the scorer through the VAE decoder and the last denoising steps into the
trainable weights (LoRA or full). The loop's rollout provides the no-grad prefix: the tail from step ``b`` on is
re-run with a graph, starting from the rollout's own ``x_b``. Each re-run step reuses the rollout's noise,

    x_{t'} = μ_θ(x_t) + (x_{t'}^{rollout} − sg(μ_θ(x_t)))        (the reparameterisation x_{t'} = μ_θ + σ·ε),

so its value is exactly the rollout's (the re-run decodes to the rollout's media, tested) while the gradient goes
through the mean. With several micro-batches per iteration (``micro_batch``) each takes its own optimizer step, so
the later ones differentiate at the updated weights around the rollout's (now slightly stale) trajectory. With
η = 0 (the usual choice: AlignProp samples with DDIM η = 0) the correction term is zero on policy.
Which steps carry the gradient (``backprop``):

- ``last-k`` (DRaFT-K): the last ``k`` steps; ``k = 1`` is the paper's best, ``k = 0`` means every step (full
  DRaFT, memory O(S) step inputs with activation checkpointing).
- ``gaussian`` (AlignProp): ``b ~ N(truncation_mean·S, truncation_std·S)`` rounded, redrawn until ``1 ≤ b < S``
  (AlignProp's N(42, 5) on 50 steps is ``0.84, 0.1``); ``uniform``: ``b ~ U{0..S−1}``.
- ``refl`` (ReFL): one step ``m ~ U{⌊refl_range[0]·S⌋ .. ⌈refl_range[1]·S⌉ − 1}`` (30..39 of 40) runs with a graph and
  its one-step estimate ``x̂0`` is decoded instead of finishing the chain.

Loss per micro-batch: ``−grad_scale · mean_b(w_b · r_b)``, or ``grad_scale · mean_b(w_b · relu(reward_cap − r_b))``
with a cap (ReFL: ``relu(2 − r)``, ``grad_scale = 1e-3``), where ``w`` are the uncertainty weights (Ctrl-U
``exp(−U)``, mean 1) when ``reward.uncertainty_weights`` is on, else ones. ``r`` is the training reward's
aggregated total with its transforms, computed with ``grad=True``; zero-weight monitor terms (the demo's oracle)
stay out of the graph. DRaFT-LV is not implemented: its re-noising details are unverified
(docs/methods.md#reward-backprop).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from visalign.generators.base import GeneratorAdapter, Rollout
from visalign.objectives.base import MetricMeans, Objective, OnlineBatch, UpdateContext, micro_batches


@dataclass
class RewardBackpropParams:
    backprop: str = field(default="last-k", metadata={
        "help": "Which steps carry the gradient: last-k (DRaFT-K), gaussian or uniform (AlignProp's random "
                "truncation), refl (one step, decode its x0 estimate)."})
    k: int = field(default=1, metadata={"help": "last-k: steps with gradient at the end of the chain; 0 = all."})
    truncation_mean: float = field(default=0.84, metadata={
        "help": "gaussian: mean of the first step with gradient, as a fraction of the steps (42 of 50)."})
    truncation_std: float = field(default=0.1, metadata={"help": "gaussian: its std, as a fraction (5 of 50)."})
    refl_range: list[float] = field(default_factory=lambda: [0.75, 1.0], metadata={
        "help": "refl: [lo, hi) fractions of the steps the gradient step is drawn from (30..39 of 40)."})
    grad_scale: float = field(default=1.0, metadata={"help": "Multiplies the loss (ReFL uses 1e-3)."})
    reward_cap: float | None = field(default=None, metadata={
        "help": "With a cap the loss is relu(cap − r): no gradient once a sample's reward reaches it (ReFL: 2)."})
    micro_batch: int = field(default=0, metadata={"help": "Samples per optimizer step; 0 = the whole batch."})
    checkpoint_steps: bool = field(default=True, metadata={
        "help": "Recompute each re-run step's activations in backward (memory O(steps with gradient) inputs)."})

    def __post_init__(self) -> None:
        if self.backprop not in BACKPROP_STARTS:
            raise ValueError(f"objective.params.backprop must be one of {sorted(BACKPROP_STARTS)}; got "
                             f"{self.backprop!r}.")
        if self.k < 0 or self.micro_batch < 0 or self.grad_scale <= 0 or self.truncation_std < 0:
            raise ValueError("reward backprop needs k >= 0, micro_batch >= 0, grad_scale > 0, truncation_std >= 0.")
        lo, hi = (float(v) for v in self.refl_range)
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"objective.params.refl_range must be [lo, hi) with 0 <= lo < hi <= 1; got "
                             f"{self.refl_range}.")


def _last_k(num_steps: int, p: RewardBackpropParams, g: torch.Generator) -> int:
    return max(num_steps - p.k, 0) if p.k else 0


def _gaussian(num_steps: int, p: RewardBackpropParams, g: torch.Generator) -> int:
    if num_steps < 2:
        return 0
    for _ in range(100):  # AlignProp redraws until 1 ≤ b < T
        draw = float(torch.randn((), generator=g)) * p.truncation_std + p.truncation_mean
        b = round(draw * num_steps)
        if 1 <= b < num_steps:
            return b
    return min(max(round(p.truncation_mean * num_steps), 1), num_steps - 1)


def _uniform(num_steps: int, p: RewardBackpropParams, g: torch.Generator) -> int:
    return int(torch.randint(num_steps, (), generator=g))


def refl_step(num_steps: int, p: RewardBackpropParams, g: torch.Generator) -> int:
    """ReFL's gradient step ``m``, uniform over ``[⌊lo·S⌋, ⌈hi·S⌉)`` (at least one step)."""
    lo = min(math.floor(p.refl_range[0] * num_steps), num_steps - 1)
    hi = max(math.ceil(p.refl_range[1] * num_steps), lo + 1)
    return int(torch.randint(lo, min(hi, num_steps), (), generator=g))


# backprop mode → the step b in [0, S) where the gradient starts: steps b..S−1 are re-run with a graph (ReFL: only
# step b runs with a graph, and its x0 estimate is decoded).
BACKPROP_STARTS: dict[str, Callable[[int, RewardBackpropParams, torch.Generator], int]] = {
    "last-k": _last_k,
    "gaussian": _gaussian,
    "uniform": _uniform,
    "refl": refl_step,
}


def differentiable_tail(adapter: GeneratorAdapter, rollout: Rollout, start: int, *,
                        use_checkpoint: bool = True) -> Tensor:
    """Re-run steps ``start..S−1`` of ``rollout`` with a graph from its own ``x_start``; return the final latents.

    Each step's output equals the rollout's stored latents in value; the gradient flows through the step mean
    (module docstring). ``start = S`` returns the stored final latents (no gradient).

    Returns:
        ``[B, ...]`` final latents (float32 where the step math is), differentiable w.r.t. the trainable weights.
    """
    plan = rollout.plan
    x = rollout.latents[:, start]
    for i in range(start, rollout.num_steps):
        target = rollout.latents[:, i + 1]

        def step_mean(latents: Tensor, i: int = i, target: Tensor = target) -> Tensor:
            return adapter.transition(plan, latents, i, prev_sample=target).mean

        with torch.enable_grad():
            mean = (checkpoint(step_mean, x, use_reentrant=False) if use_checkpoint else step_mean(x))
            x = mean + (target.to(mean.dtype) - mean.detach())
    return x


def refl_x0(adapter: GeneratorAdapter, rollout: Rollout, step: int) -> Tensor:
    """One step with a graph at ``step`` from the rollout's ``x_step``; its one-step clean estimate ``x̂0``."""
    with torch.enable_grad():
        out = adapter.transition(rollout.plan, rollout.latents[:, step], step,
                                 prev_sample=rollout.latents[:, step + 1])
    if out.x0 is None:
        raise ValueError(f"{type(adapter).__name__} does not report the one-step x0 estimate ReFL decodes; use "
                         "backprop: last-k or gaussian.")
    return out.x0


class RewardBackpropObjective(Objective):
    """Backpropagate a differentiable reward through the sampler's last steps (``objective.name: draft``,
    ``alignprop``, ``refl``; ``reward-backprop`` = ``draft``)."""

    name = "reward-backprop"
    Params = RewardBackpropParams
    needs = frozenset({"reward_grad"})  # no log-probs: it may sample with η = 0

    def update(self, batch: OnlineBatch, ctx: UpdateContext) -> dict[str, float]:
        p: RewardBackpropParams = self.params
        if ctx.reward is None:
            raise RuntimeError("reward backprop needs ctx.reward, the differentiable training reward (the Trainer "
                               "sets it for objectives that need reward_grad).")
        active = torch.nonzero(batch.effective_weights > 0).flatten()
        metrics = MetricMeans()
        if active.numel() == 0:
            return {"loss": 0.0, "active_fraction": 0.0}
        steps = batch.rollout.num_steps
        size = p.micro_batch or int(active.numel())
        for chunk in micro_batches(active.tolist(), size):
            start = BACKPROP_STARTS[p.backprop](steps, p, ctx.generator)
            loss, reward = self._micro_step(batch, ctx, chunk, start)
            metrics.add(loss=loss, reward_grad_mean=reward, grad_norm=ctx.optimizer_step(),
                        grad_steps=1 if p.backprop == "refl" else steps - start, first_grad_step=start)
        out = metrics.means()
        out["active_fraction"] = float(active.numel()) / len(batch)
        return out

    def _micro_step(self, batch: OnlineBatch, ctx: UpdateContext, chunk: list[int], start: int
                    ) -> tuple[Tensor, Tensor]:
        """Backward of one micro-batch's loss; returns the (detached) loss and mean differentiable reward."""
        p: RewardBackpropParams = self.params
        sub = batch.rollout.select(chunk)
        if p.backprop == "refl":
            final = refl_x0(ctx.adapter, sub, start)
        else:
            final = differentiable_tail(ctx.adapter, sub, start, use_checkpoint=p.checkpoint_steps)
        media = ctx.adapter.decode(final.to(sub.latents.dtype), grad=True)
        reward = ctx.reward(media, sub.prompts, sub.extras.get("metadata")).float()
        w = batch.weights[chunk].to(reward.device)
        per_sample = -reward if p.reward_cap is None else torch.relu(p.reward_cap - reward)
        loss = p.grad_scale * (w * per_sample).mean()
        loss.backward()
        return loss.detach(), reward.detach().mean()


@dataclass
class AlignPropParams(RewardBackpropParams):
    backprop: str = field(default="gaussian", metadata=RewardBackpropParams.__dataclass_fields__["backprop"].metadata)


@dataclass
class ReflParams(RewardBackpropParams):
    backprop: str = field(default="refl", metadata=RewardBackpropParams.__dataclass_fields__["backprop"].metadata)
    grad_scale: float = field(default=1e-3, metadata={"help": "Multiplies the loss (ReFL's 1e-3)."})
    reward_cap: float | None = field(default=2.0, metadata={
        "help": "Loss relu(cap − r): no gradient once a sample's reward reaches the cap (ReFL: 2)."})


class DraftObjective(RewardBackpropObjective):
    """DRaFT-K (``k = 0``: full DRaFT)."""

    name = "draft"


class AlignPropObjective(RewardBackpropObjective):
    """AlignProp: a randomly truncated tail carries the gradient."""

    name = "alignprop"
    Params = AlignPropParams


class ReflObjective(RewardBackpropObjective):
    """ReFL: one late step, its x0 estimate decoded and scored."""

    name = "refl"
    Params = ReflParams
