"""Video UNet families with a DDIM sampler (η > 0 for log-probs): AnimateDiff and TextToVideoSD (ModelScope).

Same DDIM policy as :mod:`visalign.generators.unet`; only the latent layout changes to ``[B, C, F, h, w]`` and the
media to ``[B, T, 3, H, W]``. The denoiser calls mirror diffusers' ``AnimateDiffPipeline.__call__`` (prompt
embeddings repeated per frame) and ``TextToVideoSDPipeline.__call__`` (release v0.42.1), so that with η = 0 a
rollout reproduces the stock pipeline's video for the same per-sample generators.
"""

from __future__ import annotations

import torch
from torch import Tensor

from visalign.generators.base import Condition, uses_cfg
from visalign.generators.unet import DDIMUNetAdapter


class VideoDDIMUNetAdapter(DDIMUNetAdapter):
    """Shared video layout: latents ``[B, C, F, h, w]``, media ``[B, T, 3, H, W]``, frames decoded one by one."""

    modality = "video"
    default_num_frames = 16

    def encode_condition(self, prompts: list[str], negative_prompts: list[str], guidance: float, *, height: int,
                         width: int) -> Condition:
        cfg = uses_cfg(guidance)
        negatives = negative_prompts if any(negative_prompts) else None
        embeds, negative = self.pipeline.encode_prompt(prompts, self.device, 1, cfg, negatives)
        return Condition(embeds, negative if cfg else None)

    def latent_shape(self, height: int, width: int, num_frames: int | None) -> tuple[int, ...]:
        frames = self.default_num_frames if num_frames is None else num_frames
        if frames < 1:
            raise ValueError(f"num_frames must be ≥ 1; got {num_frames}.")
        f = self.vae_scale_factor()
        return (self.denoiser.config.in_channels, frames, height // f, width // f)

    def decode(self, latents: Tensor, *, grad: bool = False) -> Tensor:
        """Latents ``[B, C, F, h, w]`` → float32 ``[B, F, 3, H, W]`` in [0, 1]."""
        batch, channels, frames, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, h, w)
        with torch.enable_grad() if grad else torch.no_grad():
            images = self.decode_images(flat)
        return images.reshape(batch, frames, *images.shape[1:])


class AnimateDiffAdapter(VideoDDIMUNetAdapter):
    """AnimateDiff (``AnimateDiffPipeline``): an SD UNet with motion modules (``UNetMotionModel``)."""

    family = "animatediff"
    pipeline_classes = ("AnimateDiffPipeline",)

    def call_denoiser(self, model_input: Tensor, t: Tensor, embeds: Tensor, extras: dict[str, Tensor]) -> Tensor:
        # The motion UNet folds frames into the batch, so it wants one text embedding per (sample, frame).
        embeds = embeds.repeat_interleave(model_input.shape[2], dim=0)
        return self.denoiser(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]


class TextToVideoSDAdapter(VideoDDIMUNetAdapter):
    """ModelScope text-to-video (``TextToVideoSDPipeline``): a ``UNet3DConditionModel``."""

    family = "text-to-video-sd"
    pipeline_classes = ("TextToVideoSDPipeline",)
