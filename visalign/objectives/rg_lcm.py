"""RG-LCM: latent consistency distillation from the teacher's ODE steps plus a reward term on the student's one-step
output (``objective.name: rg-lcm``; docs/methods.md#rg-lcm; the student math in
``visalign/generators/consistency.py``).

Per sample i of the teacher batch (``source.name: teacher``), with ``n_i ~ U{0..N−1}`` from the update's seeded
generator, ``x_t = trajectory[i, n_i]`` at ``t = τ_{n_i}`` and the teacher's DDIM step from it,
``x_{t'} = trajectory[i, n_i + 1]`` at ``t' = τ_{n_i + 1}`` (the boundary 0 after the last grid point):

    L_distill = mean_i d( f_θ(x_t, t), sg f_θ⁻(x_{t'}, t') )           d: pseudo-Huber (c = huber_c) or L2
    L_reward  = −reward_scale · mean_i r( decode(f_θ(x_t, t)), c_i )     (the engine's differentiable reward)
    L = L_distill + L_reward

``θ⁻`` is the target student: an EMA of the trainable weights with decay ``target_decay`` (LCM's target network), or,
with ``target_decay = 0`` (the default, as diffusers' LCM-LoRA script), the current weights under no grad. The EMA
copy travels in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from visalign.generators.consistency import consistency_function
from visalign.objectives.base import MetricMeans, Objective, UpdateContext, micro_batches
from visalign.objectives.batches import TeacherBatch
from visalign.objectives.sampling_policy import SamplingPolicy, trainable_named_parameters
from visalign.objectives.student import CONSISTENCY_LOSSES, consistency_distance


@dataclass
class RgLcmParams:
    reward_scale: float = field(default=1.0, metadata={
        "help": "Weight of the reward term on the student's one-step output; 0 = plain latent consistency "
                "distillation (RG-LCD's reward_scale, default 1)."})
    loss: str = field(default="huber", metadata={"help": "Consistency distance: huber (pseudo-Huber) or l2."})
    huber_c: float = field(default=1e-3, metadata={"help": "Pseudo-Huber c (LCM's 0.001)."})
    target_decay: float = field(default=0.0, metadata={
        "help": "EMA decay of the target student θ⁻ (LCM full fine-tune: 0.95); 0 = the current weights, no copy."})
    micro_batch: int = field(default=0, metadata={"help": "Samples per optimizer step; 0 = the whole batch."})
    points_per_sample: int = field(default=1, metadata={
        "help": "Grid points drawn per teacher trajectory (each a consistency pair); > 1 reuses the teacher's ODE "
                "for more pairs per iteration (LCM: 1)."})

    def __post_init__(self) -> None:
        if self.points_per_sample < 1:
            raise ValueError(f"objective.params.points_per_sample must be >= 1; got {self.points_per_sample}.")
        if self.loss not in CONSISTENCY_LOSSES:
            raise ValueError(f"objective.params.loss must be one of {list(CONSISTENCY_LOSSES)}; got {self.loss!r}.")
        if self.reward_scale < 0 or self.huber_c <= 0 or not 0 <= self.target_decay < 1 or self.micro_batch < 0:
            raise ValueError("rg-lcm needs reward_scale >= 0, huber_c > 0, 0 <= target_decay < 1, micro_batch >= 0.")


def consistency_pairs(batch: TeacherBatch, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_t, t, x_{t'}, t')`` of grid indices ``index [B]``: the trajectory point, its teacher step, their
    timesteps (long ``[B]``)."""
    rows = torch.arange(len(batch))
    grid = batch.schedule.grid
    return (batch.trajectory[rows, index], grid[index], batch.trajectory[rows, index + 1],
            batch.schedule.target_timesteps(index))


def repeat_samples(batch: TeacherBatch, k: int) -> TeacherBatch:
    """The batch with every sample repeated ``k`` times consecutively (``[B·k, ...]``)."""
    index = [i for i in range(len(batch)) for _ in range(k)]
    metadata = None if batch.metadata is None else [batch.metadata[i] for i in index]
    return TeacherBatch(prompts=[batch.prompts[i] for i in index], condition=batch.condition.select(index),
                        trajectory=batch.trajectory[index], schedule=batch.schedule, size=batch.size,
                        metadata=metadata)


class RgLcmObjective(Objective):
    """Reward-guided latent consistency distillation of a few-step student."""

    name = "rg-lcm"
    Params = RgLcmParams
    consumes = TeacherBatch
    needs = frozenset({"teacher", "reward_grad"})
    default_source = "teacher"

    def __init__(self, params: dict | None = None) -> None:
        super().__init__(params)
        # ramp 1: the decay is target_decay from the first step on (no warm-up of the target).
        self.target = SamplingPolicy(ramp=1.0, max_decay=self.params.target_decay)

    def consistency_loss(self, batch: TeacherBatch, ctx: UpdateContext, chunk: list[int], index: Tensor
                         ) -> tuple[Tensor, Tensor]:
        """``(per-sample distance [b], student output f_θ(x_t, t) [b, ...])`` of the samples ``chunk`` at grid
        indices ``index [b]``; the student output keeps its graph."""
        p: RgLcmParams = self.params
        sub_condition = batch.condition.select(chunk)
        x_t, t, x_next, t_next = consistency_pairs(batch, index)
        rows = torch.tensor(chunk)
        x_t, t, x_next, t_next = x_t[rows], t[rows], x_next[rows], t_next[rows]
        params = trainable_named_parameters(ctx.adapter)
        with torch.no_grad(), self.target.active(params):
            target = consistency_function(ctx.adapter, batch.schedule, x_next, t_next, sub_condition)
        with torch.enable_grad():
            student = consistency_function(ctx.adapter, batch.schedule, x_t, t, sub_condition)
        return consistency_distance(student, target, p.loss, p.huber_c), student

    def update(self, batch: TeacherBatch, ctx: UpdateContext) -> dict[str, float]:
        p: RgLcmParams = self.params
        if p.reward_scale > 0 and ctx.reward is None:
            raise RuntimeError("rg-lcm's reward term needs ctx.reward, the differentiable training reward.")
        params = trainable_named_parameters(ctx.adapter)
        self.target.start(params)
        grid_points = batch.schedule.grid.numel()
        k = min(p.points_per_sample, grid_points)
        if k > 1:  # each trajectory served k times, at k grid points drawn without replacement
            draws = [torch.randperm(grid_points, generator=ctx.generator)[:k] for _ in range(len(batch))]
            batch = repeat_samples(batch, k)
            index = torch.stack(draws).flatten()
        else:
            index = torch.randint(grid_points, (len(batch),), generator=ctx.generator)
        metrics = MetricMeans()
        steps = 0
        for chunk in micro_batches(range(len(batch)), p.micro_batch or len(batch)):
            distance, student = self.consistency_loss(batch, ctx, chunk, index)
            loss = distance.mean()
            extra = {}
            if p.reward_scale > 0:
                media = ctx.adapter.decode(student.to(ctx.adapter.dtype), grad=True)
                prompts = [batch.prompts[i] for i in chunk]
                metadata = None if batch.metadata is None else [batch.metadata[i] for i in chunk]
                reward = ctx.reward(media, prompts, metadata).float()
                loss = loss - p.reward_scale * reward.mean()
                extra["reward"] = reward.detach().mean()
            loss.backward()
            metrics.add(loss=loss.detach(), loss_distill=distance.detach().mean(), grad_norm=ctx.optimizer_step(),
                        grid_index=index[chunk].float().mean(), **extra)
            steps += 1
        out = metrics.means()
        out["target_decay"] = self.target.update(params, steps)
        return out

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"target.{k}": t for k, t in self.target.state_tensors().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], adapter) -> None:
        own = {k.removeprefix("target."): t for k, t in tensors.items() if k.startswith("target.")}
        self.target.load_state_tensors(own, trainable_named_parameters(adapter))
