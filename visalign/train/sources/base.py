"""The experience-source contract: where an iteration's batch comes from (docs/extending.md#add-a-source).

The engine (``visalign/train/loop.py``) owns parameters, optimizer, EMA, checkpoints and logs; a source owns how
experience is made — sampling and scoring the model being trained (``online``), reading preference pairs from files
(``pairs``) — and hands the objective one batch of the type it declares in ``produces``. Per iteration::

    batch = source.next()                       # no graph
    metrics = objective.update(batch, ctx)      # gradient steps

Everything random in ``next`` must come from ``SourceContext.seed(salt)`` (a function of run seed, iteration and
process), so a resumed run replays an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from visalign.train.config import TrainConfig
from visalign.train.distributed import Distributed
from visalign.train.prompts import PromptStream, read_prompt_table


@dataclass
class SourceContext:
    """What a source may use from the engine.

    Attributes:
        config: the run's config.
        dist: the process group (single process by default).
        seed: ``salt → seed`` for this iteration and process (salts 1–3 are the online source's and the update's).
        reward: the training reward (:class:`visalign.rewards.RewardSpec`), or None when the recipe has none.
        write: prints a line above the progress bar.
        iteration: the engine's current iteration (0 before the first update).
    """

    config: TrainConfig
    dist: Distributed
    seed: Callable[[int], int]
    reward: Any
    write: Callable[[str], None]
    iteration: Callable[[], int]


class ExperienceSource:
    """Base class of experience sources (``source.name`` in a recipe)."""

    name: ClassVar[str] = "source"
    produces: ClassVar[type] = object
    # Needs (visalign.objectives.base.NEEDS) this source can satisfy for an objective.
    provides: ClassVar[frozenset[str]] = frozenset()
    # What the model samples: "image" / "video" (a diffusers generator) or "text" (a causal LM, visalign/text/).
    modality: ClassVar[str] = "image"

    @staticmethod
    def load_model(model: Any, device: str) -> Any:
        """Load the model this source trains from ``model`` (the run's ``ModelConfig``): a diffusers generator
        adapter by default; text sources load a causal-LM policy instead."""
        from visalign.generators import load_generator

        return load_generator(model.model, dtype=model.dtype, device=device)

    def __init__(self, ctx: SourceContext, needs: frozenset[str]) -> None:
        """Read and check the source's inputs; runs before any model loads, so bad data fails in a second."""
        self.ctx = ctx
        self.needs = needs

    def attach(self, adapter: Any) -> None:
        """Called once the generator is loaded, before its LoRA is added (e.g. to configure its sampler)."""
        self.adapter = adapter

    def next(self) -> Any:
        """This iteration's batch, of type ``produces``."""
        raise NotImplementedError

    def train_steps(self, batch: Any) -> list[int]:
        """Rollout step indices the update trains on (``ctx.train_steps``); none for batches without a rollout."""
        return []

    def local_metrics(self, batch: Any) -> dict[str, float]:
        """This process's scalar metrics of the batch (averaged over processes by the engine)."""
        return {}

    def global_metrics(self, batch: Any, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics computed over every process's batch (collective: every process calls it), merged in front of
        ``metrics``; the default returns ``metrics`` unchanged."""
        return metrics

    def eval_metrics(self, batch: Any) -> dict[str, float]:
        """Extra metrics on evaluation iterations, main process only (e.g. the path KL of the online rollout)."""
        return {}

    def grid(self, batch: Any) -> tuple[Tensor, int] | None:
        """``(media, columns)`` of the batch for the training grid, or None."""
        return None

    def eval_sampler(self) -> Callable[[list[str], int], Tensor] | None:
        """``(prompts, seed) → media`` the engine's evaluation samples with instead of the DDIM rollout (a few-step
        student's own sampler), or None (the default: ``adapter.rollout`` with ``eval.steps`` and ``eval.eta``)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State shared by every process (e.g. a stream's position), saved once in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def prompt_stream(ctx: SourceContext) -> PromptStream:
    """The run's seeded prompt stream of ``sample.prompts``; refuses a step that wants more distinct prompts than the
    table has (a step draws distinct prompts, one group each)."""
    s = ctx.config.sample
    prompts, metadata = read_prompt_table(s.prompts)
    stream = PromptStream(prompts, seed=ctx.config.run.seed, metadata=metadata)
    if s.prompts_per_step > len(stream.prompts):
        raise ValueError(f"sample.prompts_per_step is {s.prompts_per_step} but {s.prompts} has only "
                         f"{len(stream.prompts)} distinct prompts (a step draws distinct prompts, one group "
                         "each); lower sample.prompts_per_step or add prompts.")
    return stream
