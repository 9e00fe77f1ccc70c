"""R0-style regularised reward maximisation of a few-step student (``objective.name: r0``; docs/methods.md#r0).

No distillation loss: the student's own S-step LCM samples (``visalign/generators/consistency.py``) are decoded and
scored with the graph kept through every step, and two regularisers hold the student near the teacher::

    x̂ = G_θ(z, c)                      (S student steps from seeded noise z, the graph through all of them)
    L = −reward_scale · mean r(decode(x̂), c)
        + weight_reg · ||θ − θ_teacher||²                         (LoRA: Σ ||scale·B·A||²; full: to a frozen copy)
        + distribution_reg · MMD²(x̂, x_teacher)                   (Gaussian kernels on flattened latents)

``x_teacher`` are the teacher batch's clean samples from other noises (``source.name: teacher``), so the last term
compares distributions, not paired samples. The student's noise (initial latents and the LCM step noises) comes from
the update's seeded generator, so a resumed run replays it. The paper's other regularisers and its generator
parameterisation are not implemented (docs/methods.md#r0: unverified, no released code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from visalign.generators.consistency import student_sample
from visalign.objectives.base import MetricMeans, Objective, UpdateContext, micro_batches
from visalign.objectives.batches import TeacherBatch
from visalign.objectives.common import ReferenceModel
from visalign.objectives.student import mmd_rbf, weight_distance


@dataclass
class R0Params:
    reward_scale: float = field(default=1.0, metadata={"help": "Weight of the reward of the student's samples."})
    weight_reg: float = field(default=1.0, metadata={
        "help": "Weight of the squared weight-space distance to the teacher (LoRA: its merged update)."})
    distribution_reg: float = field(default=1.0, metadata={
        "help": "Weight of the squared MMD between the student's and the teacher's clean latents; 0 = off."})
    micro_batch: int = field(default=0, metadata={"help": "Samples per optimizer step; 0 = the whole batch."})
    checkpoint_steps: bool = field(default=True, metadata={
        "help": "Recompute each student step's activations in backward (memory: S step inputs)."})

    def __post_init__(self) -> None:
        if min(self.reward_scale, self.weight_reg, self.distribution_reg) < 0 or self.micro_batch < 0:
            raise ValueError("r0 needs reward_scale, weight_reg, distribution_reg >= 0 and micro_batch >= 0.")


class R0Objective(Objective):
    """Reward maximisation of the student's few-step samples with weight and distribution regularisers."""

    name = "r0"
    Params = R0Params
    consumes = TeacherBatch
    needs = frozenset({"teacher", "reward_grad"})
    default_source = "teacher"

    def __init__(self, params: dict | None = None) -> None:
        super().__init__(params)
        self.reference = ReferenceModel("base")  # a full fine-tune's frozen teacher copy (LoRA needs none)

    def _teacher_weights(self, ctx: UpdateContext) -> dict[str, Tensor] | None:
        if ctx.adapter.lora is not None:
            return None
        if self.reference.frozen is None:  # the first update, before its first optimizer step: the teacher
            with self.reference(ctx.adapter):
                pass
        return self.reference.frozen.weights

    def student_noise(self, batch: TeacherBatch, ctx: UpdateContext) -> list[Tensor]:
        """The S noise tensors ``[B, ...]`` (initial latents, then each step's) from the update's generator."""
        shape = (len(batch), *batch.trajectory.shape[2:])
        return [torch.randn(shape, generator=ctx.generator) for _ in range(batch.schedule.steps)]

    def update(self, batch: TeacherBatch, ctx: UpdateContext) -> dict[str, float]:
        p: R0Params = self.params
        if ctx.reward is None:
            raise RuntimeError("r0 needs ctx.reward, the differentiable training reward.")
        teacher = self._teacher_weights(ctx)
        noise = self.student_noise(batch, ctx)
        height, width = batch.size
        metrics = MetricMeans()
        for chunk in micro_batches(range(len(batch)), p.micro_batch or len(batch)):
            rows = torch.tensor(chunk)
            latents = student_sample(ctx.adapter, batch.schedule, batch.condition.select(chunk),
                                     noise=[n[rows] for n in noise], height=height, width=width, grad=True,
                                     use_checkpoint=p.checkpoint_steps)
            media = ctx.adapter.decode(latents.to(ctx.adapter.dtype), grad=True)
            metadata = None if batch.metadata is None else [batch.metadata[i] for i in chunk]
            reward = ctx.reward(media, [batch.prompts[i] for i in chunk], metadata).float()
            loss = -p.reward_scale * reward.mean()
            distance = weight_distance(ctx.adapter, teacher)
            loss = loss + p.weight_reg * distance.to(loss.device)
            extra = {}
            if p.distribution_reg > 0:
                mmd = mmd_rbf(latents.flatten(1), batch.teacher_samples[rows].to(latents.device).flatten(1))
                loss = loss + p.distribution_reg * mmd
                extra["mmd"] = mmd.detach()
            loss.backward()
            metrics.add(loss=loss.detach(), reward=reward.detach().mean(), weight_distance=distance.detach(),
                        grad_norm=ctx.optimizer_step(), **extra)
        return metrics.means()

    def state_tensors(self) -> dict[str, Tensor]:
        return self.reference.state_tensors()

    def load_state_tensors(self, tensors: dict[str, Tensor], adapter) -> None:
        self.reference.load_state_tensors(tensors, adapter)
