"""Flow-matching video families with an SDE sampler and exact per-step log-probs: Wan 2.x and LTX-Video.

Builds on :class:`visalign.generators.flow.FlowMatchingAdapter` (schedule, SDE transition, windows) and
:func:`visalign.generators.flow_sde.sde_step`, whose noise level broadcasts over every non-batch dim of the 5-D
latents ``[B, C, F', h, w]``. The denoiser call mirrors diffusers' ``WanPipeline.__call__`` (release v0.42.1): two
forward passes (conditional, then unconditional) combined as ``u + w·(c − u)``, float32 latents cast to the
transformer's dtype, per-token timesteps when ``expand_timesteps`` (Wan 2.2 TI2V), and the VAE's per-channel latent
mean/std undone before decoding; and ``LTXPipeline.__call__``: one ``[uncond; cond]`` batch with attention masks,
packed latent tokens with rotary interpolation scales, a resolution-dependent shift ``mu`` of the scheduler's sigmas.
With noise level 0 a rollout reproduces the stock pipeline's video (tested to 1e-4).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from visalign.generators.base import Condition, cfg_timesteps, guide, uses_cfg
from visalign.generators.flow import FlowMatchingAdapter
from visalign.media import from_vae_range


class WanAdapter(FlowMatchingAdapter):
    """Wan 2.1 / 2.2 single-transformer text-to-video (``WanPipeline``).

    Wan 2.2 A14B's two-expert variant (``transformer_2`` with a ``boundary_ratio``) is refused with a clear error:
    LoRA, checkpoints and the per-step denoiser switch would all need a second trainable module.
    """

    family = "wan"
    modality = "video"
    pipeline_classes = ("WanPipeline",)
    max_sequence_length = 512  # the stock pipeline's default; rollouts must use the same for parity
    default_num_frames = 81

    def __init__(self, pipeline: Any, **kwargs: Any) -> None:
        if getattr(pipeline, "transformer_2", None) is not None:
            raise ValueError("This Wan pipeline has two transformers (Wan 2.2 A14B experts); visalign trains one "
                             "denoiser. Use a single-transformer Wan (2.1, or 2.2 TI2V-5B).")
        super().__init__(pipeline, **kwargs)

    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor_spatial)

    @property
    def resolution_multiple(self) -> int:
        return int(self.denoiser.config.patch_size[1])

    def default_resolution(self) -> tuple[int, int]:
        return 480, 832

    def latent_shape(self, height: int, width: int, num_frames: int | None) -> tuple[int, ...]:
        return video_latent_shape(int(self.denoiser.config.in_channels), num_frames or self.default_num_frames,
                                  int(self.pipeline.vae_scale_factor_temporal), self.vae_scale_factor(), height, width)

    def encode_condition(self, prompts: list[str], negative_prompts: list[str], guidance: float, *, height: int,
                         width: int) -> Condition:
        cfg = uses_cfg(guidance)
        embeds, neg = self.pipeline.encode_prompt(
            prompt=prompts, negative_prompt=negative_prompts if cfg else None, do_classifier_free_guidance=cfg,
            num_videos_per_prompt=1, max_sequence_length=self.max_sequence_length, device=self.device)
        dtype = self.denoiser.dtype
        return Condition(embeds.to(dtype), neg.to(dtype) if cfg else None)

    def sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        _, p_h, p_w = self.denoiser.config.patch_size
        return latent_shape[1] * (latent_shape[2] // p_h) * (latent_shape[3] // p_w)

    def initial_noise_scale(self) -> float:
        return 1.0

    def denoise(self, latents: Tensor, timesteps: Tensor, condition: Condition, guidance: float) -> Tensor:
        """Guided velocity ``[B, C, F', h, w]``: two forwards (cond, then uncond) as the stock Wan pipeline."""
        cfg = self._use_cfg(condition, guidance)
        x = latents.to(self.denoiser.dtype)
        t = cfg_timesteps(torch.as_tensor(timesteps, device=self.device), x.shape[0], False)
        if self.pipeline.config.expand_timesteps:
            # One timestep per latent token (Wan 2.2 TI2V): the stock pipeline's mask[0][0][:, ::2, ::2] * t.
            tokens = torch.ones_like(x[0, 0, :, ::2, ::2], dtype=torch.float32).flatten()
            t = tokens.unsqueeze(0) * t.float().unsqueeze(1)
        pred = self.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=condition.embeds,
                             return_dict=False)[0]
        if cfg:
            uncond = self.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=condition.negative_embeds,
                                   return_dict=False)[0]
            pred = guide(uncond, pred, guidance)
        return pred

    def decode(self, latents: Tensor, *, grad: bool = False) -> Tensor:
        """``[B, C, F', h, w]`` latents → float32 videos ``[B, F, 3, H, W]`` in [0, 1]."""
        vae = self.pipeline.vae
        z_dim = vae.config.z_dim
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            z = latents.to(vae.dtype)
            mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(z.device, z.dtype)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(z.device, z.dtype)
            video = vae.decode(z / inv_std + mean, return_dict=False)[0]
        return from_vae_range(video.float().permute(0, 2, 1, 3, 4))


class LTXAdapter(FlowMatchingAdapter):
    """LTX-Video text-to-video (``LTXPipeline``); latents are stored unpacked, ``[B, C, F', h, w]``.

    Decoding uses the stock defaults ``decode_timestep = 0`` and ``decode_noise_scale = 0`` (no decode noise), so
    decoding is deterministic; ``guidance_rescale`` is not applied (the stock default is 0).
    """

    family = "ltx"
    modality = "video"
    pipeline_classes = ("LTXPipeline",)
    max_sequence_length = 128  # the stock pipeline's default
    default_num_frames = 161
    frame_rate = 25  # frames per second; sets the temporal rotary interpolation scale, as the stock default

    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_spatial_compression_ratio)

    @property
    def resolution_multiple(self) -> int:
        return int(self.pipeline.transformer_spatial_patch_size)

    def default_resolution(self) -> tuple[int, int]:
        return 512, 704

    def latent_shape(self, height: int, width: int, num_frames: int | None) -> tuple[int, ...]:
        temporal = int(self.pipeline.vae_temporal_compression_ratio)
        return video_latent_shape(int(self.denoiser.config.in_channels), num_frames or self.default_num_frames,
                                  temporal, self.vae_scale_factor(), height, width)

    def encode_condition(self, prompts: list[str], negative_prompts: list[str], guidance: float, *, height: int,
                         width: int) -> Condition:
        cfg = uses_cfg(guidance)
        embeds, mask, neg, neg_mask = self.pipeline.encode_prompt(
            prompt=prompts, negative_prompt=negative_prompts if cfg else None, do_classifier_free_guidance=cfg,
            num_videos_per_prompt=1, max_sequence_length=self.max_sequence_length, device=self.device)
        if not cfg:
            return Condition(embeds, extras={"encoder_attention_mask": mask})
        return Condition(embeds, neg, {"encoder_attention_mask": mask}, {"encoder_attention_mask": neg_mask})

    def sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        # The stock LTX pipeline computes mu from latent frames·height·width (before patching); so do we.
        return latent_shape[1] * latent_shape[2] * latent_shape[3]

    def inference_sigmas(self, steps: int) -> Any:
        import numpy as np

        return np.linspace(1.0, 1 / steps, steps)

    def denoise(self, latents: Tensor, timesteps: Tensor, condition: Condition, guidance: float) -> Tensor:
        """Guided velocity ``[B, C, F', h, w]`` (unpacked); CFG as one ``[uncond; cond]`` batch with masks."""
        from diffusers import LTXPipeline

        cfg = self._use_cfg(condition, guidance)
        pipe = self.pipeline
        p, p_t = pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
        _, _, frames, h, w = latents.shape
        tokens = LTXPipeline._pack_latents(latents, p, p_t).to(self.dtype)
        x_in = torch.cat([tokens, tokens]) if cfg else tokens
        embeds = torch.cat([condition.negative_embeds, condition.embeds]) if cfg else condition.embeds
        mask = condition.extras["encoder_attention_mask"]
        if cfg:
            mask = torch.cat([condition.negative_extras["encoder_attention_mask"], mask])
        spatial = pipe.vae_spatial_compression_ratio
        rope_scale = (pipe.vae_temporal_compression_ratio / self.frame_rate, spatial, spatial)
        t = cfg_timesteps(torch.as_tensor(timesteps, device=self.device), tokens.shape[0], cfg)
        pred = self.denoiser(hidden_states=x_in, encoder_hidden_states=embeds, timestep=t,
                             encoder_attention_mask=mask, num_frames=frames // p_t, height=h // p, width=w // p,
                             rope_interpolation_scale=rope_scale, return_dict=False)[0].float()
        if cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = guide(pred_uncond, pred_cond, guidance)
        return LTXPipeline._unpack_latents(pred, frames // p_t, h // p, w // p, p, p_t)

    def decode(self, latents: Tensor, *, grad: bool = False) -> Tensor:
        """``[B, C, F', h, w]`` latents → float32 videos ``[B, F, 3, H, W]`` in [0, 1]."""
        from diffusers import LTXPipeline

        vae = self.pipeline.vae
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            z = LTXPipeline._denormalize_latents(latents.to(vae.dtype), vae.latents_mean, vae.latents_std,
                                                  vae.config.scaling_factor)
            timestep = None
            if vae.config.timestep_conditioning:
                timestep = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)  # stock decode_timestep = 0
            video = vae.decode(z, timestep, return_dict=False)[0]
        return from_vae_range(video.float().permute(0, 2, 1, 3, 4))


def video_latent_shape(channels: int, frames: int, temporal: int, spatial: int, height: int,
                       width: int) -> tuple[int, int, int, int]:
    """``(C, F', H/f, W/f)`` of a causal video VAE that keeps the first frame and compresses the rest by ``temporal``.

    Raises:
        ValueError: when ``frames`` is not 1 + a multiple of ``temporal``, naming the two nearest valid counts.
    """
    if frames < 1 or (frames - 1) % temporal:
        lower = max(1, (frames - 1) // temporal * temporal + 1)
        raise ValueError(f"num_frames={frames} must be 1 + a multiple of {temporal} (the VAE's temporal factor); "
                         f"use {lower} or {lower + temporal}.")
    return (channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)
