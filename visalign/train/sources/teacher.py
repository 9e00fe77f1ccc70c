"""The teacher source: the frozen teacher's ODE trajectories on a few-step student's LCM grid
(docs/methods.md#distillation; the student math is in ``visalign/generators/consistency.py``).

Per iteration: draw ``sample.prompts_per_step`` distinct prompts from the seeded, resumable prompt stream, run the
teacher (the LoRA-disabled model, or for a full fine-tune a frozen copy of the weights as loaded) with DDIM η = 0 and
CFG ``distill.teacher_guidance`` down the grid of ``distill.teacher_steps`` timesteps for
``sample.images_per_prompt`` seeded noises per prompt, and hand the objective a
:class:`~visalign.objectives.batches.TeacherBatch`: every trajectory point, so RG-LCM can pick its consistency pairs
and R0 can compare its samples with the teacher's. It also gives the engine's evaluation the student's own sampler
(:meth:`eval_sampler`), so ``eval/...`` grades what the saved pipeline will produce.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from visalign.generators.consistency import (
    StudentSchedule,
    make_student_schedule,
    student_sample,
    teacher_trajectory,
)
from visalign.generators.rollout import per_sample_seeds, uses_cfg
from visalign.objectives.batches import TeacherBatch
from visalign.objectives.common import FrozenWeights
from visalign.train.sources.base import ExperienceSource, SourceContext, prompt_stream


class TeacherSource(ExperienceSource):
    """Teacher ODE trajectories for a few-step student (``source.name: teacher``, the default of ``rg-lcm``/``r0``)."""

    name = "teacher"
    produces = TeacherBatch
    provides = frozenset({"teacher", "reward_grad"})

    def __init__(self, ctx: SourceContext, needs: frozenset[str]) -> None:
        super().__init__(ctx, needs)
        self.prompts = prompt_stream(ctx)
        self.frozen: FrozenWeights | None = None
        self.schedule: StudentSchedule | None = None
        self.timings: dict[str, float] = {}

    def attach(self, adapter: Any) -> None:
        """Check the teacher can host a student, build the schedules, and keep the teacher's weights for a full
        fine-tune (LoRA needs no copy: its adapters switch off)."""
        super().attach(adapter)
        d = self.ctx.config.distill
        self.schedule = make_student_schedule(adapter, d.student_steps, d.teacher_steps, d.student_guidance)
        if self.ctx.config.model.lora_rank == 0:  # attach runs before train_full: these are the teacher's weights
            self.frozen = FrozenWeights(adapter.denoiser, {n: p.detach().clone()
                                                           for n, p in adapter.denoiser.named_parameters()})

    @contextlib.contextmanager
    def teacher(self) -> Iterator[None]:
        """Inside the block the denoiser is the teacher."""
        if self.adapter.lora is not None:
            with self.adapter.lora_disabled():
                yield
        elif self.frozen is not None:
            with self.frozen.swapped_in():
                yield
        else:  # before any training set-up the model is the teacher
            yield

    def _size(self) -> tuple[int, int]:
        res = self.ctx.config.model.resolution
        return self.adapter._check_resolution(res, res)

    def _condition(self, prompts: list[str]) -> Any:
        """B rows of conditioning, with negatives when the teacher or the student guides."""
        s, d = self.ctx.config.sample, self.ctx.config.distill
        height, width = self._size()
        guidance = max(d.teacher_guidance, d.student_guidance)
        with torch.no_grad():
            return self.adapter.encode_condition(prompts, [s.negative_prompt] * len(prompts), guidance,
                                                 height=height, width=width)

    def next(self) -> TeacherBatch:
        s, d = self.ctx.config.sample, self.ctx.config.distill
        t0 = time.perf_counter()
        dist = self.ctx.dist
        for rank in range(dist.num_processes):  # as the online source: one shared stream, each process its draws
            drawn = self.prompts.take_with_metadata(s.prompts_per_step)
            if rank == dist.process_index:
                prompts, metadata = drawn
        repeated = [p for p in prompts for _ in range(s.images_per_prompt)]
        meta = [m for m in metadata for _ in range(s.images_per_prompt)] if any(metadata) else None
        height, width = self._size()
        condition = self._condition(repeated)
        guidance = d.teacher_guidance if uses_cfg(d.teacher_guidance) else 1.0
        with self.teacher():
            trajectory = teacher_trajectory(self.adapter, self.schedule, condition, guidance,
                                            seeds=per_sample_seeds(self.ctx.seed(1), len(repeated)), height=height,
                                            width=width)
        self.timings = {"time/teacher": time.perf_counter() - t0}
        return TeacherBatch(prompts=repeated, condition=condition, trajectory=trajectory, schedule=self.schedule,
                            size=(height, width), metadata=meta)

    def eval_sampler(self) -> Callable[[list[str], int], Tensor]:
        """``(prompts, seed) → media [B, 3, H, W]``: the student's S-step LCM sampler, sample i seeded ``seed + i``."""
        def sample(prompts: list[str], seed: int) -> Tensor:
            height, width = self._size()
            condition = self._condition(list(prompts))
            seeds = per_sample_seeds(seed, len(prompts))
            latents = student_sample(self.adapter, self.schedule, condition, seeds=seeds, height=height, width=width)
            return self.adapter.decode(latents.to(self.adapter.dtype))

        return sample

    def local_metrics(self, batch: TeacherBatch) -> dict[str, float]:
        return dict(self.timings)

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
