"""Flow-matching image families with an SDE sampler and exact per-step log-probs: SD3/3.5 and FLUX.

Builds on :mod:`visalign.generators.base` (loop, seeds, LoRA, save/load) and
:func:`visalign.generators.flow_sde.sde_step` (Flow-GRPO / Dance-SDE / CPS step, docs/methods.md#flow-sde). The
denoiser calls mirror diffusers' ``StableDiffusion3Pipeline.__call__`` and ``FluxPipeline.__call__`` (release v0.42.1):
the same ``[uncond; cond]`` CFG batch for SD3, FLUX's packed 2×2 latents with its position ids and distilled guidance
embedding, and the scheduler's own sigmas, shift and resolution-dependent ``mu`` (never recomputed here). With noise
level 0 every step is the scheduler's Euler step, so a rollout reproduces the stock pipeline's image for the same
per-sample generators (tested to 1e-4).

:class:`FlowMatchingAdapter` is shared with the video families in :mod:`visalign.generators.flow_video`.
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
from visalign.generators.denoising_loss import (
    GeneratorLike,
    check_timesteps,
    draw_logit_normal,
    flow_noised_and_target,
    flow_x0_from_prediction,
)
from visalign.generators.flow_sde import LOGP_MODES, SDE_MODES, sde_step
from visalign.generators.rollout import Rollout, check_sde_window, sde_window_mask
from visalign.media import from_vae_range


class FlowMatchingAdapter(GeneratorAdapter):
    """Shared machinery of rectified-flow families: the schedule, the SDE transition, SDE windows.

    The trajectory is stored in the layout the VAE expects (``[B, C, h, w]`` images, the pipeline's own 5-D layout
    for video), not the transformer's packed token layout: packing is a permutation, so the element-wise SDE step is
    unchanged, and the initial noise is drawn in exactly the shape the stock pipeline draws it.

    Subclasses implement ``encode_condition``, ``denoise`` (the guided velocity), ``sequence_length`` (for dynamic
    shifting), ``latent_shape``, ``decode`` and ``default_resolution``, and override ``inference_sigmas`` when the
    stock pipeline passes its own sigmas.
    """

    denoiser_name = "transformer"
    sde_mode: str = "flowgrpo"
    logp_mode: str = "exact"
    sde_window: tuple[int, int] | None = None

    def configure_sde(self, mode: str | None = None, logp_mode: str | None = None,
                      window: tuple[int, int] | None | str = "keep") -> FlowMatchingAdapter:
        """Choose the stochastic step used by later rollouts.

        Args:
            mode: ``"flowgrpo"`` (default), ``"dance"`` or ``"cps"`` (docs/methods.md#flow-sde).
            logp_mode: ``"exact"`` (normalised density) or ``"flowgrpo_compat"`` (CPS's reference "log-prob");
                re-tune the PPO clip range when switching, and never mix the two within one run.
            window: half-open ``(start, stop)`` step range sampled with the SDE; the other steps use the ODE (noise
                level 0) and have no log-prob (Flow-GRPO-Fast / MixGRPO style). None: SDE on every step.

        Returns:
            ``self``, for chaining.
        """
        if mode is not None:
            if mode not in SDE_MODES:
                raise ValueError(f"Unknown SDE mode {mode!r}; use one of {SDE_MODES}.")
            self.sde_mode = mode
        if logp_mode is not None:
            if logp_mode not in LOGP_MODES:
                raise ValueError(f"Unknown logp_mode {logp_mode!r}; use one of {LOGP_MODES}.")
            self.logp_mode = logp_mode
        if window != "keep":
            self.sde_window = check_sde_window(window)
        return self

    # -- schedule --
    def sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        """Number of transformer tokens for one sample's latents (what a dynamic shift ``mu`` depends on)."""
        raise NotImplementedError

    def shift_mu(self, latent_shape: tuple[int, ...]) -> float | None:
        """The resolution-dependent shift ``mu`` when the scheduler uses dynamic shifting, else None.

        The same linear interpolation between ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len,
        max_shift)`` that the stock FLUX, LTX and SD3 pipelines compute (``calculate_shift``), from the
        scheduler's config.
        """
        config = self.pipeline.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        return calculate_shift(self.sequence_length(latent_shape), config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.15))

    def inference_sigmas(self, steps: int) -> Any:
        """Custom sigmas the stock pipeline hands to ``set_timesteps`` (FLUX, LTX: ``linspace(1, 1/S, S)``), or
        None to let the scheduler space them (SD3, Wan)."""
        return None

    def make_schedule(self, steps: int, *, height: int, width: int,
                      num_frames: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        """``timesteps [S]`` (float, descending), ``sigmas [S+1]`` (float32, ending at 0) and ``sde_mask [S]`` (1 where
        the step is stochastic), from the scheduler's own ``set_timesteps`` called as the stock pipeline calls it
        (resolution-dependent ``mu`` included)."""
        scheduler = self.pipeline.scheduler
        mu = self.shift_mu(self.latent_shape(height, width, num_frames))
        kwargs = {} if mu is None else {"mu": mu}
        sigmas = self.inference_sigmas(steps)
        if sigmas is None:
            scheduler.set_timesteps(steps, device=self.device, **kwargs)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, **kwargs)
        timesteps = scheduler.timesteps.clone().to(self.device)
        sigmas = scheduler.sigmas.clone().float().to(self.device)
        if len(sigmas) != len(timesteps) + 1:
            raise ValueError(f"Scheduler returned {len(sigmas)} sigmas for {len(timesteps)} timesteps; expected one "
                             "more sigma than timesteps (FlowMatchEulerDiscreteScheduler).")
        return timesteps, {"sigmas": sigmas, "sde_mask": sde_window_mask(self.sde_window, len(timesteps), self.device)}

    # -- the flow-matching training loss (denoising_loss) --
    def training_timesteps(self, latents: Tensor, generator: GeneratorLike) -> Tensor:
        """Noise levels ``s`` float32 ``[B]``: logit-normal ``u``, moved by the scheduler's sampling shift (static
        ``shift``, or ``time_shift(mu)`` at this latent size with dynamic shifting); see
        :mod:`visalign.generators.denoising_loss`."""
        u = draw_logit_normal(latents.shape[0], generator, self.device)
        return self.shift_sigmas(u, tuple(latents.shape[1:]))

    def shift_sigmas(self, u: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
        """Apply the scheduler's sigma shift to unshifted levels ``u`` in [0, 1] (float32, any shape)."""
        scheduler = self.pipeline.scheduler
        mu = self.shift_mu(latent_shape)
        if mu is not None:
            return scheduler.time_shift(mu, 1.0, u).float()
        shift = float(scheduler.config.get("shift", 1.0))
        return shift * u / (1 + (shift - 1) * u)

    def check_training_timesteps(self, timesteps: Tensor | Sequence[float], batch: int) -> Tensor:
        return check_timesteps(timesteps, batch, discrete=False, upper=1.0, device=self.device)

    def noised_and_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        noisy, target = flow_noised_and_target(x0, noise, timesteps)
        # The transformers take the scheduler's timestep units, s·T_train (FLUX divides by 1000 again inside denoise).
        return noisy, target, timesteps * self.pipeline.scheduler.config.num_train_timesteps

    def x0_from_prediction(self, noisy: Tensor, prediction: Tensor, timesteps: Tensor) -> Tensor:
        return flow_x0_from_prediction(noisy, prediction, timesteps)

    def step_noise_levels(self, rollout: Rollout) -> Tensor:
        """The sigma each step starts from, ``s`` float32 (the schedule's ``sigmas[:-1]``)."""
        return rollout.schedule["sigmas"][:-1].float()

    def transition(self, plan: SamplingPlan, latents: Tensor, step_index: int, *, prev_sample: Tensor | None = None,
                   noise: Tensor | None = None) -> StepOutput:
        sigmas = plan.schedule["sigmas"]
        noise_level = plan.eta * float(plan.schedule["sde_mask"][step_index])
        v_hat = self.predict(plan, latents, step_index)
        out = sde_step(v_hat, sigmas[step_index], sigmas[step_index + 1], latents, noise_level,
                       prev_sample=prev_sample, noise=noise, mode=self.sde_mode, logp_mode=self.logp_mode,
                       sigma_at_one=float(sigmas[1]) if len(sigmas) > 2 else None, storage_dtype=latents.dtype)
        sample = prev_sample if prev_sample is not None else out.prev_sample.to(latents.dtype)
        # x_s = (1 − s)·x0 + s·ε and v = ε − x0; a tensor σ, not float(), so a CUDA step does not sync on it
        x0 = latents.float() - sigmas[step_index].float() * v_hat.float()
        return StepOutput(sample, out.mean, out.std, out.logp_mean, out.logp_sum, x0)

    uses_cfg_batch: bool = True

    def _use_cfg(self, condition: Condition, guidance: float) -> bool:
        cfg = uses_cfg(guidance) and self.uses_cfg_batch
        if cfg and not condition.guided:
            raise ValueError(f"guidance={guidance} needs negative embeddings; encode the condition with CFG on.")
        return cfg

    def _vae_decode(self, latents: Tensor, grad: bool) -> Tensor:
        vae = self.pipeline.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
            image = vae.decode(z, return_dict=False)[0]
        return from_vae_range(image.float())


class StableDiffusion3Adapter(FlowMatchingAdapter):
    """Stable Diffusion 3 / 3.5 (MMDiT, three text encoders, CFG on a ``[uncond; cond]`` batch)."""

    family = "sd3"
    modality = "image"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    max_sequence_length = 256  # the stock pipeline's default T5 length; rollouts must match it for parity

    @property
    def resolution_multiple(self) -> int:
        return int(self.denoiser.config.patch_size)

    def default_resolution(self) -> tuple[int, int]:
        size = int(self.pipeline.default_sample_size) * self.vae_scale_factor()
        return size, size

    def latent_shape(self, height: int, width: int, num_frames: int | None) -> tuple[int, ...]:
        if num_frames is not None:
            raise ValueError("SD3 is an image model; leave num_frames unset.")
        f = self.vae_scale_factor()
        return (int(self.denoiser.config.in_channels), height // f, width // f)

    def encode_condition(self, prompts: list[str], negative_prompts: list[str], guidance: float, *, height: int,
                         width: int) -> Condition:
        cfg = uses_cfg(guidance)
        embeds, neg, pooled, neg_pooled = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=negative_prompts if cfg else None,
            do_classifier_free_guidance=cfg, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        if not cfg:
            return Condition(embeds, extras={"pooled_projections": pooled})
        return Condition(embeds, neg, {"pooled_projections": pooled}, {"pooled_projections": neg_pooled})

    def sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        patch = int(self.denoiser.config.patch_size)
        return (latent_shape[-2] // patch) * (latent_shape[-1] // patch)

    def denoise(self, latents: Tensor, timesteps: Tensor, condition: Condition, guidance: float) -> Tensor:
        """Guided velocity ``[B, C, h, w]``; CFG as one ``[uncond; cond]`` batch, as the stock pipeline."""
        cfg = self._use_cfg(condition, guidance)
        x = latents.to(self.dtype)
        x_in = torch.cat([x, x]) if cfg else x
        embeds = torch.cat([condition.negative_embeds, condition.embeds]) if cfg else condition.embeds
        pooled = condition.extras["pooled_projections"]
        if cfg:
            pooled = torch.cat([condition.negative_extras["pooled_projections"], pooled])
        t = cfg_timesteps(torch.as_tensor(timesteps, device=self.device), x.shape[0], cfg)
        pred = self.denoiser(hidden_states=x_in, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                             return_dict=False)[0]
        if cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = guide(pred_uncond, pred_cond, guidance)
        return pred

    def decode(self, latents: Tensor, *, grad: bool = False) -> Tensor:
        """``[B, C, h, w]`` latents → float32 images ``[B, 3, H, W]`` in [0, 1] (VAE scaling and shift undone)."""
        return self._vae_decode(latents, grad)


class FluxAdapter(FlowMatchingAdapter):
    """FLUX.1 (dev/schnell): packed 2×2 latent tokens, CLIP pooled + T5 sequence embeddings.

    FLUX.1-dev is guidance-*distilled*: ``guidance`` is fed to the transformer's guidance embedding (the stock
    pipeline's ``guidance_scale``), there is no unconditional branch, and negative prompts are ignored. For a
    transformer without a guidance embedding (schnell) ``guidance`` has no effect.
    """

    family = "flux"
    modality = "image"
    pipeline_classes = ("FluxPipeline",)
    uses_cfg_batch = False
    # denoising_loss feeds this to the guidance embedding: diffusers' train_dreambooth_lora_flux.py default.
    loss_guidance = 3.5
    max_sequence_length = 512
    resolution_multiple = 2  # latents are packed in 2×2 patches

    def default_resolution(self) -> tuple[int, int]:
        size = int(self.pipeline.default_sample_size) * self.vae_scale_factor()
        return size, size

    def latent_shape(self, height: int, width: int, num_frames: int | None) -> tuple[int, ...]:
        if num_frames is not None:
            raise ValueError("FLUX is an image model; leave num_frames unset.")
        f = self.vae_scale_factor()
        return (int(self.denoiser.config.in_channels) // 4, height // f, width // f)

    def encode_condition(self, prompts: list[str], negative_prompts: list[str], guidance: float, *, height: int,
                         width: int) -> Condition:
        embeds, pooled, _ = self.pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                        num_images_per_prompt=1,
                                                        max_sequence_length=self.max_sequence_length)
        return Condition(embeds, extras={"pooled_projections": pooled})

    def sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)

    def inference_sigmas(self, steps: int) -> Any:
        import numpy as np

        if self.pipeline.scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / steps, steps)

    def denoise(self, latents: Tensor, timesteps: Tensor, condition: Condition, guidance: float) -> Tensor:
        """Velocity ``[B, C, h, w]`` (unpacked); ``guidance`` feeds the distilled guidance embedding."""
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        tokens = FluxPipeline._pack_latents(latents.to(self.dtype), b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)
        txt_ids = torch.zeros(condition.embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance_in = None
        if self.denoiser.config.guidance_embeds:
            guidance_in = torch.full([b], guidance, device=self.device, dtype=torch.float32)
        t = cfg_timesteps(torch.as_tensor(timesteps, device=self.device), b, False).to(self.dtype)
        pred = self.denoiser(hidden_states=tokens, timestep=t / 1000, guidance=guidance_in,
                             pooled_projections=condition.extras["pooled_projections"],
                             encoder_hidden_states=condition.embeds, txt_ids=txt_ids, img_ids=img_ids,
                             return_dict=False)[0]
        f = self.vae_scale_factor()
        return FluxPipeline._unpack_latents(pred, h * f, w * f, f)

    def decode(self, latents: Tensor, *, grad: bool = False) -> Tensor:
        """``[B, C, h, w]`` (unpacked) latents → float32 images ``[B, 3, H, W]`` in [0, 1]."""
        return self._vae_decode(latents, grad)
