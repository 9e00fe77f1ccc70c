"""CogVideoX text-to-video with a stochastic DDIM sampler (η > 0) and exact per-step log-probs.

CogVideoX is a v-prediction model sampled by ``CogVideoXDDIMScheduler`` (zero-terminal-SNR, SNR-shifted
``alphas_cumprod``, trailing spacing). Its deterministic step ``x' = a_t·x + b_t·x0_hat`` is DDIM at η = 0 written in
another form, so the stochastic policy is the DDIM step of docs/methods.md#ddim-logprob with the v-prediction formulas
``x0_hat = sqrt(ᾱ)·x − sqrt(1−ᾱ)·v`` and ``eps_hat = sqrt(ᾱ)·v + sqrt(1−ᾱ)·x``, computed by
:func:`visalign.generators.ddim_logprob.ddim_step_with_logprob` from the scheduler's *own* ``alphas_cumprod`` and
``final_alpha_cumprod`` (never recomputed). The denoiser call mirrors diffusers' ``CogVideoXPipeline.__call__``
(release v0.42.1): one ``[uncond; cond]`` batch, float32 guidance, rotary embeddings when the transformer uses them,
latents laid out ``[B, F', C, h, w]``. With η = 0 a rollout reproduces the stock pipeline's video (tested to 1e-4).

Not supported (clear errors): CogVideoX's multistep ``CogVideoXDPMScheduler`` is replaced by DDIM with the same
training schedule (its multistep update has no single-step Gaussian density), dynamic CFG, and CogVideoX 1.5's
temporal patching when it would pad frames.
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
from visalign.media import from_vae_range


class CogVideoXAdapter(GeneratorAdapter):
    """``CogVideoXPipeline`` (2b/5b text-to-video); ``eta`` is DDIM's η (0: the stock deterministic sampler)."""

    family = "cogvideox"
    modality = "video"
    pipeline_classes = ("CogVideoXPipeline",)
    denoiser_name = "transformer"
    max_sequence_length = 226  # the stock pipeline's default; rollouts must use the same for parity
    default_num_frames = 49

    def __init__(self, pipeline: Any, **kwargs: Any) -> None:
        from diffusers import CogVideoXDDIMScheduler

        if not isinstance(pipeline.scheduler, CogVideoXDDIMScheduler):
            # Same betas, SNR shift and prediction type; only the update rule changes to single-step DDIM.
            pipeline.scheduler = CogVideoXDDIMScheduler.from_config(pipeline.scheduler.config)
        if pipeline.scheduler.config.prediction_type != "v_prediction":
            raise ValueError(f"CogVideoX checkpoints are v-prediction; this scheduler says "
                             f"{pipeline.scheduler.config.prediction_type!r}. Fix scheduler_config.json.")
        super().__init__(pipeline, **kwargs)

    # -- sizes --
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor_spatial)

    @property
    def resolution_multiple(self) -> int:
        return int(self.denoiser.config.patch_size)

    def default_resolution(self) -> tuple[int, int]:
        return 480, 720

    def latent_shape(self, height: int, width: int, num_frames: int | None) -> tuple[int, ...]:
        frames = num_frames or self.default_num_frames
        temporal = int(self.pipeline.vae_scale_factor_temporal)
        latent_frames = (frames - 1) // temporal + 1
        patch_t = self.denoiser.config.patch_size_t
        if patch_t is not None and latent_frames % patch_t:
            raise ValueError(f"num_frames={frames} gives {latent_frames} latent frames, not a multiple of the "
                             f"transformer's temporal patch {patch_t}; pick num_frames so that "
                             f"((num_frames − 1) // {temporal} + 1) is divisible by {patch_t}.")
        f = self.vae_scale_factor()
        return (latent_frames, int(self.denoiser.config.in_channels), height // f, width // f)

    # -- condition and schedule --
    def encode_condition(self, prompts: list[str], negative_prompts: list[str], guidance: float, *, height: int,
                         width: int) -> Condition:
        cfg = uses_cfg(guidance)
        embeds, neg = self.pipeline.encode_prompt(
            prompt=prompts, negative_prompt=negative_prompts if cfg else None, do_classifier_free_guidance=cfg,
            num_videos_per_prompt=1, max_sequence_length=self.max_sequence_length, device=self.device)
        return Condition(embeds, neg if cfg else None)

    def make_schedule(self, steps: int, *, height: int, width: int,
                      num_frames: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        """``timesteps [S]`` (long, descending) and ``prev_timesteps [S]`` (``t − T_train // S``; < 0 means the
        final ``ᾱ``), exactly the scheduler's own step rule."""
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(steps, device=self.device)
        timesteps = scheduler.timesteps.clone()
        prev = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        return timesteps, {"prev_timesteps": prev}

    # -- the denoiser --
    def denoise(self, latents: Tensor, timesteps: Tensor, condition: Condition, guidance: float) -> Tensor:
        """Guided v-prediction, float32 ``[B, F', C, h, w]``."""
        cfg = uses_cfg(guidance)
        if cfg and not condition.guided:
            raise ValueError(f"guidance={guidance} needs negative embeddings; encode the condition with CFG on.")
        x = latents.to(self.dtype)
        x_in = torch.cat([x, x]) if cfg else x
        embeds = torch.cat([condition.negative_embeds, condition.embeds]) if cfg else condition.embeds
        t = cfg_timesteps(torch.as_tensor(timesteps, device=self.device), x.shape[0], cfg)
        rotary = None
        if self.denoiser.config.use_rotary_positional_embeddings:
            f = self.vae_scale_factor()
            rotary = self.pipeline._prepare_rotary_positional_embeddings(x.shape[-2] * f, x.shape[-1] * f,
                                                                         x.shape[1], self.device)
        pred = self.denoiser(hidden_states=x_in, encoder_hidden_states=embeds, timestep=t, image_rotary_emb=rotary,
                             return_dict=False)[0].float()
        if cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = guide(pred_uncond, pred_cond, guidance)
        return pred

    # -- the v-prediction DDPM training loss (denoising_loss), on the scheduler's SNR-shifted ᾱ --
    def training_timesteps(self, latents: Tensor, generator: GeneratorLike) -> Tensor:
        """``t ~ U{0..T−1}``, long ``[B]`` (CogVideoX's own fine-tuning scripts draw t uniformly too)."""
        return draw_ddpm_timesteps(latents.shape[0], self.pipeline.scheduler.config.num_train_timesteps, generator,
                                   self.device)

    def check_training_timesteps(self, timesteps: Tensor | Sequence[float], batch: int) -> Tensor:
        return check_timesteps(timesteps, batch, discrete=True, device=self.device,
                               upper=self.pipeline.scheduler.config.num_train_timesteps)

    def noised_and_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        noisy, target = ddpm_noised_and_target(x0, noise, timesteps, self.pipeline.scheduler.alphas_cumprod,
                                               "v_prediction")
        return noisy, target, timesteps

    def x0_from_prediction(self, noisy: Tensor, prediction: Tensor, timesteps: Tensor) -> Tensor:
        return ddpm_x0_from_prediction(noisy, prediction, timesteps, self.pipeline.scheduler.alphas_cumprod,
                                       "v_prediction")

    def step_noise_levels(self, rollout: Any) -> Tensor:
        """The DDIM timesteps themselves (training units already)."""
        return rollout.timesteps.long()

    def transition(self, plan: SamplingPlan, latents: Tensor, step_index: int, *, prev_sample: Tensor | None = None,
                   noise: Tensor | None = None) -> StepOutput:
        scheduler = self.pipeline.scheduler
        v_hat = self.predict(plan, latents, step_index)
        step = ddim_step_with_logprob(
            v_hat, plan.timesteps[step_index], plan.schedule["prev_timesteps"][step_index], latents,
            scheduler.alphas_cumprod, scheduler.final_alpha_cumprod, eta=plan.eta, prediction_type="v_prediction",
            clip_sample_range=scheduler.config.clip_sample_range if scheduler.config.clip_sample else None,
            prev_sample=prev_sample, noise=noise)
        return StepOutput(step.prev_sample, step.mean, step.std, step.log_prob_mean, step.log_prob_sum,
                          step.pred_original_sample)

    def decode(self, latents: Tensor, *, grad: bool = False) -> Tensor:
        """``[B, F', C, h, w]`` latents → float32 videos ``[B, F, 3, H, W]`` in [0, 1]."""
        vae = self.pipeline.vae
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            z = latents.to(vae.dtype).permute(0, 2, 1, 3, 4) / self.pipeline.vae_scaling_factor_image
            video = vae.decode(z).sample
        return from_vae_range(video.float().permute(0, 2, 1, 3, 4))
