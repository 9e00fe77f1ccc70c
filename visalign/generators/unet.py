"""Image UNet families with a DDIM sampler (η > 0 for log-probs): Stable Diffusion 1.x/2.x and SDXL.

Builds on :mod:`visalign.generators.base` (the loop, seeds, LoRA, save/load) and
:func:`visalign.generators.ddim_logprob.ddim_step_with_logprob` (the step). The denoiser call mirrors diffusers'
``StableDiffusionPipeline.__call__`` / ``StableDiffusionXLPipeline.__call__`` (release v0.42.1) — the same batch
layout ``[uncond; cond]`` under CFG and the same added conditioning for SDXL — so that with η = 0 a rollout
reproduces the stock pipeline's image for the same per-sample generators (tested to 1e-4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from visalign.generators.base import (
    Condition,
    GeneratorAdapter,
    SamplingPlan,
    StepOutput,
    cfg_timesteps,
    guide,
    uses_cfg,
)
from visalign.generators.ddim_logprob import ddim_step_with_logprob
from visalign.generators.denoising_loss import (
    GeneratorLike,
    check_timesteps,
    ddpm_noised_and_target,
    ddpm_x0_from_prediction,
    draw_ddpm_timesteps,
)
from visalign.generators.rollout import Rollout, check_sde_window, sde_window_mask
from visalign.media import from_vae_range, to_vae_range


class DDIMUNetAdapter(GeneratorAdapter):
    """Shared machinery of UNet + DDIM families: scheduler set-up, the guided denoiser call, the DDIM step.

    Subclasses provide ``encode_condition`` and ``decode``; video subclasses change only the latent layout.
    """

    denoiser_name = "unet"
    sde_window: tuple[int, int] | None = None

    def __init__(self, pipeline: Any, **kwargs: Any) -> None:
        from diffusers import DDIMScheduler

        # DDIM with η > 0 is the policy whose per-step density we need; other schedulers are swapped for DDIM with the
        # same training schedule (betas, prediction type, spacing), as ddpo-pytorch does.
        if not isinstance(pipeline.scheduler, DDIMScheduler):
            pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        if pipeline.scheduler.config.thresholding:
            raise ValueError("DDIM dynamic thresholding is not supported for log-probs; load the scheduler with "
                             "thresholding=False.")
        super().__init__(pipeline, **kwargs)

    def configure_sde(self, window: tuple[int, int] | None = None) -> DDIMUNetAdapter:
        """Sample only the half-open step range ``window`` with DDIM η (the rollout's ``eta``); the other steps use
        η = 0 (the deterministic sampler, no log-prob). MixGRPO / Flow-GRPO-Fast style: the trained steps stay
        stochastic while the rest of each trajectory is the sampler users evaluate with. None: η on every step.

        Returns:
            ``self``, for chaining.
        """
        self.sde_window = check_sde_window(window)
        return self

    # -- schedule --
    def make_schedule(self, steps: int, *, height: int, width: int,
                      num_frames: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        """``timesteps [S]`` (long, descending), ``prev_timesteps [S]`` (``t − T_train // S``, may be < 0) and
        ``eta_scale [S]`` (1 inside the SDE window, 0 outside; all ones without a window)."""
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(steps, device=self.device)
        timesteps = scheduler.timesteps.clone()
        prev = timesteps - scheduler.config.num_train_timesteps // steps
        return timesteps, {"prev_timesteps": prev, "eta_scale": sde_window_mask(self.sde_window, steps, self.device)}

    # -- the denoiser --
    def denoise(self, latents: Tensor, timesteps: Tensor, condition: Condition, guidance: float) -> Tensor:
        """Guided UNet prediction ``[B, ...]`` (denoiser dtype), batched ``[uncond; cond]`` as the stock pipeline."""
        cfg = uses_cfg(guidance)
        if cfg and not condition.guided:
            raise ValueError(f"guidance={guidance} needs negative embeddings; encode the condition with CFG on.")
        t = torch.as_tensor(timesteps, device=self.device)
        model_input = torch.cat([latents, latents]) if cfg else latents
        # A scalar t stays scalar, exactly what the stock pipeline passes (DDIM's scale_model_input is the identity).
        t_in = t if t.ndim == 0 else cfg_timesteps(t, latents.shape[0], cfg)
        embeds = torch.cat([condition.negative_embeds, condition.embeds]) if cfg else condition.embeds
        extras = {k: torch.cat([condition.negative_extras[k], v]) if cfg else v for k, v in condition.extras.items()}
        pred = self.call_denoiser(model_input.to(self.dtype), t_in, embeds, extras)
        if cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = guide(pred_uncond, pred_cond, guidance)
        return pred

    def call_denoiser(self, model_input: Tensor, t: Tensor, embeds: Tensor, extras: dict[str, Tensor]) -> Tensor:
        kwargs = {"added_cond_kwargs": extras} if extras else {}
        return self.denoiser(model_input, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]

    # -- the DDPM training loss (denoising_loss) --
    def training_timesteps(self, latents: Tensor, generator: GeneratorLike) -> Tensor:
        """``t ~ U{0..T−1}`` over the scheduler's training timesteps, long ``[B]``."""
        return draw_ddpm_timesteps(latents.shape[0], self.pipeline.scheduler.config.num_train_timesteps, generator,
                                   self.device)

    def check_training_timesteps(self, timesteps: Tensor | Sequence[float], batch: int) -> Tensor:
        return check_timesteps(timesteps, batch, discrete=True, device=self.device,
                               upper=self.pipeline.scheduler.config.num_train_timesteps)

    def noised_and_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scheduler = self.pipeline.scheduler
        noisy, target = ddpm_noised_and_target(x0, noise, timesteps, scheduler.alphas_cumprod,
                                               scheduler.config.prediction_type)
        return noisy, target, timesteps

    def x0_from_prediction(self, noisy: Tensor, prediction: Tensor, timesteps: Tensor) -> Tensor:
        scheduler = self.pipeline.scheduler
        return ddpm_x0_from_prediction(noisy, prediction, timesteps, scheduler.alphas_cumprod,
                                       scheduler.config.prediction_type)

    def step_noise_levels(self, rollout: Rollout) -> Tensor:
        """The DDIM timesteps themselves (training units already)."""
        return rollout.timesteps.long()

    def transition(self, plan: SamplingPlan, latents: Tensor, step_index: int, *, prev_sample: Tensor | None = None,
                   noise: Tensor | None = None) -> StepOutput:
        scheduler = self.pipeline.scheduler
        pred = self.predict(plan, latents, step_index)
        config = scheduler.config
        step = ddim_step_with_logprob(
            pred, plan.timesteps[step_index], plan.schedule["prev_timesteps"][step_index], latents,
            scheduler.alphas_cumprod, scheduler.final_alpha_cumprod, eta=plan.eta * step_eta_scale(plan, step_index),
            prediction_type=config.prediction_type,
            clip_sample_range=config.clip_sample_range if config.clip_sample else None,
            prev_sample=prev_sample, noise=noise)
        return StepOutput(step.prev_sample, step.mean, step.std, step.log_prob_mean, step.log_prob_sum,
                          step.pred_original_sample)

    # -- sizes --
    def default_resolution(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return height * self.vae_scale_factor(), width * self.vae_scale_factor()

    def latent_shape(self, height: int, width: int, num_frames: int | None) -> tuple[int, ...]:
        if num_frames is not None:
            raise ValueError(f"{self.family} generates images; drop num_frames (got {num_frames}).")
        f = self.vae_scale_factor()
        return (self.denoiser.config.in_channels, height // f, width // f)

    # -- decoding --
    def decode_images(self, latents: Tensor) -> Tensor:
        """``[N, C, h, w]`` latents → float32 ``[N, 3, H, W]`` in [0, 1] (VAE scaling/shift as in diffusers)."""
        vae = self.pipeline.vae
        scaled = latents / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None) is not None:
            scaled = scaled + vae.config.shift_factor
        pixels = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        return from_vae_range(pixels.float())

    def decode(self, latents: Tensor, *, grad: bool = False) -> Tensor:
        """Final latents ``[B, C, h, w]`` → float32 ``[B, 3, H, W]`` in [0, 1]; ``grad=True`` keeps the graph."""
        with torch.enable_grad() if grad else torch.no_grad():
            return self.decode_images(latents)

    @torch.no_grad()
    def encode_media(self, media: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] → ``[B, C, h, w]`` latents: the VAE posterior mean, shifted and scaled as
        diffusers' training scripts do (``(z − shift)·scaling_factor``), in float32."""
        vae = self.pipeline.vae
        z = vae.encode(to_vae_range(media.to(self.device, vae.dtype))).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((z.float() - shift) * vae.config.scaling_factor)


class StableDiffusionAdapter(DDIMUNetAdapter):
    """Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): ε- or v-prediction UNet, one CLIP text encoder.

    >>> # adapter = load_generator("path/to/sd15"); r = adapter.rollout(["a red cube"], steps=20, eta=1.0)
    """

    family = "stable-diffusion"
    pipeline_classes = ("StableDiffusionPipeline",)

    def encode_condition(self, prompts: list[str], negative_prompts: list[str], guidance: float, *, height: int,
                         width: int) -> Condition:
        cfg = uses_cfg(guidance)
        # None (not [""]*B) for all-empty negatives: the stock pipelines treat None specially (SDXL zeroes it).
        negatives = negative_prompts if any(negative_prompts) else None
        embeds, negative = self.pipeline.encode_prompt(prompts, self.device, 1, cfg, negatives)
        return Condition(embeds, negative if cfg else None)


class StableDiffusionXLAdapter(DDIMUNetAdapter):
    """SDXL (``StableDiffusionXLPipeline``): two text encoders, pooled embeddings and size/crop ``time_ids`` as the
    UNet's added conditioning (``text_embeds [B, D_pool]``, ``time_ids [B, 6]``)."""

    family = "stable-diffusion-xl"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    def __init__(self, pipeline: Any, **kwargs: Any) -> None:
        super().__init__(pipeline, **kwargs)
        vae = pipeline.vae
        # SDXL's VAE overflows in fp16 (config.force_upcast); the stock pipeline upcasts it to decode, and so do we.
        if self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)

    def encode_condition(self, prompts: list[str], negative_prompts: list[str], guidance: float, *, height: int,
                         width: int) -> Condition:
        pipe = self.pipeline
        cfg = uses_cfg(guidance)
        negatives = negative_prompts if any(negative_prompts) else None
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=negatives)
        projection_dim = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                          else int(pooled.shape[-1]))
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection_dim)
        time_ids = time_ids.to(self.device).repeat(len(prompts), 1)
        extras = {"text_embeds": pooled, "time_ids": time_ids}
        if not cfg:
            return Condition(embeds, None, extras)
        return Condition(embeds, negative, extras, {"text_embeds": negative_pooled, "time_ids": time_ids.clone()})


def step_eta_scale(plan: SamplingPlan, step_index: int) -> float:
    """The SDE-window factor of step ``step_index`` (1.0 for plans made before windows or without one)."""
    scale = plan.schedule.get("eta_scale")
    return 1.0 if scale is None else float(scale[step_index])
