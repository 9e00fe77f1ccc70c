"""The objective contract: one small class per objective over a typed batch (docs/extending.md#add-an-objective).

The engine (``visalign/train/loop.py``) owns the parameters and the optimizer, an experience source
(``visalign/train/sources/``) makes the batches, and an objective turns one batch into gradient steps: per
iteration the engine calls ``objective.update(batch, ctx)``, which may take several optimizer steps (PPO-style inner
epochs) through ``ctx.optimizer_step()``.

An objective declares what it consumes and needs instead of being probed for it:

- ``consumes``: the batch type (:mod:`visalign.objectives.batches`) it reads;
- ``needs``: a subset of :data:`NEEDS` — ``log_probs`` (per-step log-densities of the rollout's stochastic steps),
  ``reward_grad`` (the training reward as a differentiable function of the pixels), ``reference`` (a frozen
  reference model: the LoRA-disabled model, or a frozen copy of a full fine-tune's weights), ``teacher`` (a teacher
  model's predictions);
- ``default_source``: the experience source it trains on when the recipe names none;
- :meth:`Objective.scorer_specs`: scorers it uses besides the reward (GRPO's anchor); the engine builds them and
  hands them over in ``ctx.scorers``, so no objective builds a scorer itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from visalign.generators.base import GeneratorAdapter
from visalign.objectives.batches import DenoisingBatch, OnlineBatch, PairBatch
from visalign.registry import Registry

# The capabilities an objective may need from its source and engine (see the module docstring).
NEEDS = ("log_probs", "reward_grad", "reference", "teacher")
# The old name of the online batch, kept for callers that built it by hand.
UpdateBatch = OnlineBatch
__all__ = ["NEEDS", "OBJECTIVES", "DenoisingBatch", "MetricMeans", "Objective", "OnlineBatch", "PairBatch",
           "UpdateBatch", "UpdateContext", "build_objective", "micro_batches"]


@dataclass
class UpdateContext:
    """What an objective may use besides the batch.

    Attributes:
        adapter: the generator being trained (``step_log_prob``, ``lora_disabled``, ``denoising_loss``...).
        train_steps: rollout step indices to train on (already subset by the loop's step selection).
        optimizer_step: clip gradients, step the optimizer, the LR schedule and the EMA, zero the gradients;
            returns the pre-clip global grad norm.
        generator: a seeded CPU generator for the objective's own randomness (so resumes replay it exactly).
        reward: the training reward as a differentiable function ``(media [B, ...] in [0, 1], prompts, metadata)
            → float32 [B]`` that keeps the graph back to ``media``; set only for objectives that need
            ``reward_grad`` (reward backprop).
        scorers: the scorers of :meth:`Objective.scorer_specs`, by the same keys, built by the engine.
        equal_micro_batches: the objective's micro-batch plan (a list, one entry per optimizer micro-step) →
            the plan every process runs. The identity except under FSDP (``visalign/train/sharding.py``), where
            shorter plans are padded with ``None`` entries on which a :attr:`Objective.uniform_passes` objective
            runs the same denoiser passes with zero weight, so every process calls the denoiser equally often.
    """

    adapter: GeneratorAdapter
    train_steps: Sequence[int]
    optimizer_step: Callable[[], float]
    generator: torch.Generator
    reward: Callable[[Tensor, list[str], list[Any] | None], Tensor] | None = None
    scorers: dict[str, Any] = field(default_factory=dict)
    equal_micro_batches: Callable[[list[Any]], list[Any]] = list


@dataclass
class NoParams:
    """The params of an objective that takes none."""


class Objective:
    """Base class. Subclasses declare a ``Params`` dataclass, what they consume and need, and implement
    :meth:`update`."""

    name: ClassVar[str] = "objective"
    Params: ClassVar[type] = NoParams
    consumes: ClassVar[type] = OnlineBatch
    # Policy-gradient objectives train on the rollout's stochastic steps; reward backprop needs none (it may sample
    # with η = 0) but needs the reward's gradient instead.
    needs: ClassVar[frozenset[str]] = frozenset({"log_probs"})
    default_source: ClassVar[str] = "online"
    # True when update() plans its micro-batches through ctx.equal_micro_batches and runs, for a padding (None)
    # entry, the same denoiser passes as for a real one with zero weight: the condition for FSDP, whose collectives
    # need every process to call the denoiser the same number of times (docs/architecture.md#fsdp).
    uniform_passes: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        from visalign.config import from_dict

        self.params = from_dict(self.Params, params or {}, where="objective.params.")  # type: ignore[arg-type]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.needs) - set(NEEDS)
        if unknown:
            raise TypeError(f"{cls.__name__}.needs has {sorted(unknown)}; known needs: {list(NEEDS)}.")

    def update(self, batch: Any, ctx: UpdateContext) -> dict[str, float]:
        """Take this iteration's gradient steps on a batch of type ``consumes``; return scalar metrics (``loss``,
        ``clipfrac``, ``grad_norm``...)."""
        raise NotImplementedError

    def scorer_specs(self) -> dict[str, str]:
        """Scorers this objective uses besides the training reward, key → scorer id; the engine builds each one
        (and checks it can return gradients) and passes them in ``ctx.scorers``. None by default."""
        return {}

    def sampling_weights(self) -> dict[str, Tensor] | None:
        """Trainable weights (by ``denoiser.named_parameters()`` name) the engine swaps in while the source makes the
        next batch: an off-policy objective's sampling policy (DiffusionNFT's EMA ``θ_old``). None (the default):
        sample with the current weights."""
        return None

    def state_tensors(self) -> dict[str, Tensor]:
        """Tensors the objective carries across iterations (saved in checkpoints); none by default."""
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor], adapter: GeneratorAdapter) -> None:
        """Restore :meth:`state_tensors` from a checkpoint (``adapter`` is the generator being trained)."""

    @staticmethod
    def param_help(cls_params: type) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls_params)}


OBJECTIVES: Registry[type[Objective]] = Registry("objective", builtin={
    "grpo": "visalign.objectives.grpo:GrpoObjective",
    "ddpo": "visalign.objectives.grpo:GrpoObjective",
    "prdp": "visalign.objectives.prdp:PrdpObjective",
    "dragon": "visalign.objectives.dragon:DragonObjective",
    "raft": "visalign.objectives.raft:RaftObjective",
    "reward-backprop": "visalign.objectives.reward_backprop:RewardBackpropObjective",
    "draft": "visalign.objectives.reward_backprop:DraftObjective",
    "alignprop": "visalign.objectives.reward_backprop:AlignPropObjective",
    "refl": "visalign.objectives.reward_backprop:ReflObjective",
    "diffusion-dpo": "visalign.objectives.diffusion_dpo:DiffusionDpoObjective",
    "rpo-harmonic": "visalign.objectives.rpo_harmonic:RpoHarmonicObjective",
    "nft": "visalign.objectives.nft:NftObjective",
    "awm": "visalign.objectives.awm:AwmObjective",
    # The text core (docs/methods.md#text-core): the same contract over a causal-LM policy's batches.
    "text-grpo": "visalign.text.grpo:TextGrpoObjective",
    "text-rloo": "visalign.text.rloo:TextRlooObjective",
    "text-dpo": "visalign.text.dpo:TextDpoObjective",
    "text-best-of-n": "visalign.text.best_of_n:TextBestOfNObjective",
    "text-raft": "visalign.text.best_of_n:TextBestOfNObjective",
    "rg-lcm": "visalign.objectives.rg_lcm:RgLcmObjective",
    "r0": "visalign.objectives.r0:R0Objective",
})


def build_objective(name: str, params: dict[str, Any] | None = None) -> Objective:
    """An objective by id (``grpo``, ``prdp``, ``dragon``, ``raft``, ``draft``, ``alignprop``, ``refl``,
    ``diffusion-dpo``, ``rpo-harmonic``, ``nft``, ``awm``, ``rg-lcm``, ``r0``) or ``"pkg.module:Class"``."""
    return OBJECTIVES.get(name)(params)


def micro_batches(indices: Sequence[int], size: int) -> list[list[int]]:
    """Split sample indices into consecutive chunks of at most ``size``."""
    idx = list(indices)
    return [idx[i:i + size] for i in range(0, len(idx), size)]


@dataclass
class MetricMeans:
    """Running means of scalar metrics over micro-batches and steps."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, **values: float | Tensor) -> None:
        for key, value in values.items():
            v = float(value.detach()) if isinstance(value, Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + v
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}
