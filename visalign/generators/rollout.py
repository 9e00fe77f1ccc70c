"""The data a rollout carries and the small pure helpers every generator family shares.

Split out of ``base.py`` (the adapter contract) so each file stays one concept: here the ``Rollout`` record and
what is needed to recompute a step exactly (``Condition``, ``SamplingPlan``, ``StepOutput``), LoRA settings,
per-sample seeding, classifier-free guidance, training-step selection and the Gaussian step log-density.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


# ---------------------------------------------------------------- data


@dataclass
class Condition:
    """Everything the denoiser is conditioned on, for the conditional and (with CFG) the unconditional branch.

    Attributes:
        embeds: prompt embeddings, float ``[B, L, D]`` (one row per sample, already repeated per image).
        negative_embeds: embeddings of the negative/empty prompt ``[B, L, D]``; None when guidance is off.
        extras: other conditional inputs keyed by the denoiser's argument name, e.g. SDXL's
            ``text_embeds [B, D_pool]`` and ``time_ids [B, 6]``; each tensor has batch first.
        negative_extras: the same keys for the unconditional branch.
    """

    embeds: Tensor
    negative_embeds: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    negative_extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def guided(self) -> bool:
        return self.negative_embeds is not None

    def select(self, index: Sequence[int]) -> Condition:
        """The rows at ``index`` (to split a rollout into micro-batches)."""
        idx = list(index)
        neg = self.negative_embeds[idx] if self.negative_embeds is not None else None
        return Condition(self.embeds[idx], neg, {k: v[idx] for k, v in self.extras.items()},
                         {k: v[idx] for k, v in self.negative_extras.items()})


@dataclass
class SamplingPlan:
    """The parts of a rollout a transition needs, besides the latents: enough to recompute a step exactly.

    Attributes:
        condition: the embeddings used while sampling.
        timesteps: float or long ``[S]``, the denoiser's timestep at each step, in sampling order.
        schedule: family-specific per-step values with a leading ``[S]`` dim (DDIM: ``prev_timesteps [S]``;
            flow matching: ``sigmas [S+1]``).
        guidance: classifier-free guidance scale w (``eps_u + w·(eps_c − eps_u)``); ≤ 1 means no CFG.
        eta: stochasticity of each step: DDIM η for UNet families, the SDE noise level for flow families;
            0 is the deterministic sampler (no density).
    """

    condition: Condition
    timesteps: Tensor
    schedule: dict[str, Tensor]
    guidance: float
    eta: float


@dataclass
class StepOutput:
    """One stochastic transition ``x_t → x_{t'}`` and its Gaussian policy.

    Attributes:
        prev_sample: ``x_{t'}``, latents ``[B, ...]`` (the sampled one, or the one passed in to be scored).
        mean: the policy mean ``mu``, float32 ``[B, ...]`` (carries gradients when the denoiser does).
        std: the policy std, float32, broadcastable to ``mean`` (``[B, 1, ...]``); 0 for a deterministic step.
        log_prob_mean: float32 ``[B]``, per-element log-density averaged over non-batch dims (NaN if std = 0).
        log_prob_sum: float32 ``[B]``, the true log-density (``D · log_prob_mean``).
        x0: float32 ``[B, ...]``, the denoiser's one-step estimate of the clean latents at this step (ReFL decodes
            it); None for a family that does not report it.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob_mean: Tensor
    log_prob_sum: Tensor
    x0: Tensor | None = None


@dataclass
class Rollout:
    """A sampled batch with its trajectory; enough to recompute any step exactly.

    Attributes:
        media: float32 in [0, 1]: images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]``.
        latents: ``[B, S+1, ...]``: ``latents[:, 0]`` is the initial noise, ``latents[:, i+1]`` the result of step i.
        log_probs: float32 ``[B, S]``, ``logp_mean`` of each step under the sampling policy (NaN where η = 0).
        log_probs_sum: float32 ``[B, S]``, ``logp_sum`` of each step.
        timesteps: ``[S]``, the denoiser timestep of each step, in sampling order.
        condition: conditional (and, with CFG, unconditional) embeddings, one row per sample.
        prompts: ``list[str]`` of length B, prompt i repeated ``images_per_prompt`` times, grouped.
        negative_prompts: ``list[str]`` of length B used for the unconditional branch ("" by default).
        seeds: ``list[int]`` of length B; sample i's initial noise and step noise come from ``seeds[i]`` alone.
        guidance: classifier-free guidance scale used.
        eta: DDIM η / SDE noise level used.
        schedule: family-specific per-step values (see :class:`SamplingPlan`).
        extras: anything else a family records (e.g. ``{"height": 64, "width": 64}``).
    """

    media: Tensor
    latents: Tensor
    log_probs: Tensor
    log_probs_sum: Tensor
    timesteps: Tensor
    condition: Condition
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    guidance: float
    eta: float
    schedule: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.latents.shape[1] - 1

    @property
    def plan(self) -> SamplingPlan:
        return SamplingPlan(self.condition, self.timesteps, self.schedule, self.guidance, self.eta)

    def select(self, index: Sequence[int]) -> Rollout:
        """The samples at ``index`` (micro-batches). Recompute log-probs with the *same* batch composition as
        the rollout when bit-exact ratios matter: some kernels change their result with the batch size."""
        idx = list(index)
        return Rollout(self.media[idx], self.latents[idx], self.log_probs[idx], self.log_probs_sum[idx],
                       self.timesteps, self.condition.select(idx), [self.prompts[i] for i in idx],
                       [self.negative_prompts[i] for i in idx], [self.seeds[i] for i in idx], self.guidance,
                       self.eta, self.schedule, dict(self.extras))


@dataclass
class LoraSpec:
    """How to attach LoRA adapters to the denoiser (peft).

    Attributes:
        rank: LoRA rank r (width of the low-rank update).
        alpha: LoRA alpha; the update is scaled by alpha / rank.
        target_modules: names (or suffixes) of the denoiser's linear/conv layers to adapt.
        dropout: dropout on the LoRA branch; keep 0 for RL, where dropout breaks the ratio-1 invariant.
        init: peft's ``init_lora_weights`` ("gaussian" as in diffusers' training scripts; True = zero B matrix).
    """

    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0
    init: str | bool = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be ≥ 1; got {self.rank}.")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty; name at least one denoiser layer, e.g. ['to_q', 'to_v'].")


# ---------------------------------------------------------------- helpers


def per_sample_seeds(seed: int, batch_size: int) -> list[int]:
    """Seeds ``seed, seed+1, ...``: sample i is reproducible on its own, whatever batch it is drawn in."""
    return [int(seed) + i for i in range(batch_size)]


def sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample. CPU, so the same seed gives the same noise on every device (as diffusers'
    ``randn_tensor`` does with CPU generators)."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int], *, device: torch.device | str,
                     dtype: torch.dtype) -> Tensor:
    """Standard normal noise ``[B, *shape]`` where row i is drawn from ``generators[i]`` alone (diffusers'
    ``randn_tensor`` with a list of generators draws the same values)."""
    rows = [torch.randn((1, *shape), generator=g, device="cpu", dtype=dtype) for g in generators]
    return torch.cat(rows).to(device)


def guide(pred_uncond: Tensor, pred_cond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance ``u + w·(c − u)``; the policy that rollouts sample from and training rescores."""
    return pred_uncond + guidance * (pred_cond - pred_uncond)


def cfg_timesteps(timesteps: Tensor, batch: int, cfg: bool) -> Tensor:
    """A scalar or ``[B]`` timestep → ``[B]``, or ``[2B]`` for the ``[uncond; cond]`` CFG batch."""
    t = timesteps.expand(batch) if timesteps.ndim == 0 else timesteps
    return torch.cat([t, t]) if cfg else t


def uses_cfg(guidance: float) -> bool:
    """diffusers' rule: guidance is on when the scale is above 1."""
    return guidance > 1.0


def select_train_steps(num_steps: int, *, fraction: float | None = None,
                       window: tuple[int, int] | None = None) -> list[int]:
    """Which denoising steps to train on (a subset of a rollout's S steps), in sampling order.

    Args:
        num_steps: S, the number of steps in the rollout.
        fraction: train the first ``floor(fraction·S)`` steps (flow_grpo's ``timestep_fraction``; the high-noise
            steps come first). ``1.0`` trains every step.
        window: explicit half-open ``(start, stop)`` range of step indices (Flow-GRPO-Fast / MixGRPO style).

    Returns:
        Sorted step indices; pass them to :meth:`GeneratorAdapter.step_log_prob`.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be ≥ 1; got {num_steps}.")
    if fraction is not None and window is not None:
        raise ValueError("Give either a timestep fraction or an explicit window, not both.")
    if window is not None:
        start, stop = window
        if not 0 <= start < stop <= num_steps:
            raise ValueError(f"Step window {window} must satisfy 0 <= start < stop <= {num_steps} (rollout steps).")
        return list(range(start, stop))
    fraction = 1.0 if fraction is None else fraction
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"timestep fraction must be in (0, 1]; got {fraction}.")
    count = int(num_steps * fraction)
    if count < 1:
        raise ValueError(f"fraction {fraction} of {num_steps} steps trains none; raise it to >= {1 / num_steps:.3g}.")
    return list(range(count))


def check_sde_window(window: tuple[int, int] | None) -> tuple[int, int] | None:
    """Validate an SDE window (half-open ``(start, stop)`` step range, or None) before any rollout uses it."""
    if window is not None and not (0 <= window[0] < window[1]):
        raise ValueError(f"SDE window {window} must be (start, stop) with 0 <= start < stop.")
    return None if window is None else (int(window[0]), int(window[1]))


def sde_window_mask(window: tuple[int, int] | None, num_steps: int, device: torch.device | str) -> Tensor:
    """float32 ``[S]``: 1 on the steps sampled with noise, 0 on the deterministic ones (all ones without a window)."""
    mask = torch.ones(num_steps, device=device)
    if window is not None:
        start, stop = window
        if stop > num_steps:
            raise ValueError(f"SDE window {window} exceeds the {num_steps} sampling steps.")
        mask.zero_()
        mask[start:stop] = 1.0
    return mask


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample log-density of ``sample`` under ``N(mean, std²)``, reduced over non-batch dims.

    The sample enters as a constant (detached): gradients flow only through ``mean`` (docs/methods.md#ddim-logprob
    Checks).

    Args:
        sample, mean: ``[B, ...]`` (computed in float32).
        std: broadcastable to ``mean``; must be > 0.

    Returns:
        ``(logp_mean [B], logp_sum [B])``, float32.
    """
    sample = sample.detach().float()
    mean = mean.float()
    std = std.float().expand_as(mean)
    elem = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    flat = elem.flatten(1)
    return flat.mean(dim=1), flat.sum(dim=1)


# ---------------------------------------------------------------- the adapter


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32``/``"fp32"``/``"bf16"``/``"fp16"`` → a torch dtype; raises naming the accepted spellings."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[dtype]
