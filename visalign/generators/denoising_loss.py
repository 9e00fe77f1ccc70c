"""The per-sample denoising loss: the training objective a diffusion or flow model was pre-trained with.

Offline and set-based objectives (Diffusion-DPO and its flow port, docs/methods.md#diffusion-dpo; DRAGON's DPO/KTO
surrogates, §5; RAFT's supervised step, §10a) do not use rollout log-probs: they compare how well the model (and a
frozen reference) denoises a clean sample at a random noise level. This file holds the family-independent pieces;
:meth:`visalign.generators.base.GeneratorAdapter.denoising_loss` assembles them with the family's own denoiser call.

- DDPM (UNet families, CogVideoX): ``t ~ U{0..T−1}``, ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε`` (the scheduler's
  ``add_noise``), target ε, ``v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0`` (``get_velocity``) or x0, per the scheduler's
  ``prediction_type`` (diffusers' train_text_to_image.py; SalesforceAIResearch/DiffusionDPO train.py).
- Rectified flow (SD3, FLUX, Wan, LTX): ``x_s = (1−s)·x0 + s·ε``, target ``ε − x0``. ``s`` is drawn logit-normal
  (``u = sigmoid(n)``, ``n ~ N(0, 1)``; the SD3 paper's default, diffusers' train_dreambooth_sd3.py
  ``weighting_scheme="logit_normal"``) and then moved by the *same* shift the scheduler applies when sampling: the
  static ``shift`` (SD3: 3.0, Wan: its config) or, with ``use_dynamic_shifting``, the resolution-dependent ``mu``
  (FLUX, LTX, SD3.5 with dynamic shifting). Using the sampling shift keeps the loss weighted where the sampler spends
  its steps. (impl. note: diffusers draws ``u`` into 1000 bins of the training sigmas; we keep it continuous.)

The sample ``ε`` and the noise level are returned so a second call (the LoRA-disabled reference, the other item of a
DPO pair) can reuse them exactly.

The denoiser's output converts to a clean-sample estimate ``x̂0`` at the same ``x_t`` (the forward-process objectives
DiffusionNFT and AWM, docs/methods.md#nft, compare or mix predictions there): DDPM ε: ``x̂0 = (x_t − sqrt(1−ᾱ)·ε̂) /
sqrt(ᾱ)``; v: ``x̂0 = sqrt(ᾱ)·x_t − sqrt(1−ᾱ)·v̂``; x0: ``x̂0 = ŷ``; flow: ``x̂0 = x_s − s·v̂``. Each is affine in the
prediction, and the training target maps to ``x0`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class DenoisingLoss:
    """Result of :meth:`GeneratorAdapter.denoising_loss`.

    Attributes:
        loss: float32 ``[B]``, per-sample MSE between the training target and the denoiser's prediction, averaged
            over every non-batch element (the mean-over-pixels convention Diffusion-DPO's β is calibrated to).
        timesteps: ``[B]``, the noise level of each sample: long DDPM timesteps in ``[0, T−1]`` (UNet, CogVideoX)
            or float32 flow noise levels ``s`` in ``(0, 1)`` (SD3, FLUX, Wan, LTX).
        noise: float32 ``[B, ...]`` (the latents' shape), the standard-normal ε used.
    """

    loss: Tensor
    timesteps: Tensor
    noise: Tensor


@dataclass
class NoisedLatents:
    """Clean latents moved by the forward process to one noise level each (the input of one training prediction).

    Attributes:
        x0: float32 ``[B, ...]``, the clean latents.
        noisy: float32 ``[B, ...]``, ``x_t`` (DDPM) or ``x_s`` (flow).
        target: float32 ``[B, ...]``, the pre-training target at ``noisy`` (ε, v or x0; flow ``ε − x0``).
        timesteps: ``[B]`` noise levels in the family's training units (long DDPM ``t`` or float flow ``s``).
        model_timesteps: ``[B]``, the same levels in the units the denoiser takes.
        noise: float32 ``[B, ...]``, the standard-normal ε used.
    """

    x0: Tensor
    noisy: Tensor
    target: Tensor
    timesteps: Tensor
    model_timesteps: Tensor
    noise: Tensor

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    def select(self, index: Sequence[int]) -> NoisedLatents:
        """The rows at ``index`` (micro-batches)."""
        idx = list(index)
        return NoisedLatents(self.x0[idx], self.noisy[idx], self.target[idx], self.timesteps[idx],
                             self.model_timesteps[idx], self.noise[idx])


def _draw(generator: GeneratorLike, batch: int, device: torch.device, draw) -> Tensor:
    """Call ``draw(generator_or_None, rows)`` once for the whole batch, or once per sample for a generator list.

    Per-sample generators make sample i's (t, ε) depend on its own generator alone, as rollout seeds do.
    """
    if generator is None:
        return draw(None, batch).to(device)
    if isinstance(generator, torch.Generator):
        return draw(generator, batch).to(device)
    generators = list(generator)
    if len(generators) != batch:
        raise ValueError(f"Got {len(generators)} generators for {batch} latents; pass one generator or one per "
                         "sample.")
    return torch.cat([draw(g, 1) for g in generators]).to(device)


def draw_noise(shape: Sequence[int], generator: GeneratorLike, device: torch.device) -> Tensor:
    """Standard-normal ε, float32 ``shape`` (``[B, ...]``), drawn on the generator's device then moved."""
    def draw(g, rows):
        return torch.randn((rows, *shape[1:]), generator=g, device=g.device if g is not None else device)

    return _draw(generator, shape[0], device, draw)


def draw_ddpm_timesteps(batch: int, num_train_timesteps: int, generator: GeneratorLike,
                        device: torch.device) -> Tensor:
    """``t ~ U{0..T−1}``, long ``[B]``."""
    def draw(g, rows):
        where = g.device if g is not None else device
        return torch.randint(0, num_train_timesteps, (rows,), generator=g, device=where)

    return _draw(generator, batch, device, draw)


def draw_logit_normal(batch: int, generator: GeneratorLike, device: torch.device, *, mean: float = 0.0,
                      std: float = 1.0) -> Tensor:
    """``u = sigmoid(n)``, ``n ~ N(mean, std²)``: float32 ``[B]`` in (0, 1) (before any shift)."""
    def draw(g, rows):
        return torch.randn((rows,), generator=g, device=g.device if g is not None else device)

    return torch.sigmoid(mean + std * _draw(generator, batch, device, draw))


def check_timesteps(timesteps: Tensor | Sequence[float], batch: int, *, discrete: bool, upper: float,
                    device: torch.device) -> Tensor:
    """Validate caller-given noise levels: ``[B]`` long in ``[0, upper)`` (DDPM) or float in ``[0, upper]`` (flow)."""
    t = torch.as_tensor(timesteps, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must have shape [{batch}] (one per latent); got {tuple(t.shape)}.")
    if discrete:
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("This family trains on integer DDPM timesteps; pass a long tensor in [0, T−1].")
        t = t.long()
        if t.min() < 0 or t.max() >= upper:
            raise ValueError(f"DDPM timesteps must lie in [0, {int(upper) - 1}]; got "
                             f"[{int(t.min())}, {int(t.max())}].")
        return t
    t = t.float()
    if t.min() < 0 or t.max() > upper:
        raise ValueError(f"Flow noise levels s must lie in [0, 1]; got [{float(t.min()):.4g}, {float(t.max()):.4g}]. "
                         "Pass sigmas, not scheduler timesteps (s·1000).")
    return t


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    return values.reshape(-1, *([1] * (ndim - 1)))


def ddpm_noised_and_target(x0: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor,
                           prediction_type: str) -> tuple[Tensor, Tensor]:
    """``(x_t, target)`` in float32 for DDPM training at integer ``timesteps [B]``.

    Args:
        x0, noise: float ``[B, ...]`` (4-D image or 5-D video latents).
        timesteps: long ``[B]`` in ``[0, T−1]``.
        alphas_cumprod: float ``[T]``, the scheduler's ``ᾱ`` (SNR-shifted for CogVideoX; never recomputed).
        prediction_type: "epsilon" (target ε), "v_prediction" (target v) or "sample" (target x0).
    """
    acp = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps]
    sqrt_a = _per_sample(acp.sqrt(), x0.ndim)
    sqrt_1ma = _per_sample((1 - acp).sqrt(), x0.ndim)
    x0, noise = x0.float(), noise.float()
    noisy = sqrt_a * x0 + sqrt_1ma * noise
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = sqrt_a * noise - sqrt_1ma * x0
    elif prediction_type == "sample":
        target = x0
    else:
        raise ValueError(f"prediction_type {prediction_type!r} has no denoising loss here; use 'epsilon', "
                         "'v_prediction' or 'sample'.")
    return noisy, target


def flow_noised_and_target(x0: Tensor, noise: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_s, target)`` in float32 for rectified-flow training: ``x_s = (1−s)·x0 + s·ε``, target ``ε − x0``.

    Args:
        x0, noise: float ``[B, ...]``.
        sigmas: float ``[B]`` in [0, 1], the noise level ``s`` of each sample.
    """
    s = _per_sample(sigmas.float(), x0.ndim)
    x0, noise = x0.float(), noise.float()
    return (1 - s) * x0 + s * noise, noise - x0


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """float32 ``[B]``: mean over non-batch elements of ``(prediction − target)²`` (computed in float32)."""
    return ((prediction.float() - target.float()) ** 2).flatten(1).mean(dim=1)


def ddpm_x0_from_prediction(noisy: Tensor, prediction: Tensor, timesteps: Tensor, alphas_cumprod: Tensor,
                            prediction_type: str) -> Tensor:
    """The clean-sample estimate ``x̂0`` float32 ``[B, ...]`` of a DDPM denoiser output at ``x_t`` (diffusers'
    DDIMScheduler.step, step 3, with a per-sample ``t``).

    Args:
        noisy: ``x_t`` ``[B, ...]``; prediction: the denoiser output, same shape.
        timesteps: long ``[B]`` in ``[0, T−1]``.
        alphas_cumprod: float ``[T]``, the scheduler's ``ᾱ``.
        prediction_type: "epsilon", "v_prediction" or "sample".
    """
    acp = alphas_cumprod.to(device=noisy.device, dtype=torch.float32)[timesteps]
    sqrt_a = _per_sample(acp.sqrt(), noisy.ndim)
    sqrt_1ma = _per_sample((1 - acp).sqrt(), noisy.ndim)
    x_t, out = noisy.float(), prediction.float()
    if prediction_type == "epsilon":
        return (x_t - sqrt_1ma * out) / sqrt_a
    if prediction_type == "v_prediction":
        return sqrt_a * x_t - sqrt_1ma * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"prediction_type {prediction_type!r} has no x0 estimate here; use 'epsilon', 'v_prediction' "
                     "or 'sample'.")


def flow_x0_from_prediction(noisy: Tensor, prediction: Tensor, sigmas: Tensor) -> Tensor:
    """``x̂0 = x_s − s·v̂`` float32 ``[B, ...]`` of a rectified-flow velocity ``v̂`` at ``x_s`` (``sigmas`` float
    ``[B]`` in [0, 1])."""
    return noisy.float() - _per_sample(sigmas.float(), noisy.ndim) * prediction.float()
