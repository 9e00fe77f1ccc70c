"""Build the shapes world's tiny text-to-image model: a stock diffusers ``StableDiffusionPipeline`` folder.

Recipe (measured in the prototype, docs/shapes.md#generator, trimmed for a shared 2-core CPU):

1. an ``AutoencoderKL`` with f = 4 (32 px → 8×8×4 latents), trained with MSE + L1 + 1e-6·KL, then a
   decoder-only polish with the encoder frozen (the latent space stays fixed, so the order of the stages is free);
2. the latent scaling factor measured as 1 / std of the encoder means;
3. a ``UNet2DConditionModel`` and a ``CLIPTextModel`` trained jointly from scratch on ε-prediction (DDPM,
   1000 steps, squared-cosine schedule), AdamW with warm-up, gradient clipping, 10 % caption dropout (to "",
   for classifier-free guidance) and an EMA of both; the EMA weights are what is saved;
4. the pipeline folder (DDIM scheduler, word-level ``CLIPTokenizer``) saved as safetensors, in fp16 on disk.

The data stream is :mod:`visalign.shapes.noisy_data`: images show one object too many with probability
``extra_object_p`` (default 0.4), so the base model is fluent on colour and shape but right about the number of
objects only most of the time, on every prompt, which is the room reward fine-tuning needs (see that module).

Reproducibility: every random draw comes from the seed (numpy for the data, one ``torch.Generator`` per stage
for noise, timesteps and caption dropout), the thread count is fixed and deterministic algorithms are requested,
so a fixed number of steps gives bit-identical weights on the same machine. Time budgets (``*_minutes``) cap the
step counts for the asset build; the number of steps actually run is recorded, and rerunning with those step
counts (and no time cap) reproduces the weights. Training state is checkpointed (safetensors) every few minutes,
and a build restarted with ``resume=True`` continues from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visalign.shapes.build import tokenizer_summary, write_clip_tokenizer
from visalign.shapes.noisy_data import NoisyStreamConfig, iter_noisy_image_batches


@dataclass
class T2IBuildConfig:
    """Every knob of the text-to-image asset build (sizes, budgets, optimisation, noise)."""

    out: str = field(default="assets/shapes/t2i", metadata={"help": "Pipeline folder to write (replaced)."})
    work_dir: str = field(default="", metadata={
        "help": "Checkpoints and logs; default '<out>.work' next to the pipeline folder (not shipped)."})
    seed: int = field(default=0, metadata={"help": "Seed of every random draw of the build."})
    threads: int = field(default=1, metadata={
        "help": "torch threads; results are bit-identical only at a fixed thread count. On a shared, oversubscribed "
                "2-core machine 1 thread ran 10x faster than 2 (OpenMP barriers wait on descheduled threads)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the checkpoint in work_dir if there is one."})
    extra_object_p: float = field(default=0.4, metadata={
        "help": "Probability a training image shows one object more than its caption (visalign.shapes.noisy_data)."})
    # VAE
    vae_steps: int = field(default=3000, metadata={"help": "VAE training steps (capped by vae_minutes)."})
    vae_minutes: float = field(default=7.0, metadata={"help": "Wall-clock cap on VAE training, minutes."})
    vae_batch_size: int = field(default=16, metadata={"help": "Images per VAE step."})
    vae_lr: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate of the VAE."})
    decoder_steps: int = field(default=1000, metadata={"help": "Decoder-only polish steps (encoder frozen)."})
    decoder_minutes: float = field(default=2.0, metadata={"help": "Wall-clock cap on the decoder polish, minutes."})
    # UNet + text encoder
    unet_channels: tuple[int, ...] = field(default=(32, 64, 128), metadata={
        "help": "UNet block_out_channels at the 8x8, 4x4 and 2x2 latent levels."})
    text_width: int = field(default=128, metadata={"help": "Text encoder hidden size (= UNet cross_attention_dim)."})
    unet_steps: int = field(default=100_000, metadata={"help": "UNet + text encoder steps (capped by unet_minutes)."})
    unet_minutes: float = field(default=45.0, metadata={"help": "Wall-clock cap on UNet training, minutes."})
    batch_size: int = field(default=32, metadata={"help": "Captioned images per UNet step."})
    lr: float = field(default=1.5e-3, metadata={
        "help": "Peak AdamW learning rate of UNet and text encoder (cosine-decayed to 10% over the budget)."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear learning-rate warm-up, steps."})
    ema_decay: float = field(default=0.99, metadata={
        "help": "EMA decay (with the usual (1+n)/(10+n) warm-up); 0.99 averages ~100 steps, which suits a build of "
                "a few hundred steps (0.999 would still carry the blurry early weights)."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Share of captions replaced by '' (for CFG)."})
    checkpoint_minutes: float = field(default=5.0, metadata={"help": "Save training state every this many minutes."})
    fp16: bool = field(default=True, metadata={"help": "Store the pipeline's weights in fp16 (halves the size)."})
    eval_prompts: int = field(default=192, metadata={
        "help": "Prompts per evaluation set (held-in, held-out compositions; at most 192 each)."})

    def __post_init__(self) -> None:
        if len(self.unet_channels) != 3:
            raise ValueError(f"unet_channels {self.unet_channels} needs 3 levels (8x8, 4x4, 2x2 latents).")
        if self.text_width % 4:
            raise ValueError(f"text_width ({self.text_width}) must be a multiple of the 4 attention heads.")
        self.unet_channels = tuple(self.unet_channels)
        if not self.work_dir:
            self.work_dir = str(Path(self.out).with_name(Path(self.out).name + ".work"))


def set_determinism(threads: int) -> None:
    """Fixed thread count and deterministic kernels: same seed + same steps → same weights on one machine."""
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---------------------------------------------------------------- components


def build_vae() -> Any:
    """A random-init f = 4 ``AutoencoderKL``: 32 px RGB ↔ 4×8×8 latents (16 channels at full resolution: cheap)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)


def build_unet(channels: tuple[int, ...], cross_attention_dim: int) -> Any:
    """A random-init ``UNet2DConditionModel`` on 8×8×4 latents with cross-attention at every level."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels,
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 3,
                                up_block_types=("CrossAttnUpBlock2D",) * 3, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=4, norm_num_groups=16)


def build_text_encoder(tokenizer_dir: Path, width: int) -> Any:
    """A random-init causal ``CLIPTextModel`` (3 layers, 4 heads) over the word-level tokenizer's vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if (Path(tokenizer_dir) / "vocab.json").exists():
        ids = tokenizer_summary(tokenizer_dir)
    else:  # a pipeline's tokenizer folder as transformers 5 saves it (tokenizer.json only)
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
        ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "pad_token_id": tok.pad_token_id}
    config = CLIPTextConfig(vocab_size=ids["vocab_size"], hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
                            bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                            pad_token_id=ids["pad_token_id"])
    return CLIPTextModel(config)


def build_train_scheduler() -> Any:
    """The DDPM training schedule (1000 steps, squared cosine, ε); the pipeline gets a DDIM with the same betas."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=False)


def count_parameters(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# ---------------------------------------------------------------- VAE


def progress(step: int, steps: int, start: float, minutes: float) -> float:
    """Fraction of a stage done, by steps or by wall clock, whichever is further (drives the cosine decay).

    When the step count binds (tests, ``--check``) the schedule, hence the weights, are deterministic; when the
    time cap binds (the asset build on a shared CPU) the decay still completes within the budget.
    """
    return min(1.0, max((step - 1) / steps, (time.monotonic() - start) / (60 * minutes)))


def _image_stream(seed: int, batch_size: int, extra_object_p: float):
    import torch

    for batch in iter_noisy_image_batches(NoisyStreamConfig(seed=seed, batch_size=batch_size,
                                                            extra_object_p=extra_object_p)):
        yield batch, torch.from_numpy(batch.media) * 2.0 - 1.0  # the VAE's [-1, 1]


def train_vae(vae: Any, config: T2IBuildConfig, *, decoder_only: bool, log: Callable[[dict], None]) -> dict[str, Any]:
    """Train the VAE (or only its decoder) on rendered scenes; cosine lr decay over the planned steps.

    Loss: MSE + L1 on pixels in [-1, 1] + 1e-6·KL (the KL only keeps the posterior tame; the latents are used
    through their means). Returns ``{"steps", "seconds", "loss"}`` (last 50-step mean loss).
    """
    import torch

    steps, minutes = (config.decoder_steps, config.decoder_minutes) if decoder_only else \
        (config.vae_steps, config.vae_minutes)
    stage = "decoder" if decoder_only else "vae"
    vae.train()
    for p in vae.parameters():
        p.requires_grad_(True)
    if decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            for p in module.parameters():
                p.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    peak = config.vae_lr * (0.3 if decoder_only else 1.0)
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed * 1000 + (2 if decoder_only else 1))
    stream = _image_stream(config.seed * 1000 + (12 if decoder_only else 11), config.vae_batch_size,
                           config.extra_object_p)
    start, losses, step = time.monotonic(), [], 0
    for step in range(1, steps + 1):
        _, pixels = next(stream)
        for g in opt.param_groups:
            g["lr"] = peak * 0.5 * (1 + math.cos(math.pi * progress(step, steps, start, minutes)))
        if decoder_only:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.mean
            kl = torch.zeros(())
        else:
            dist = vae.encode(pixels).latent_dist
            latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
            kl = dist.kl().mean()
        recon = vae.decode(latents).sample
        loss = (recon - pixels).pow(2).mean() + (recon - pixels).abs().mean() + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        elapsed = time.monotonic() - start
        if step % 50 == 0:
            log({"stage": stage, "step": step, "loss": float(np.mean(losses[-50:])), "seconds": round(elapsed, 1)})
        if elapsed > 60 * minutes:
            break
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return {"steps": step, "seconds": round(time.monotonic() - start, 1), "loss": float(np.mean(losses[-50:]))}


def measure_scaling_factor(vae: Any, seed: int, batches: int = 8) -> float:
    """1 / std of the encoder's latent means over rendered scenes, so scaled latents have unit variance."""
    import torch

    stream = _image_stream(seed * 1000 + 13, 64, 0.0)
    with torch.no_grad():
        means = torch.cat([vae.encode(next(stream)[1]).latent_dist.mean for _ in range(batches)])
    return float(1.0 / means.std())


def vae_reconstruction_accuracy(vae: Any, seed: int, count: int = 256) -> dict[str, Any]:
    """Oracle accuracy of clean renders passed through encode (means) → decode; the ceiling of any sample."""
    import torch

    from visalign.shapes.evaluate import summarise

    stream = _image_stream(seed * 1000 + 14, count, 0.0)
    batch, pixels = next(stream)
    with torch.no_grad():
        recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    return summarise(((recon + 1) / 2).clamp(0, 1).numpy(), batch.captions)


# ---------------------------------------------------------------- UNet + text encoder


@dataclass
class DenoiserState:
    """What the UNet stage trains and checkpoints; EMA copies are what gets shipped."""

    unet: Any
    text_encoder: Any
    ema_unet: Any
    ema_text_encoder: Any
    optimizer: Any
    step: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def trainable(self) -> list[Any]:
        return [*self.unet.parameters(), *self.text_encoder.parameters()]

    def ema_pairs(self) -> list[tuple[Any, Any]]:
        return [*zip(self.ema_unet.parameters(), self.unet.parameters(), strict=True),
                *zip(self.ema_text_encoder.parameters(), self.text_encoder.parameters(), strict=True)]


def new_denoiser_state(tokenizer_dir: Path, config: T2IBuildConfig) -> DenoiserState:
    """Random-init UNet and text encoder (seeded), their EMA copies and the optimizer."""
    import copy

    import torch

    torch.manual_seed(config.seed)
    unet = build_unet(config.unet_channels, config.text_width)
    text_encoder = build_text_encoder(tokenizer_dir, config.text_width)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for p in (*ema_unet.parameters(), *ema_text.parameters()):
        p.requires_grad_(False)
    return DenoiserState(unet, text_encoder, ema_unet, ema_text, optimizer)


def denoiser_loss(state: DenoiserState, vae: Any, tokenizer: Any, scheduler: Any, batch_captions: list[str],
                  pixels: Any, generator: Any, scaling_factor: float, caption_dropout: float) -> Any:
    """ε-prediction MSE of one batch.

    Args:
        pixels: float32 ``[B, 3, 32, 32]`` in [-1, 1].
        generator: ``torch.Generator`` for noise, timesteps and caption dropout (the only torch randomness).

    Returns:
        Scalar loss tensor (with graph).
    """
    import torch

    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * scaling_factor
    batch = latents.shape[0]
    drop = torch.rand(batch, generator=generator) < caption_dropout
    captions = ["" if d else c for d, c in zip(drop.tolist(), batch_captions, strict=True)]
    # No attention mask: the stock pipeline encodes prompts without one, and training must match inference.
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    embeds = state.text_encoder(ids)[0]
    prediction = state.unet(noisy, timesteps, embeds).sample
    return torch.nn.functional.mse_loss(prediction, noise)


def train_denoiser(state: DenoiserState, vae: Any, tokenizer: Any, scaling_factor: float, config: T2IBuildConfig,
                   *, log: Callable[[dict], None], checkpoint: Callable[[DenoiserState], None] | None = None,
                   steps: int | None = None, minutes: float | None = None) -> DenoiserState:
    """Train UNet + text encoder from ``state.step`` until ``steps`` or the time cap; returns the state.

    The data stream and the torch generator are seeded by (seed, starting step), so a resumed run draws fresh
    data rather than replaying the first batches.
    """
    import torch

    steps = config.unet_steps if steps is None else steps
    minutes = config.unet_minutes if minutes is None else minutes
    scheduler = build_train_scheduler()
    generator = torch.Generator().manual_seed(config.seed * 1000 + 21 + 7919 * state.step)
    stream = _image_stream(config.seed * 1000 + 22 + 7919 * state.step, config.batch_size, config.extra_object_p)
    params = state.trainable()
    state.unet.train()
    state.text_encoder.train()
    start, last_checkpoint = time.monotonic() - state.seconds, time.monotonic()
    while state.step < steps and time.monotonic() - start < 60 * minutes:
        batch, pixels = next(stream)
        state.step += 1
        for g in state.optimizer.param_groups:
            warm = min(1.0, state.step / max(1, config.warmup_steps))
            done = progress(state.step, steps, start, minutes)
            g["lr"] = config.lr * warm * (0.55 + 0.45 * math.cos(math.pi * done))
        loss = denoiser_loss(state, vae, tokenizer, scheduler, batch.captions, pixels, generator, scaling_factor,
                             config.caption_dropout)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        state.optimizer.step()
        decay = min(config.ema_decay, (1 + state.step) / (10 + state.step))
        with torch.no_grad():
            for ema, p in state.ema_pairs():
                ema.lerp_(p, 1.0 - decay)
        state.losses.append(float(loss.detach()))
        state.seconds = time.monotonic() - start
        if state.step % 25 == 0:
            log({"stage": "unet", "step": state.step, "loss": float(np.mean(state.losses[-25:])),
                 "seconds": round(state.seconds, 1), "s_per_step": round(state.seconds / state.step, 3)})
        if checkpoint is not None and time.monotonic() - last_checkpoint > 60 * config.checkpoint_minutes:
            checkpoint(state)
            last_checkpoint = time.monotonic()
    state.unet.eval()
    state.text_encoder.eval()
    return state


# ---------------------------------------------------------------- saving


def save_pipeline(folder: str | Path, vae: Any, unet: Any, text_encoder: Any, tokenizer: Any, *, fp16: bool) -> Path:
    """Write a stock ``StableDiffusionPipeline`` folder (safetensors; DDIM scheduler; no safety checker).

    With ``fp16`` the UNet and VAE are stored in half precision (copies; the caller's modules are untouched) and
    the text encoder in fp32, so a plain ``DiffusionPipeline.from_pretrained(folder)`` gives an all-fp32 pipeline.
    """
    import copy
    import shutil

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config(build_train_scheduler().config)
    modules = [copy.deepcopy(m) for m in (vae, unet, text_encoder)]
    if fp16:
        # Only the diffusers models: their from_pretrained upcasts to fp32 by default, whereas transformers 5
        # loads a text encoder in its stored dtype, and a half text encoder feeding a float UNet fails on CPU.
        modules = [m.to(torch.float16) for m in modules[:2]] + modules[2:]
    pipe = StableDiffusionPipeline(vae=modules[0], unet=modules[1], text_encoder=modules[2], tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # the folder is either the old or the new pipeline, never half of each
    return folder


def save_state(path: Path, state: DenoiserState, extra: dict[str, Any]) -> None:
    """Checkpoint models, EMA copies and AdamW moments as one safetensors file plus a JSON of scalars."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    for prefix, module in (("unet", state.unet), ("text", state.text_encoder), ("ema_unet", state.ema_unet),
                           ("ema_text", state.ema_text_encoder)):
        tensors.update({f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()})
    opt = state.optimizer.state_dict()
    for index, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).clone().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "state.safetensors.tmp"))
    (path / "state.safetensors.tmp").replace(path / "state.safetensors")
    meta = {"step": state.step, "seconds": state.seconds, "losses": state.losses, **extra}
    (path / "state.json").write_text(json.dumps(meta))


def load_state(path: Path, state: DenoiserState) -> dict[str, Any]:
    """Restore :func:`save_state` output into ``state`` (modules and optimizer); returns the JSON scalars."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "state.safetensors"))
    for prefix, module in (("unet", state.unet), ("text", state.text_encoder), ("ema_unet", state.ema_unet),
                           ("ema_text", state.ema_text_encoder)):
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    opt = state.optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, slot = key.split(".", 2)
            opt["state"].setdefault(int(index), {})[slot] = value
    state.optimizer.load_state_dict(opt)
    meta = json.loads((path / "state.json").read_text())
    state.step, state.seconds, state.losses = meta["step"], meta["seconds"], meta["losses"]
    return meta


def config_dict(config: T2IBuildConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


# ---------------------------------------------------------------- the whole build


def _logger(work_dir: Path) -> Callable[[dict], None]:
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "log.jsonl"

    def log(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        with path.open("a") as f:
            f.write(line + "\n")

    return log


def _build_vae_stage(config: T2IBuildConfig, work: Path, log: Callable[[dict], None]) -> tuple[Any, dict[str, Any]]:
    """Train (or, on resume, reload) the VAE; returns it with its stage metrics."""
    import torch
    from diffusers import AutoencoderKL

    vae_dir = work / "vae"
    if config.resume and (vae_dir / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
        return vae, json.loads((work / "vae_metrics.json").read_text())
    torch.manual_seed(config.seed * 1000 + 3)
    vae = build_vae()
    metrics: dict[str, Any] = {"vae_parameters": count_parameters(vae)}
    metrics["vae"] = train_vae(vae, config, decoder_only=False, log=log)
    metrics["vae_recon_before_polish"] = vae_reconstruction_accuracy(vae, config.seed)
    metrics["decoder_polish"] = train_vae(vae, config, decoder_only=True, log=log)
    metrics["vae_recon"] = vae_reconstruction_accuracy(vae, config.seed)
    vae.register_to_config(scaling_factor=measure_scaling_factor(vae, config.seed))
    metrics["scaling_factor"] = vae.config.scaling_factor
    log({"stage": "vae-done", **{k: v for k, v in metrics.items() if not k.startswith("vae_recon_before")}})
    vae.save_pretrained(str(vae_dir), safe_serialization=True)
    (work / "vae_metrics.json").write_text(json.dumps(metrics))
    return vae, metrics


def eval_prompt_sets(prompts_dir: str | Path = "assets/shapes/prompts") -> dict[str, list[str]]:
    """The two shipped evaluation sets: held-in compositions (training mix) and held-out compositions."""
    from visalign.shapes.prompt_sets import read_prompt_set

    folder = Path(prompts_dir)
    return {"heldin": read_prompt_set(folder / "heldin_eval.txt"),
            "heldout_compositions": read_prompt_set(folder / "heldout_compositions.txt")}


def build_t2i(config: T2IBuildConfig, *, evaluate: bool = True, prompts_dir: str | Path = "assets/shapes/prompts"
              ) -> dict[str, Any]:
    """Run the whole text-to-image build and write ``config.out`` plus ``<out>/build.json``; returns the metrics.

    ``build.json`` holds the config, the step counts actually run, losses, sizes, the VAE's reconstruction
    accuracy and, with ``evaluate``, the oracle accuracy of the saved folder (reloaded from disk).
    """
    from transformers import CLIPTokenizer

    set_determinism(config.threads)
    work = Path(config.work_dir)
    log = _logger(work)
    started = time.monotonic()
    tokenizer_dir = write_clip_tokenizer(work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    vae, metrics = _build_vae_stage(config, work, log)
    scaling_factor = float(vae.config.scaling_factor)

    state = new_denoiser_state(tokenizer_dir, config)
    if config.resume and (work / "checkpoint" / "state.json").exists():
        load_state(work / "checkpoint", state)
        log({"stage": "resume", "step": state.step})

    def checkpoint(s: DenoiserState) -> None:
        save_state(work / "checkpoint", s, {"config": config_dict(config)})
        save_pipeline(work / "pipeline-latest", vae, s.ema_unet, s.ema_text_encoder, tokenizer, fp16=config.fp16)
        log({"stage": "checkpoint", "step": s.step})

    train_denoiser(state, vae, tokenizer, scaling_factor, config, log=log, checkpoint=checkpoint)
    checkpoint(state)
    out = save_pipeline(config.out, vae, state.ema_unet, state.ema_text_encoder, tokenizer, fp16=config.fp16)
    metrics.update({
        "config": config_dict(config),
        "unet": {"steps": state.step, "seconds": round(state.seconds, 1),
                 "loss_last_100": float(np.mean(state.losses[-100:])) if state.losses else None,
                 "loss_curve": [round(float(np.mean(state.losses[i:i + 100])), 4)
                                for i in range(0, len(state.losses), 100)]},
        "parameters": {"unet": count_parameters(state.unet), "text_encoder": count_parameters(state.text_encoder),
                       "vae": count_parameters(vae)},
        "train_minutes": round((time.monotonic() - started) / 60, 2),
        "size_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6, 2),
    })
    if evaluate:
        from visalign.shapes.evaluate import evaluate_folder

        eval_start = time.monotonic()
        sets = {name: prompts[:config.eval_prompts] for name, prompts in eval_prompt_sets(prompts_dir).items()}
        metrics["eval"] = evaluate_folder(out, sets)
        metrics["eval_seconds"] = round(time.monotonic() - eval_start, 1)
        log({"stage": "eval", **metrics["eval"]})
    (out / "build.json").write_text(json.dumps(metrics, indent=1))
    return metrics
