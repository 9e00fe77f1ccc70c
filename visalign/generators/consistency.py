"""Few-step students of UNet families: the LCM schedule, the consistency function, the student's multistep sampler
and the teacher's ODE on the same grid (docs/methods.md#distillation, #rg-lcm, #r0).

A student is the teacher's denoiser (plus LoRA, or fully fine-tuned) sampled by diffusers' ``LCMScheduler``, so a
saved student is a stock pipeline folder whose scheduler is ``LCMScheduler``. Everything here takes its numbers from
a real ``LCMScheduler`` built from the teacher's scheduler config, so what training differentiates is what stock
diffusers samples (tested against ``DiffusionPipeline.from_pretrained`` to 1e-4):

- the **grid** (LCM's "original" DDIM skip schedule): ``τ_j = (N − j)·k − 1`` for ``j = 0..N−1``, ``k = T / N``
  (N = ``teacher_steps``; 999, 979, ..., 19 for N = 50, T = 1000);
- the **student's timesteps**: ``LCMScheduler.set_timesteps(S)`` picks S of the grid (999, 499 for S = 2, N = 20);
- the **consistency function** ``f_θ(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0_θ(x_t, t)`` with LCM's discrete boundary
  scalings (``c_skip(0) = 1``, ``c_out(0) = 0``);
- the **student's sampler** (``LCMScheduler.step``): ``x ← f_θ(x, t_i)``, then, except after the last step,
  ``x ← sqrt(ᾱ_{t_{i+1}})·x + sqrt(1 − ᾱ_{t_{i+1}})·ε_i`` with fresh noise ``ε_i``;
- the **teacher's ODE**: DDIM η = 0 with the teacher's guidance from ``τ_0`` down the grid, the last step onto
  ``ᾱ = 1`` (the clean sample).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from visalign.generators.base import Condition, GeneratorAdapter
from visalign.generators.ddim_logprob import ddim_step_with_logprob
from visalign.generators.rollout import randn_per_sample, sample_generators

# adapter family → the diffusers scheduler a saved student samples with. A family missing here has no student:
# the LCM boundary condition and skip grid are defined on discrete DDPM timesteps (UNet image families).
STUDENT_SCHEDULERS: dict[str, str] = {
    "stable-diffusion": "LCMScheduler",
    "stable-diffusion-xl": "LCMScheduler",
}


# Below this ᾱ at the grid's first timestep the student's x0 estimate there is ill-conditioned (a warning says so).
MIN_FIRST_ALPHA = 1e-5


def check_student_family(adapter: GeneratorAdapter) -> None:
    """Raise ``ValueError`` when the adapter's family cannot host a few-step student, naming those that can."""
    if adapter.family not in STUDENT_SCHEDULERS:
        pipeline = type(adapter.pipeline).__name__
        raise ValueError(f"The teacher is a {pipeline} ({adapter.family} family), which cannot host a few-step "
                         f"student here: students sample with diffusers' LCMScheduler on discrete DDPM timesteps, "
                         f"available for the families {sorted(STUDENT_SCHEDULERS)} (StableDiffusionPipeline, "
                         "StableDiffusionXLPipeline). Distil an SD 1.x/2.x or SDXL teacher.")


def student_scheduler(scheduler: Any, teacher_steps: int) -> Any:
    """An ``LCMScheduler`` with the teacher scheduler's training schedule and ``original_inference_steps = N``.

    Goes through ``DDIMScheduler.from_config`` first, as :class:`~visalign.generators.unet.DDIMUNetAdapter` does, so
    a PNDM/Euler teacher config and the adapter's DDIM config give the same student scheduler.
    """
    from diffusers import DDIMScheduler, LCMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    return LCMScheduler.from_config(ddim.config, original_inference_steps=int(teacher_steps))


@dataclass
class StudentSchedule:
    """The student's and the teacher's timesteps on one LCM grid.

    Attributes:
        scheduler: the ``LCMScheduler`` a saved student samples with (boundary scalings, ``ᾱ``).
        timesteps: long ``[S]``, the student's sampling timesteps, descending.
        grid: long ``[N]``, the teacher's ODE timesteps ``τ_0 > ... > τ_{N−1}``, descending.
        guidance: the student's CFG scale (≤ 1: conditional branch only, the guidance distilled into the weights).
    """

    scheduler: Any
    timesteps: Tensor
    grid: Tensor
    guidance: float

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())

    def target_timesteps(self, index: Tensor) -> Tensor:
        """``[B]`` the grid's next timestep after ``grid[index]``; 0 (the boundary) after the last one."""
        padded = torch.cat([self.grid, self.grid.new_zeros(1)])
        return padded[index + 1]


def make_student_schedule(adapter: GeneratorAdapter, student_steps: int, teacher_steps: int,
                          guidance: float = 1.0) -> StudentSchedule:
    """The :class:`StudentSchedule` of ``student_steps`` on the grid of ``teacher_steps`` (errors name the fix).

    Raises:
        ValueError: the family has no student, or the LCM scheduler cannot take that many steps.
    """
    check_student_family(adapter)
    total = int(adapter.pipeline.scheduler.config.num_train_timesteps)
    if not 1 <= teacher_steps <= total:
        raise ValueError(f"distill.teacher_steps is {teacher_steps}; the LCM grid needs 1 <= teacher_steps <= "
                         f"{total} (the teacher's training timesteps).")
    if not 1 <= student_steps <= teacher_steps:
        raise ValueError(f"distill.student_steps is {student_steps}; LCMScheduler samples 1 to "
                         f"original_inference_steps = distill.teacher_steps ({teacher_steps}) steps. Use 1-4 for a "
                         "few-step student, or raise distill.teacher_steps.")
    scheduler = student_scheduler(adapter.pipeline.scheduler, teacher_steps)
    try:
        scheduler.set_timesteps(student_steps)
    except ValueError as err:
        raise ValueError(f"LCMScheduler cannot sample distill.student_steps = {student_steps} on a grid of "
                         f"{teacher_steps} teacher steps: {err}") from None
    k = total // teacher_steps
    grid = torch.arange(teacher_steps, 0, -1, dtype=torch.long) * k - 1
    first = float(scheduler.alphas_cumprod[int(grid[0])])
    if first < MIN_FIRST_ALPHA:
        # x̂0 = (x − sqrt(1 − ᾱ)·ε̂) / sqrt(ᾱ): at ᾱ ≈ 0 (a cosine schedule's t = T − 1) every ε error is amplified
        # by 1/sqrt(ᾱ), so the first student step and the consistency loss there blow up (measured on the shapes
        # model: distance ~100 at τ_0 = 999, ~0.3 at τ_0 = 989).
        warnings.warn(f"The student's first timestep {int(grid[0])} has ᾱ = {first:.2g}: its x0 estimate amplifies "
                      f"the denoiser's errors {first ** -0.5:.0f}x. Pick distill.teacher_steps that does not divide "
                      f"{total} (e.g. 15: the grid starts at {(total // 15) * 15 - 1}).", stacklevel=2)
    return StudentSchedule(scheduler, scheduler.timesteps.clone().long(), grid, float(guidance))


def boundary_scalings(schedule: StudentSchedule, timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """LCM's ``(c_skip, c_out)`` float32 ``[B]`` at long ``timesteps [B]`` (``c_skip(0) = 1``, ``c_out(0) = 0``)."""
    c_skip, c_out = schedule.scheduler.get_scalings_for_boundary_condition_discrete(timesteps.double())
    return c_skip.float(), c_out.float()


def _expand(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.device).view(-1, *([1] * (like.ndim - 1)))


def consistency_function(adapter: GeneratorAdapter, schedule: StudentSchedule, latents: Tensor, timesteps: Tensor,
                         condition: Condition) -> Tensor:
    """``f_θ(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0_θ(x_t, t)`` float32 ``[B, ...]``; gradients follow torch's mode.

    Args:
        latents: ``x_t`` ``[B, ...]``.
        timesteps: long ``[B]`` (or a 0-d tensor, one for the batch as the stock pipeline passes it).
        condition: B rows (with negatives when ``schedule.guidance > 1``).
    """
    batch = latents.shape[0]
    per_sample = timesteps.expand(batch) if timesteps.ndim == 0 else timesteps
    prediction = adapter.denoise(latents.to(adapter.dtype), timesteps, condition, schedule.guidance)
    x0 = adapter.x0_from_prediction(latents.float(), prediction.float(), per_sample.to(adapter.device))
    c_skip, c_out = boundary_scalings(schedule, per_sample.cpu())
    return _expand(c_skip, x0) * latents.float() + _expand(c_out, x0) * x0


def student_sample(adapter: GeneratorAdapter, schedule: StudentSchedule, condition: Condition, *,
                   seeds: Sequence[int] | None = None, noise: Sequence[Tensor] | None = None, height: int,
                   width: int, grad: bool = False, use_checkpoint: bool = False) -> Tensor:
    """The student's S-step LCM sample: final latents float32 ``[B, ...]``.

    Noise: per-sample CPU generators from ``seeds`` (initial latents first, then one draw per step but the last, as
    ``LCMScheduler.step`` draws them), which reproduces the stock pipeline called with the same generators; or the
    ``S`` tensors of ``noise`` (initial latents, then step noises) when given.

    Args:
        grad: keep the graph through every step (R0's reward); ``use_checkpoint`` recomputes each step's
            activations in backward.
    """
    shape = adapter.latent_shape(height, width, None)
    batch = condition.embeds.shape[0]
    generators = sample_generators(seeds) if noise is None else None

    def draw(i: int) -> Tensor:
        if noise is not None:
            return noise[i].to(adapter.device, torch.float32)
        return randn_per_sample(generators, shape, device=adapter.device, dtype=torch.float32)

    if noise is None and len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} condition rows; give one seed per sample.")
    x = draw(0) * adapter.initial_noise_scale()
    alphas = schedule.scheduler.alphas_cumprod
    with torch.enable_grad() if grad else torch.no_grad():
        for i, t in enumerate(schedule.timesteps):
            def step(latents: Tensor, t: Tensor = t) -> Tensor:
                return consistency_function(adapter, schedule, latents, t, condition)

            x = checkpoint(step, x, use_reentrant=False) if (grad and use_checkpoint) else step(x)
            if i + 1 < schedule.steps:
                a = float(alphas[int(schedule.timesteps[i + 1])])
                x = a ** 0.5 * x + (1 - a) ** 0.5 * draw(i + 1)
    return x


def teacher_trajectory(adapter: GeneratorAdapter, schedule: StudentSchedule, condition: Condition, guidance: float,
                       *, seeds: Sequence[int], height: int, width: int) -> Tensor:
    """The teacher's DDIM η = 0 ODE with CFG ``guidance`` down the grid, from per-sample seeded noise, no graph.

    Returns:
        ``[B, N+1, ...]`` float32: index 0 is the initial noise at ``τ_0``, index j the latents at ``τ_j``, index N the
        clean sample (the last step lands on ``ᾱ = 1``).
    """
    scheduler = adapter.pipeline.scheduler
    config = scheduler.config
    shape = adapter.latent_shape(height, width, None)
    x = randn_per_sample(sample_generators(seeds), shape, device=adapter.device, dtype=torch.float32)
    x = x * adapter.initial_noise_scale()
    trajectory = [x]
    grid = schedule.grid.tolist()
    with torch.no_grad():
        for j, t in enumerate(grid):
            prev = grid[j + 1] if j + 1 < len(grid) else -1  # -1: onto the final ᾱ (1 with set_alpha_to_one)
            prediction = adapter.denoise(x.to(adapter.dtype), torch.tensor(t, device=adapter.device), condition,
                                         guidance)
            step = ddim_step_with_logprob(prediction.float(), t, prev, x, scheduler.alphas_cumprod, 1.0, eta=0.0,
                                          prediction_type=config.prediction_type,
                                          clip_sample_range=config.clip_sample_range if config.clip_sample else None)
            x = step.prev_sample.float()
            trajectory.append(x)
    return torch.stack(trajectory, dim=1)
