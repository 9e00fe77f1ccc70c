"""The generator contract: one adapter interface over diffusers pipelines, with exact per-step log-probs.

Every online objective (DDPO/GRPO, PRDP, DRAGON, ...) needs the same two things from a generator
(docs/architecture.md#generators; docs/methods.md#ddim-logprob to #grpo):

1. ``rollout``: sample a batch together with its denoising trajectory and the log-probability of every
   stochastic transition under the sampling policy (the *guided* sampler when CFG is on);
2. ``step_log_prob``: recompute any step's log-probability under the current parameters, with gradients.

A family adapter (``unet.py``, ``unet_video.py``, the flow-matching and CogVideoX files) implements a handful of
hooks — ``encode_condition``, ``make_schedule``, ``latent_shape``, ``denoise``, ``transition``, ``decode``, and for
the pre-training loss ``training_timesteps``/``check_training_timesteps``/``noised_and_target`` — and inherits the
sampling loop, per-sample seeding, classifier-free guidance, training-step subsets, ``denoising_loss`` (Diffusion-DPO,
DRAGON, RAFT), LoRA via peft, gradient checkpointing, attention back-end choice and diffusers-compatible save/load
from this file.

Log-prob convention (docs/methods.md#notation, log-prob reduction): ``log_probs`` holds ``logp_mean`` (the per-element
Gaussian log-density averaged over all non-batch dims, as ddpo-pytorch and flow_grpo report it) and
``log_probs_sum`` the true log-density (``D · logp_mean``). Never mix the two within one run.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from visalign.generators.denoising_loss import (
    DenoisingLoss,
    GeneratorLike,
    NoisedLatents,
    draw_noise,
    per_sample_mse,
)
from visalign.generators.rollout import (  # noqa: F401 -- re-exported: the contract's data lives there
    DTYPES,
    REDUCTIONS,
    Condition,
    LoraSpec,
    Rollout,
    SamplingPlan,
    StepOutput,
    cfg_timesteps,
    gaussian_log_prob,
    guide,
    per_sample_seeds,
    randn_per_sample,
    resolve_dtype,
    sample_generators,
    select_train_steps,
    uses_cfg,
)


class GeneratorAdapter:
    """Base class of every generator family. Wraps one loaded diffusers pipeline.

    Subclasses set ``family``/``modality``/``pipeline_classes`` and implement the hooks marked "to implement".
    All parameters start frozen; :meth:`add_lora` or :meth:`train_full` makes the trainable ones.

    Args:
        pipeline: a loaded diffusers pipeline of one of ``pipeline_classes``.
        device: where the pipeline runs.
        dtype: compute dtype of the denoiser/VAE/text encoders (log-prob arithmetic is always float32).
        source: the model id or folder it was loaded from (recorded in saved checkpoints).
    """

    family: str = ""
    modality: str = "image"
    pipeline_classes: tuple[str, ...] = ()
    denoiser_name: str = "unet"

    def __init__(self, pipeline: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 source: str | None = None) -> None:
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        self.lora: LoraSpec | None = None
        self.full_finetune = False
        pipeline.to(self.device)
        for module in self.modules().values():
            if getattr(module, "dtype", dtype) != dtype:  # from_pretrained(dtype=...) already cast; avoid re-casting
                module.to(dtype)
            module.requires_grad_(False)
            module.eval()  # dropout off: it would make the recomputed log-prob differ from the rollout's
        self.set_attention()

    # -- loading --
    @classmethod
    def from_pretrained(cls, model_id_or_dir: str | Path, *, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", lora: str | Path | None = None,
                        **pipeline_kwargs: Any) -> GeneratorAdapter:
        """Load a pipeline (hub id or local folder, safetensors only) and wrap it; optionally load a LoRA folder."""
        pipeline_cls = cls.pipeline_type()
        dtype = resolve_dtype(dtype)
        pipeline = pipeline_cls.from_pretrained(str(model_id_or_dir), dtype=dtype, use_safetensors=True,
                                                **pipeline_kwargs)
        adapter = cls(pipeline, device=device, dtype=dtype, source=str(model_id_or_dir))
        if lora is not None:
            adapter.load(lora)
        return adapter

    @classmethod
    def pipeline_type(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.pipeline_classes[0])

    # -- to implement --
    def encode_condition(self, prompts: list[str], negative_prompts: list[str], guidance: float, *, height: int,
                         width: int) -> Condition:
        """Prompt embeddings for B prompts (and the negatives when ``uses_cfg(guidance)``); ``height``/``width`` in
        pixels are for families whose conditioning includes the size (SDXL's ``time_ids``)."""
        raise NotImplementedError

    def make_schedule(self, steps: int, *, height: int, width: int,
                      num_frames: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(timesteps [S], schedule)`` for ``steps`` inference steps, read from the pipeline's scheduler.

        ``height``/``width`` (pixels) and ``num_frames`` are the rollout's size: families whose sigma shift depends
        on the sequence length (FLUX, LTX, SD3 with dynamic shifting) need them; the others ignore them.
        """
        raise NotImplementedError

    def latent_shape(self, height: int, width: int, num_frames: int | None) -> tuple[int, ...]:
        """Per-sample latent shape for a resolution (and frame count for video)."""
        raise NotImplementedError

    def initial_noise_scale(self) -> float:
        """Scale of the initial latents (the scheduler's ``init_noise_sigma``)."""
        return float(getattr(self.pipeline.scheduler, "init_noise_sigma", 1.0))

    def denoise(self, latents: Tensor, timesteps: Tensor, condition: Condition, guidance: float) -> Tensor:
        """The (guided, when ``uses_cfg(guidance)``) denoiser prediction for ``latents`` (to implement).

        Args:
            latents: ``[B, ...]`` in the trajectory's layout (cast to the denoiser's dtype inside).
            timesteps: the denoiser's timestep in the scheduler's units (DDPM: long t; flow: ``s·1000``), a scalar
                (one for the batch, as the stock pipelines pass it) or ``[B]`` (one per sample).
            condition: embeddings with B rows.
            guidance: CFG scale; ≤ 1 runs the conditional branch only.

        Returns:
            ``[B, ...]``, same layout as ``latents``: ε/v/x0 (UNet, CogVideoX) or the velocity ``ε − x0`` (flow).
        """
        raise NotImplementedError

    def predict(self, plan: SamplingPlan, latents: Tensor, step_index: int) -> Tensor:
        """The guided prediction the sampler uses at step ``step_index`` of ``plan``."""
        return self.denoise(latents, plan.timesteps[step_index], plan.condition, plan.guidance)

    def training_timesteps(self, latents: Tensor, generator: GeneratorLike) -> Tensor:
        """Draw ``[B]`` noise levels from the model's training distribution (to implement; see
        :mod:`visalign.generators.denoising_loss`)."""
        raise NotImplementedError

    def check_training_timesteps(self, timesteps: Tensor | Sequence[float], batch: int) -> Tensor:
        """Validate caller-given noise levels (to implement): ``[B]``, in this family's units."""
        raise NotImplementedError

    def noised_and_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, target, denoiser_timesteps)`` (float32, float32, ``[B]``) for training (to implement)."""
        raise NotImplementedError

    def x0_from_prediction(self, noisy: Tensor, prediction: Tensor, timesteps: Tensor) -> Tensor:
        """The clean-sample estimate ``x̂0`` float32 ``[B, ...]`` of a denoiser output at ``noisy``, ``timesteps``
        ``[B]`` in training units (to implement; the formulas are in :mod:`visalign.generators.denoising_loss`)."""
        raise NotImplementedError(f"{type(self).__name__} does not convert its predictions to x0 estimates.")

    def step_noise_levels(self, rollout: Rollout) -> Tensor:
        """``[S]``, the noise level each rollout step starts from, in training units (long DDPM ``t``, float flow
        ``s``), so a forward-process objective can train at the levels the sampler visits (to implement)."""
        raise NotImplementedError(f"{type(self).__name__} does not report its sampling noise levels.")

    def transition(self, plan: SamplingPlan, latents: Tensor, step_index: int, *, prev_sample: Tensor | None = None,
                   noise: Tensor | None = None) -> StepOutput:
        """One step from ``latents`` (``x_t``, ``[B, ...]``) under ``plan``: sample ``x_{t'} = mean + std·noise``, or,
        when ``prev_sample`` is given, score that sample instead. Gradients follow torch's grad mode."""
        raise NotImplementedError

    def decode(self, latents: Tensor, *, grad: bool = False) -> Tensor:
        """Final latents → media float32 in [0, 1] (``[B, 3, H, W]`` or ``[B, T, 3, H, W]``)."""
        raise NotImplementedError

    def encode_media(self, media: Tensor) -> Tensor:
        """Media float32 in [0, 1] (``[B, 3, H, W]``) → clean latents in the denoiser's space (the VAE posterior
        mean, scaled as training scripts scale it), with no graph. To implement per family; the inverse of
        :meth:`decode` up to the VAE's reconstruction error."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode media to latents yet.")

    def default_resolution(self) -> tuple[int, int]:
        """(height, width) in pixels used when none is given."""
        raise NotImplementedError

    def vae_scale_factor(self) -> int:
        return int(getattr(self.pipeline, "vae_scale_factor", 8))

    # -- the contract --
    def rollout(self, prompts: Sequence[str], *, images_per_prompt: int = 1, steps: int = 20, guidance: float = 5.0,
                eta: float = 1.0, seed: int = 0, negative_prompt: str | Sequence[str] | None = None,
                height: int | None = None, width: int | None = None, num_frames: int | None = None) -> Rollout:
        """Sample ``len(prompts) · images_per_prompt`` media with their trajectory and per-step log-probs.

        Args:
            prompts: the prompts; each is repeated ``images_per_prompt`` times consecutively (a GRPO group).
            images_per_prompt: samples per prompt.
            steps: number of denoising steps S.
            guidance: CFG scale w; ≤ 1 turns CFG off.
            eta: DDIM η / SDE noise level; > 0 for log-probs, 0 reproduces the stock deterministic sampler.
            seed: sample i uses seed ``seed + i`` for its initial noise and all its step noise.
            negative_prompt: one string for all, or one per prompt; "" by default.
            height, width: pixels; must be divisible by the VAE factor. Default: the model's native size.
            num_frames: video families only.

        Returns:
            A :class:`Rollout` (no autograd graph).
        """
        prompts_rep, negatives_rep = self._expand_prompts(prompts, images_per_prompt, negative_prompt)
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1; got {steps}.")
        if eta < 0:
            raise ValueError(f"eta / noise level must be ≥ 0; got {eta}.")
        height, width = self._check_resolution(height, width)
        seeds = per_sample_seeds(seed, len(prompts_rep))
        generators = sample_generators(seeds)
        with torch.no_grad():
            condition = self.encode_condition(prompts_rep, negatives_rep, guidance, height=height, width=width)
            timesteps, schedule = self.make_schedule(steps, height=height, width=width, num_frames=num_frames)
            plan = SamplingPlan(condition, timesteps, schedule, float(guidance), float(eta))
            shape = self.latent_shape(height, width, num_frames)
            latents = randn_per_sample(generators, shape, device=self.device, dtype=self.dtype)
            latents = latents * self.initial_noise_scale()
            trajectory, logp_mean, logp_sum = [latents], [], []
            for i in range(len(timesteps)):
                noise = None
                if eta > 0:
                    noise = randn_per_sample(generators, shape, device=self.device, dtype=torch.float32)
                out = self.transition(plan, latents, i, noise=noise)
                latents = out.prev_sample
                trajectory.append(latents)
                logp_mean.append(out.log_prob_mean)
                logp_sum.append(out.log_prob_sum)
            media = self.decode(latents)
        return Rollout(media=media, latents=torch.stack(trajectory, dim=1), log_probs=torch.stack(logp_mean, 1),
                       log_probs_sum=torch.stack(logp_sum, 1), timesteps=timesteps, condition=condition,
                       prompts=prompts_rep, negative_prompts=negatives_rep, seeds=seeds, guidance=float(guidance),
                       eta=float(eta), schedule=schedule, extras={"height": height, "width": width,
                                                                   "num_frames": num_frames})

    def recompute_step(self, rollout: Rollout, step_index: int) -> StepOutput:
        """Step ``step_index`` of ``rollout`` under the current parameters, with gradients: its ``mean``, ``std``
        and the log-prob of the stored ``x_{t'}`` (use ``mean``/``std`` for closed-form KL to a reference)."""
        if not 0 <= step_index < rollout.num_steps:
            raise IndexError(f"step index {step_index} is out of range for a rollout of {rollout.num_steps} steps.")
        with torch.enable_grad():
            return self.transition(rollout.plan, rollout.latents[:, step_index], step_index,
                                   prev_sample=rollout.latents[:, step_index + 1])

    def step_log_prob(self, rollout: Rollout, step_indices: Sequence[int] | Tensor, *,
                      reduction: str = "mean") -> Tensor:
        """Log-probs of the rollout's own transitions at ``step_indices`` under the current parameters.

        Args:
            rollout: from :meth:`rollout` (use the same batch composition for bit-exact on-policy ratios).
            step_indices: which steps, e.g. from :func:`select_train_steps`.
            reduction: ``"mean"`` (logp_mean, default) or ``"sum"`` (logp_sum, the true log-density).

        Returns:
            float32 ``[B, len(step_indices)]``, differentiable w.r.t. :meth:`trainable_parameters`.
        """
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")
        columns = []
        for i in [int(i) for i in step_indices]:
            out = self.recompute_step(rollout, i)
            columns.append(out.log_prob_mean if reduction == "mean" else out.log_prob_sum)
        if not columns:
            raise ValueError("step_indices is empty; pass at least one step index.")
        return torch.stack(columns, dim=1)

    # guidance handed to the denoiser by denoising_loss; 1 = the conditional branch alone. Guidance-distilled FLUX
    # overrides it: its transformer takes the scale as an input embedding, not as a second branch.
    loss_guidance: float = 1.0

    def denoising_loss(self, latents: Tensor, condition: Condition, *,
                       timesteps: Tensor | Sequence[float] | None = None, noise: Tensor | None = None,
                       generator: GeneratorLike = None) -> DenoisingLoss:
        """Per-sample pre-training loss of the denoiser on clean latents (Diffusion-DPO, DRAGON, RAFT;
        docs/methods.md#diffusion-dpo).

        Noises ``x0`` to a random level with the family's forward process and compares the denoiser's prediction
        with its training target (DDPM: ε, v or x0 per ``prediction_type``; flow: ``ε − x0``). Only the conditional
        branch runs (no CFG). Gradients follow torch's grad mode, so wrap a reference pass in ``torch.no_grad()``
        (and :meth:`lora_disabled`) yourself.

        Args:
            latents: clean latents ``x0`` ``[B, ...]`` in the denoiser's latent space and scaling, e.g.
                ``rollout.latents[:, -1]`` (4-D images, 5-D video).
            condition: B rows of conditional embeddings, e.g. ``rollout.condition`` or ``.select(index)`` of it;
                negative embeddings, if any, are ignored.
            timesteps: ``[B]`` noise levels to use instead of drawing them: long DDPM timesteps in ``[0, T−1]``
                (UNet, CogVideoX) or float ``s`` in [0, 1] (flow families). Share them across a DPO pair / with
                the reference pass.
            noise: ``[B, ...]`` standard-normal ε to use instead of drawing it.
            generator: a ``torch.Generator``, or one per sample, for whatever is drawn (timesteps first, then
                noise); None uses torch's global RNG.

        Returns:
            :class:`DenoisingLoss`: ``loss`` float32 ``[B]`` (mean over elements), the ``timesteps`` and ``noise``
            used, so the same value can be recomputed exactly.
        """
        noised = self.noise_latents(latents, timesteps=timesteps, noise=noise, generator=generator)
        prediction = self.training_prediction(noised, condition)
        return DenoisingLoss(per_sample_mse(prediction, noised.target), noised.timesteps, noised.noise)

    def noise_latents(self, latents: Tensor, *, timesteps: Tensor | Sequence[float] | None = None,
                      noise: Tensor | None = None, generator: GeneratorLike = None) -> NoisedLatents:
        """The forward process of :meth:`denoising_loss` alone: ``x0`` moved to one noise level per sample.

        Args and draw order as :meth:`denoising_loss` (timesteps first, then noise), so the two replay each other.

        Returns:
            :class:`~visalign.generators.denoising_loss.NoisedLatents` (float32, on this adapter's device).
        """
        batch = latents.shape[0]
        latents = latents.to(self.device)
        if timesteps is None:
            timesteps = self.training_timesteps(latents, generator)
        else:
            timesteps = self.check_training_timesteps(timesteps, batch)
        if noise is None:
            noise = draw_noise(latents.shape, generator, self.device)
        elif tuple(noise.shape) != tuple(latents.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but latents {tuple(latents.shape)}; they must "
                             "match (reuse DenoisingLoss.noise from a call on the same latents).")
        noise = noise.to(self.device, torch.float32)
        x0 = latents.float()
        noisy, target, model_timesteps = self.noised_and_target(x0, noise, timesteps)
        return NoisedLatents(x0, noisy, target, timesteps, model_timesteps, noise)

    def training_prediction(self, noised: NoisedLatents, condition: Condition) -> Tensor:
        """The denoiser's conditional output at ``noised.noisy`` (no CFG, ``loss_guidance``), ``[B, ...]`` in the
        denoiser's parameterisation; gradients follow torch's grad mode.

        Args:
            noised: from :meth:`noise_latents`.
            condition: B rows of conditional embeddings; negative embeddings, if any, are ignored.
        """
        batch = len(noised)
        if condition.embeds.shape[0] != batch:
            raise ValueError(f"condition has {condition.embeds.shape[0]} rows but latents have {batch}; pass "
                             "condition.select(index) with the same samples as the latents.")
        conditional = Condition(condition.embeds, None, dict(condition.extras))
        return self.denoise(noised.noisy.to(self.dtype), noised.model_timesteps, conditional, self.loss_guidance)

    # -- parameters --
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The pipeline's torch modules by component name."""
        return {k: v for k, v in self.pipeline.components.items() if isinstance(v, torch.nn.Module)}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters with ``requires_grad`` (LoRA weights, or the whole denoiser after :meth:`train_full`)."""
        return [p for m in self.modules().values() for p in m.parameters() if p.requires_grad]

    def add_lora(self, spec: LoraSpec | None = None) -> list[torch.nn.Parameter]:
        """Attach fresh LoRA adapters (peft) to the denoiser; only they become trainable.

        LoRA weights are kept in float32 even when the base runs in bf16/fp16 (diffusers' ``cast_training_params``),
        so optimizer updates are not lost to rounding. Returns the trainable parameters.
        """
        from peft import LoraConfig

        spec = spec or LoraSpec()
        if not hasattr(self.denoiser, "add_adapter"):
            raise NotImplementedError(
                f"{type(self.denoiser).__name__} (the {self.family} denoiser) has no peft adapter support in this "
                "diffusers, so LoRA can be neither attached here nor loaded by the stock pipeline's "
                "load_lora_weights; fine-tune it fully with train_full() (saved as a pipeline folder) instead.")
        if self.lora is not None or self.full_finetune:
            raise RuntimeError("This generator already has trainable weights (LoRA or full); load a fresh one.")
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                            lora_dropout=spec.dropout, init_lora_weights=spec.init)
        try:
            self.denoiser.add_adapter(config)
        except ValueError as err:
            raise ValueError(f"LoRA target_modules {spec.target_modules} do not fit this {self.family} denoiser "
                             f"({err}); name layers it has, e.g. ['to_q', 'to_k', 'to_v', 'to_out.0'].") from None
        self.lora = spec
        self._mark_lora_trainable()
        return self.trainable_parameters()

    def _mark_lora_trainable(self) -> None:
        for name, param in self.denoiser.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
                param.data = param.data.float()

    def train_full(self) -> list[torch.nn.Parameter]:
        """Make every denoiser parameter trainable (full fine-tune); other components stay frozen."""
        if self.lora is not None:
            raise RuntimeError("This generator has LoRA adapters; full fine-tuning is for a generator without them.")
        self.full_finetune = True
        self.denoiser.requires_grad_(True)
        return self.trainable_parameters()

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """Run the base model (the KL reference) by switching the LoRA adapters off inside the block."""
        if self.lora is None:
            raise RuntimeError("lora_disabled() needs LoRA adapters; this generator has none.")
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Trade compute for memory in :meth:`step_log_prob` (recompute activations in backward)."""
        if enabled:
            self.denoiser.enable_gradient_checkpointing()
        else:
            self.denoiser.disable_gradient_checkpointing()

    def set_attention(self, backend: str = "auto") -> str:
        """Pick the attention kernel: ``"sdpa"`` (torch's, the default), ``"xformers"`` (needs the ``[gpu]`` extra
        and CUDA), or ``"auto"`` (xformers when importable on CUDA, else SDPA). Returns the one chosen."""
        if backend not in ("auto", "sdpa", "xformers"):
            raise ValueError(f"attention backend must be 'auto', 'sdpa' or 'xformers'; got {backend!r}.")
        has_xformers = importlib.util.find_spec("xformers") is not None
        on_cuda = self.device.type == "cuda"
        if backend == "xformers" and not (has_xformers and on_cuda):
            raise ValueError("attention='xformers' needs CUDA and xformers: pip install \"visalign[gpu]\"; "
                             "or use attention='sdpa'.")
        if backend == "xformers" or (backend == "auto" and has_xformers and on_cuda):
            self.pipeline.enable_xformers_memory_efficient_attention()
            return "xformers"
        # diffusers' default processors already call torch SDPA; nothing to switch.
        return "sdpa"

    # -- checkpoints --
    def save(self, directory: str | Path) -> Path:
        """Write the trainable weights: LoRA → ``pytorch_lora_weights.safetensors`` that stock diffusers reads with
        ``pipe.load_lora_weights(dir)``; full fine-tune → a complete diffusers pipeline folder (safetensors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            self._save_lora(directory)
        elif self.full_finetune:
            self.pipeline.save_pretrained(directory, safe_serialization=True)
        else:
            raise RuntimeError("Nothing to save: this generator has no LoRA and no full fine-tune. Call add_lora() or "
                               "train_full() first, or save the pipeline itself with pipeline.save_pretrained().")
        return directory

    def _save_lora(self, directory: Path) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser))
        metadata = self.denoiser.peft_config["default"].to_dict()
        self.pipeline.save_lora_weights(directory, **{f"{self.denoiser_name}_lora_layers": layers,
                                                      f"{self.denoiser_name}_lora_adapter_metadata": metadata})

    def load(self, directory: str | Path) -> None:
        """Load LoRA weights saved by :meth:`save` (or any diffusers LoRA folder) and make them trainable.

        A full fine-tune folder is a pipeline: load it with :func:`visalign.generators.load_generator` instead.
        """
        directory = Path(directory)
        if (directory / "model_index.json").is_file():
            raise ValueError(f"{directory} is a full pipeline folder, not a LoRA; load it with "
                             "load_generator(that folder) instead of load().")
        if not any(directory.glob("*.safetensors")):
            raise FileNotFoundError(f"{directory}: no LoRA weights (*.safetensors); point at a folder written by "
                                    "GeneratorAdapter.save() or pipe.save_lora_weights().")
        if self.lora is not None:
            raise RuntimeError("This generator already has LoRA adapters; load the LoRA into a fresh generator.")
        try:
            self.pipeline.load_lora_weights(str(directory), adapter_name="default")
        except (RuntimeError, ValueError) as err:
            if "size mismatch" in str(err) or "shape" in str(err):
                msg = (f"The LoRA in {directory} was trained for a different base model than {self.source!r} "
                       f"(weight shapes differ). Load it on the base model it was trained on.\n{err}")
                raise ValueError(msg) from None
            raise
        config = self.denoiser.peft_config["default"]
        self.lora = LoraSpec(rank=config.r, alpha=config.lora_alpha, target_modules=sorted(config.target_modules),
                             dropout=config.lora_dropout)
        self._mark_lora_trainable()

    # -- input checks --
    def _expand_prompts(self, prompts: Sequence[str], images_per_prompt: int,
                        negative_prompt: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string; wrap it: [prompt].")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("The prompt list is empty; pass at least one prompt.")
        if images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be ≥ 1; got {images_per_prompt}.")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"Got {len(prompts)} prompts but {len(negatives)} negative prompts; pass one string "
                                 "or one negative per prompt.")
        repeat = [i for i in range(len(prompts)) for _ in range(images_per_prompt)]
        return [prompts[i] for i in repeat], [negatives[i] for i in repeat]

    def _check_resolution(self, height: int | None, width: int | None) -> tuple[int, int]:
        default_h, default_w = self.default_resolution()
        height, width = height or default_h, width or default_w
        factor = self.vae_scale_factor() * getattr(self, "resolution_multiple", 1)
        for name, value in (("height", height), ("width", width)):
            if value % factor:
                lower, upper = value - value % factor, value - value % factor + factor
                raise ValueError(f"{name}={value} px is not divisible by {factor} (this model's VAE/patch factor); "
                                 f"use {lower or upper} or {upper}.")
        return height, width

    def __repr__(self) -> str:
        train = f"lora(r={self.lora.rank})" if self.lora else ("full" if self.full_finetune else "frozen")
        return f"{type(self).__name__}(family={self.family!r}, source={self.source!r}, dtype={self.dtype}, {train})"
