"""The text-online source: sample G completions per prompt from the policy, score them, make advantages.

The text counterpart of :class:`visalign.train.sources.online.OnlineSource` (``source.name: text-online``, the
default of ``text-grpo``, ``text-rloo`` and ``text-best-of-n``). Per iteration: draw ``sample.prompts_per_step``
distinct prompts, sample ``sample.images_per_prompt`` (the group size G) completions of each with
:meth:`~visalign.text.policy.CausalLMPolicy.generate`, score them with the run's
:class:`~visalign.rewards.RewardSpec` (the same registry, transforms, aggregations — GDPO, PAR, Pareto — as the
visual side) and hand the objective a :class:`~visalign.text.batches.TextOnlineBatch`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from visalign.rewards import NoFiniteReward
from visalign.scorers import ScoreBatch
from visalign.text.batches import TextOnlineBatch
from visalign.text.rollout import TextRollout
from visalign.train.diagnostics import CollapseMonitor
from visalign.train.distributed import gather_reward_metrics
from visalign.train.sources.base import ExperienceSource, SourceContext, prompt_stream
from visalign.train.sources.online import TrainingError


def load_policy(model: Any, device: str) -> Any:
    """The causal-LM policy of a run's ``ModelConfig`` (``model.model``: a transformers folder or hub id)."""
    from visalign.text.policy import CausalLMPolicy

    return CausalLMPolicy.from_pretrained(model.model, dtype=model.dtype, device=device)


class TextOnlineSource(ExperienceSource):
    """Sample → score → advantages for a causal-LM policy."""

    name = "text-online"
    produces = TextOnlineBatch
    provides = frozenset({"log_probs", "reference"})
    modality = "text"
    load_model = staticmethod(load_policy)

    def __init__(self, ctx: SourceContext, needs: frozenset[str]) -> None:
        super().__init__(ctx, needs)
        self.prompts = prompt_stream(ctx)
        if ctx.reward is None:
            raise ValueError("The text-online source scores its completions: reward.terms is empty.")
        self.reward = ctx.reward
        self.collapse = CollapseMonitor()
        self.timings: dict[str, float] = {}
        self.reward_output: Any = None
        self.dropped = 0

    def attach(self, adapter: Any) -> None:
        if getattr(adapter, "modality", None) != "text":
            raise ValueError(f"source {self.name!r} samples text, but model.model loaded a {type(adapter).__name__}; "
                             "point model.model at a transformers causal-LM folder.")
        adapter.format_prompts(self.prompts.prompts[:1], self.ctx.config.text)  # a missing chat template fails now
        super().attach(adapter)

    def sample(self) -> TextRollout:
        """``prompts_per_step`` prompts × G completions, as a :class:`TextRollout` (no graph)."""
        s = self.ctx.config.sample
        dist = self.ctx.dist
        # As the online source: every process advances the shared stream by all processes' draws and keeps its own.
        for rank in range(dist.num_processes):
            drawn = self.prompts.take_with_metadata(s.prompts_per_step)
            if rank == dist.process_index:
                prompts, metadata = drawn
        rollout = self.adapter.generate(prompts, self.ctx.config.text, completions_per_prompt=s.images_per_prompt,
                                        seed=self.ctx.seed(1))
        if any(metadata):  # the prompt table's other columns, one dict per completion, for the scorers
            rollout.extras["metadata"] = [m for m in metadata for _ in range(s.images_per_prompt)]
        return rollout

    def score(self, rollout: TextRollout) -> TextOnlineBatch:
        """Rewards, advantages and masks of a rollout.

        Raises:
            TrainingError: when no completion has a finite reward.
        """
        batch = ScoreBatch(prompts=rollout.prompts, texts=rollout.texts, metadata=rollout.extras.get("metadata"))
        try:
            scored = self.reward.for_update(batch, group_ids=rollout.prompts)
        except NoFiniteReward:
            raise TrainingError(f"Every completion's reward is NaN at iteration {self.ctx.iteration()} (terms "
                                f"{self.reward.names}); the reward abstains on all of them — check that it fits these "
                                "prompts.") from None
        self.reward_output, self.dropped = scored.output, scored.dropped
        return TextOnlineBatch(rollout=rollout, rewards=scored.rewards, per_scorer=scored.per_scorer,
                               advantages=scored.advantages, group_ids=scored.group_ids, weights=scored.weights,
                               keep=scored.keep)

    def next(self) -> TextOnlineBatch:
        t0 = time.perf_counter()
        rollout = self.sample()
        t1 = time.perf_counter()
        batch = self.score(rollout)
        self.timings = {"time/sample": t1 - t0, "time/score": time.perf_counter() - t1}
        return batch

    def local_metrics(self, batch: TextOnlineBatch) -> dict[str, float]:
        return {"nan_dropped": float(self.dropped), **self.timings, **completion_metrics(batch.rollout,
                                                                                         batch.group_ids)}

    def global_metrics(self, batch: TextOnlineBatch, metrics: dict[str, float]) -> dict[str, float]:
        metrics = {**gather_reward_metrics(self.reward_output, self.ctx.dist), **metrics}
        warning = self.collapse.check(metrics.get("reward_std", float("nan")))
        if warning:
            metrics["collapse_warning"] = 1.0
            if self.collapse.warned == 1 and self.ctx.dist.is_main:
                self.ctx.write(f"warning: {warning}")
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts.state_dict(), "collapse": self.collapse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.collapse.load_state_dict(state.get("collapse", {}))


def completion_metrics(rollout: TextRollout, group_ids: torch.Tensor) -> dict[str, float]:
    """Length and diversity of a rollout's completions (TRL's ``completions/*`` names).

    ``completions/empty_fraction``: completions whose text is empty (EOS first); ``completions/clipped_fraction``:
    completions that hit ``max_new_tokens`` without ending; ``diversity``: distinct texts per group over G, averaged.
    """
    lengths = rollout.lengths.float().cpu()
    groups: dict[int, list[str]] = {}
    for g, text in zip(group_ids.tolist(), rollout.texts, strict=True):
        groups.setdefault(int(g), []).append(text)
    distinct = [len(set(texts)) / len(texts) for texts in groups.values()]
    return {"completions/mean_length": float(lengths.mean()), "completions/max_length": float(lengths.max()),
            "completions/min_length": float(lengths.min()),
            "completions/empty_fraction": sum(not t.strip() for t in rollout.texts) / len(rollout),
            "completions/clipped_fraction": float((~rollout.ended.cpu()).float().mean()),
            "diversity": sum(distinct) / len(distinct)}
