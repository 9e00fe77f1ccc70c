"""The online source: roll out the model being trained, score the samples, and turn rewards into advantages
(docs/methods.md#advantages).

Per iteration: draw ``prompts_per_step`` distinct prompts (each process its own, from one shared stream), sample
``images_per_prompt`` per prompt with per-step log-probabilities, score them with the training
:class:`~visalign.rewards.RewardSpec` (which also drops NaN samples, applies Pareto selection and uncertainty
weights), and hand the objective an :class:`~visalign.objectives.batches.OnlineBatch`. It also owns the metrics that
only a rollout has: reward statistics gathered over processes, diversity, the collapse monitor and the path KL.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from visalign.generators import select_train_steps
from visalign.objectives.batches import OnlineBatch
from visalign.rewards import NoFiniteReward
from visalign.scorers import ScoreBatch
from visalign.train.diagnostics import CollapseMonitor, group_diversity
from visalign.train.distributed import gather_reward_metrics
from visalign.train.faults import ScorerRetry
from visalign.train.sources.base import ExperienceSource, SourceContext, prompt_stream


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. every sample's reward is NaN); the message says what to check."""


class OnlineSource(ExperienceSource):
    """Sample → score → advantages (``source.name: online``, the default of every online objective)."""

    name = "online"
    produces = OnlineBatch
    provides = frozenset({"log_probs", "reward_grad", "reference"})

    def __init__(self, ctx: SourceContext, needs: frozenset[str]) -> None:
        super().__init__(ctx, needs)
        self.prompts = prompt_stream(ctx)
        if ctx.reward is None:
            raise ValueError("The online source scores its samples: reward.terms is empty.")
        self.reward = ctx.reward
        self.collapse = CollapseMonitor()
        self.timings: dict[str, float] = {}
        self.reward_output: Any = None
        self.dropped = 0
        r = ctx.config.reward
        self.retry = ScorerRetry(r.retries, r.retry_backoff_s, r.max_consecutive_skips, passthrough=(NoFiniteReward,))

    def attach(self, adapter: Any) -> None:
        super().attach(adapter)
        window = self.ctx.config.sample.sde_window
        if window is not None:
            if not hasattr(adapter, "configure_sde"):
                raise ValueError(f"sample.sde_window needs a generator with SDE windows (DDIM UNet or flow "
                                 f"families); {type(adapter).__name__} has none.")
            adapter.configure_sde(window=tuple(window))

    # ------------------------------------------------------------ stages

    def sample(self) -> Any:
        """Roll out ``prompts_per_step`` prompts × ``images_per_prompt`` samples (a :class:`Rollout`, no graph)."""
        s = self.ctx.config.sample
        res = self.ctx.config.model.resolution
        dist = self.ctx.dist
        # Every process advances the shared stream by all processes' draws and keeps its own, so the stream's
        # position is the same everywhere (one checkpointed state) and processes get different prompts.
        for rank in range(dist.num_processes):
            drawn = self.prompts.take_with_metadata(s.prompts_per_step)
            if rank == dist.process_index:
                prompts, metadata = drawn
        rollout = self.adapter.rollout(prompts, images_per_prompt=s.images_per_prompt, steps=s.steps,
                                       guidance=s.guidance, eta=s.eta, seed=self.ctx.seed(1),
                                       negative_prompt=s.negative_prompt, height=res, width=res)
        if any(metadata):  # the prompt table's other columns, one dict per sample, for the scorers
            rollout.extras["metadata"] = [m for m in metadata for _ in range(s.images_per_prompt)]
        return rollout

    def score(self, rollout: Any) -> OnlineBatch:
        """Rewards, advantages, Pareto/NaN masks and uncertainty weights of a rollout, as an :class:`OnlineBatch`.

        A scorer that raises is retried (``reward.retries``; docs/architecture.md#faults), its running transform
        statistics restored before each retry.

        Raises:
            TrainingError: when no sample has a finite reward.
            StepSkipped: when scoring still fails after its retries (the loop skips the step).
        """
        batch = ScoreBatch(prompts=rollout.prompts, media=rollout.media, metadata=rollout.extras.get("metadata"))
        saved = self.reward.state_dict()
        try:
            scored = self.retry(lambda: self.reward.for_update(batch, group_ids=rollout.prompts),
                                restore=lambda: self.reward.load_state_dict(saved))
        except NoFiniteReward:
            raise TrainingError(f"Every sample's reward is NaN at iteration {self.ctx.iteration()} (terms "
                                f"{self.reward.names}); a scorer abstains on all of them — check its "
                                "inputs.") from None
        self.reward_output, self.dropped = scored.output, scored.dropped
        return OnlineBatch(rollout=rollout, rewards=scored.rewards, per_scorer=scored.per_scorer,
                           advantages=scored.advantages, group_ids=scored.group_ids, weights=scored.weights,
                           keep=scored.keep)

    def next(self) -> OnlineBatch:
        t0 = time.perf_counter()
        rollout = self.sample()
        t1 = time.perf_counter()
        batch = self.score(rollout)
        self.timings = {"time/sample": t1 - t0, "time/score": time.perf_counter() - t1}
        if self.retry.retried:  # logged only when a scorer failed (the metrics of a clean run are unchanged)
            self.timings["score_retries"] = float(self.retry.retried)
        return batch

    def train_steps(self, batch: OnlineBatch | Any) -> list[int]:
        """Rollout steps to train on: the configured fraction, without deterministic steps, optionally subsampled.

        A step whose log-prob is not finite for some sample has no density (zero noise: DDIM's last step lands on
        ᾱ = 1, CPS's last step, an ODE step outside an SDE window); training on it would turn the weights into NaN.
        """
        rollout = batch.rollout if isinstance(batch, OnlineBatch) else batch
        s = self.ctx.config.sample
        if "log_probs" not in self.needs:  # reward backprop picks its own steps and may sample with η = 0
            return select_train_steps(rollout.num_steps, fraction=s.train_fraction)
        stochastic = set(stochastic_steps(rollout))
        steps = [j for j in select_train_steps(rollout.num_steps, fraction=s.train_fraction) if j in stochastic]
        if not steps:
            raise TrainingError(f"None of the trained steps has a finite log-prob (sample.eta = {s.eta}); rollouts "
                                "need noise (eta > 0) on the trained steps.")
        if s.train_steps_per_update and s.train_steps_per_update < len(steps):
            g = torch.Generator().manual_seed(self.ctx.seed(2))
            pick = torch.randperm(len(steps), generator=g)[: s.train_steps_per_update]
            steps = sorted(steps[i] for i in pick.tolist())
        return steps

    # ------------------------------------------------------------ metrics

    def local_metrics(self, batch: OnlineBatch) -> dict[str, float]:
        adv = batch.advantages[batch.keep]
        return {"nan_dropped": float(self.dropped), **self.timings,
                "advantage_abs_mean": float(adv.abs().mean()) if adv.numel() else 0.0,
                "advantage_std": float(adv.std()) if adv.numel() > 1 else 0.0,
                "diversity": group_diversity(batch.rollout.media.cpu(), batch.group_ids)}

    def global_metrics(self, batch: OnlineBatch, metrics: dict[str, float]) -> dict[str, float]:
        metrics = {**gather_reward_metrics(self.reward_output, self.ctx.dist), **metrics}
        warning = self.collapse.check(metrics.get("reward_std", float("nan")))
        if warning:
            metrics["collapse_warning"] = 1.0
            if self.collapse.warned == 1 and self.ctx.dist.is_main:  # printed once per run; the metric keeps counting
                self.ctx.write(f"warning: {warning}")
        return metrics

    def eval_metrics(self, batch: OnlineBatch) -> dict[str, float]:
        return {"path_kl": self.path_kl(batch.rollout)}

    def grid(self, batch: OnlineBatch) -> tuple[torch.Tensor, int]:
        return batch.rollout.media, self.ctx.config.sample.images_per_prompt

    def path_kl(self, rollout: Any, num_steps: int = 2) -> float:
        """Path KL to the reference (LoRA-off) model, ``E Σ_t ||mu_θ − mu_ref||² / (2σ_t²)`` summed over latent
        elements (docs/methods.md#hacking-diagnostics), estimated on this iteration's own SDE rollout from
        ``num_steps`` evenly spaced stochastic steps, scaled by ``S / num_steps``. NaN without LoRA (no reference
        to switch to) or for a deterministic sampler."""
        if self.adapter.lora is None or rollout.eta <= 0:
            return float("nan")
        total_steps = rollout.num_steps
        stochastic = stochastic_steps(rollout)  # a zero-noise step has std 0: its KL term would be inf/NaN
        if not stochastic:
            return float("nan")
        picks = sorted({stochastic[round(i * (len(stochastic) - 1) / max(num_steps - 1, 1))]
                        for i in range(num_steps)})
        per_step = []
        with torch.no_grad():
            for j in picks:
                ours = self.adapter.recompute_step(rollout, j)
                with self.adapter.lora_disabled():
                    ref = self.adapter.recompute_step(rollout, j)
                kl = ((ours.mean.float() - ref.mean.float()) ** 2 / (2 * ours.std.float() ** 2)).flatten(1).sum(1)
                per_step.append(kl.mean())
        return float(torch.stack(per_step).mean() * total_steps)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts.state_dict(), "collapse": self.collapse.state_dict(),
                "retry": self.retry.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.collapse.load_state_dict(state.get("collapse", {}))
        self.retry.load_state_dict(state.get("retry", {}))


def stochastic_steps(rollout: Any) -> list[int]:
    """Indices of the rollout's steps whose log-prob is finite for every sample, i.e. that have a density (not
    DDIM's last step onto ᾱ = 1, CPS's last step, or an ODE step outside an SDE window)."""
    finite = torch.isfinite(rollout.log_probs).all(dim=0)
    return [j for j in range(rollout.num_steps) if bool(finite[j])]
