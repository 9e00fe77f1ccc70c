"""Build the shapes world's tiny text-to-video model: a stock diffusers ``AnimateDiffPipeline`` folder.

AnimateDiff (Guo et al., 2023, "AnimateDiff: Animate Your Personalized Text-to-Image Diffusion Models without
Specific Tuning") inserts temporal attention ("motion modules", a ``MotionAdapter``) into a *frozen* image UNet
and trains only those. Here the image UNet and VAE are the shipped text-to-image model's
(:mod:`visalign.shapes.build_t2i`), so the video model inherits its colours and shapes and spends its small
budget on motion. The text encoder starts from the image model's and is fine-tuned too: AnimateDiff's motion
modules have no cross-attention, so the direction word ("moving left") can only reach them through the
(frozen) spatial cross-attention, i.e. through what the text encoder puts into its token states.

Layout on disk: the folder holds its own ``text_encoder``, ``tokenizer``, ``scheduler`` and ``motion_adapter``;
``unet`` and ``vae`` are relative symlinks to the image model's (``../t2i/unet``, ``../t2i/vae``) and
``model_index.json`` names the unet a ``UNet2DConditionModel``, which ``AnimateDiffPipeline.__init__`` combines
with the motion adapter into a ``UNetMotionModel`` at load time. That keeps the shipped assets within their size
budget (the frozen weights are stored once); ``DiffusionPipeline.from_pretrained(folder)`` loads it unchanged.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visalign.shapes.build import ShapesDataConfig, iter_video_batches


@dataclass
class T2VBuildConfig:
    """Every knob of the text-to-video asset build."""

    out: str = field(default="assets/shapes/t2v", metadata={"help": "Pipeline folder to write (replaced)."})
    image_dir: str = field(default="assets/shapes/t2i", metadata={
        "help": "The text-to-image pipeline folder whose UNet and VAE are reused (frozen, symlinked)."})
    seed: int = field(default=0, metadata={"help": "Seed of every random draw of the build."})
    threads: int = field(default=1, metadata={"help": "torch threads (bit-identical results need a fixed count)."})
    num_frames: int = field(default=8, metadata={"help": "Frames per training clip (T)."})
    steps: int = field(default=100_000, metadata={"help": "Training steps (capped by minutes)."})
    minutes: float = field(default=8.0, metadata={"help": "Wall-clock cap on training, minutes."})
    batch_size: int = field(default=4, metadata={"help": "Clips per step (each of num_frames frames)."})
    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (motion modules, text encoder)."})
    text_lr_scale: float = field(default=0.3, metadata={
        "help": "Text-encoder learning rate as a fraction of lr (it starts trained; the motion modules do not)."})
    warmup_steps: int = field(default=20, metadata={"help": "Linear learning-rate warm-up, steps."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Share of captions replaced by '' (for CFG)."})
    fp16: bool = field(default=True, metadata={"help": "Store the trained weights in fp16."})


def build_motion_adapter(channels: tuple[int, ...]) -> Any:
    """A random-init ``MotionAdapter`` matching a 3-level UNet: one temporal transformer per block, 4 heads."""
    from diffusers import MotionAdapter

    return MotionAdapter(block_out_channels=tuple(channels), motion_layers_per_block=1,
                         motion_num_attention_heads=4, motion_norm_num_groups=16, motion_max_seq_length=16,
                         use_motion_mid_block=False)


def _load_image_model(image_dir: Path) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {"vae": AutoencoderKL.from_pretrained(str(image_dir / "vae"), torch_dtype=torch.float32).eval(),
            "unet": UNet2DConditionModel.from_pretrained(str(image_dir / "unet"), torch_dtype=torch.float32).eval(),
            "text_encoder": CLIPTextModel.from_pretrained(str(image_dir / "text_encoder"), torch_dtype=torch.float32),
            "tokenizer": CLIPTokenizer.from_pretrained(str(image_dir / "tokenizer"))}


def clip_loss(unet: Any, text_encoder: Any, vae: Any, tokenizer: Any, scheduler: Any, clips: Any,
              captions: list[str], generator: Any, caption_dropout: float) -> Any:
    """ε-prediction MSE of a batch of clips.

    Args:
        clips: float32 ``[B, T, 3, H, W]`` in [0, 1].
        generator: ``torch.Generator`` for noise, timesteps and caption dropout.
    """
    import torch

    batch, frames = clips.shape[:2]
    with torch.no_grad():
        flat = clips.reshape(batch * frames, *clips.shape[2:]) * 2.0 - 1.0
        latents = vae.encode(flat).latent_dist.mean * vae.config.scaling_factor
    latents = latents.reshape(batch, frames, *latents.shape[1:]).permute(0, 2, 1, 3, 4)  # [B, C, T, h, w]
    drop = torch.rand(batch, generator=generator) < caption_dropout
    texts = ["" if d else c for d, c in zip(drop.tolist(), captions, strict=True)]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    # AnimateDiffPipeline repeats each prompt's states once per frame; training must feed the same layout.
    embeds = text_encoder(ids)[0].repeat_interleave(frames, dim=0)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
    return torch.nn.functional.mse_loss(prediction, noise)


def train_motion(config: T2VBuildConfig, parts: dict[str, Any], log: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Train motion modules (+ text encoder) on seeded motion clips; returns (motion unet, text encoder, stats)."""
    import torch
    from diffusers import UNetMotionModel

    from visalign.shapes.build_t2i import build_train_scheduler, progress

    torch.manual_seed(config.seed * 1000 + 31)
    adapter = build_motion_adapter(tuple(parts["unet"].config.block_out_channels))
    unet = UNetMotionModel.from_unet2d(parts["unet"], adapter)
    unet.freeze_unet2d_params()  # only the motion modules train; the image UNet stays the shipped one
    text_encoder = parts["text_encoder"].train()
    motion_params = [p for p in unet.parameters() if p.requires_grad]
    text_params = list(text_encoder.parameters())
    opt = torch.optim.AdamW([{"params": motion_params, "lr": config.lr},
                             {"params": text_params, "lr": config.lr * config.text_lr_scale}], weight_decay=0.01)
    peaks = [config.lr, config.lr * config.text_lr_scale]
    scheduler = build_train_scheduler()
    generator = torch.Generator().manual_seed(config.seed * 1000 + 32)
    stream = iter_video_batches(ShapesDataConfig(seed=config.seed * 1000 + 33, batch_size=config.batch_size,
                                                 num_frames=config.num_frames))
    unet.train()
    start, losses, step = time.monotonic(), [], 0
    while step < config.steps and time.monotonic() - start < 60 * config.minutes:
        step += 1
        batch = next(stream)
        done = progress(step, config.steps, start, config.minutes)
        for group, peak in zip(opt.param_groups, peaks, strict=True):
            group["lr"] = peak * min(1.0, step / config.warmup_steps) * (0.55 + 0.45 * math.cos(math.pi * done))
        loss = clip_loss(unet, text_encoder, parts["vae"], parts["tokenizer"], scheduler,
                         torch.from_numpy(batch.media), batch.captions, generator, config.caption_dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(motion_params + text_params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            log({"stage": "t2v", "step": step, "loss": float(np.mean(losses[-10:])),
                 "seconds": round(time.monotonic() - start, 1)})
    unet.eval()
    text_encoder.eval()
    stats = {"steps": step, "seconds": round(time.monotonic() - start, 1),
             "loss_last_20": float(np.mean(losses[-20:])) if losses else None,
             "motion_parameters": int(sum(p.numel() for p in motion_params))}
    return unet, text_encoder, stats


def save_t2v_pipeline(folder: Path, image_dir: Path, unet_motion: Any, text_encoder: Any, tokenizer: Any,
                      *, fp16: bool) -> Path:
    """Write the AnimateDiff folder with ``unet``/``vae`` symlinked to ``image_dir`` (see the module docstring)."""
    import copy

    import torch
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    adapter_dir = folder.with_name(folder.name + ".adapter")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    unet_motion.save_motion_modules(str(adapter_dir), safe_serialization=True)
    adapter = MotionAdapter.from_pretrained(str(adapter_dir))
    shutil.rmtree(adapter_dir, ignore_errors=True)
    text = copy.deepcopy(text_encoder)  # fp32 on disk: transformers loads it in its stored dtype (see build_t2i)
    if fp16:
        adapter = adapter.to(torch.float16)
    image_scheduler = DDIMScheduler.from_pretrained(str(image_dir / "scheduler"))
    pipe = AnimateDiffPipeline(vae=AutoencoderKL.from_pretrained(str(image_dir / "vae")), text_encoder=text,
                               tokenizer=tokenizer,
                               unet=UNet2DConditionModel.from_pretrained(str(image_dir / "unet")),
                               motion_adapter=adapter, scheduler=image_scheduler)
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name in ("unet", "vae"):
        shutil.rmtree(folder / name)
        (folder / name).symlink_to(Path("..") / image_dir.name / name, target_is_directory=True)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _own_size_mb(folder: Path) -> float:
    """Size of the files stored in ``folder`` itself (symlinked sub-folders are the image model's)."""
    own = [f for entry in folder.iterdir() if not entry.is_symlink()
           for f in ([entry] if entry.is_file() else entry.rglob("*")) if f.is_file()]
    return round(sum(f.stat().st_size for f in own) / 1e6, 2)


def build_t2v(config: T2VBuildConfig, *, evaluate: bool = True, prompts_dir: str | Path = "assets/shapes/prompts"
              ) -> dict[str, Any]:
    """Train and save the text-to-video folder next to the image model; writes ``<out>/build.json``."""
    from visalign.shapes.build_t2i import _logger, set_determinism

    set_determinism(config.threads)
    out, image_dir = Path(config.out), Path(config.image_dir)
    if out.parent.resolve() != image_dir.parent.resolve():
        raise ValueError(f"out ({out}) and image_dir ({image_dir}) must be siblings: the video folder links to the "
                         "image model's unet and vae by relative path.")
    log = _logger(out.with_name(out.name + ".work"))
    parts = _load_image_model(image_dir)
    unet, text_encoder, stats = train_motion(config, parts, log)
    save_t2v_pipeline(out, image_dir, unet, text_encoder, parts["tokenizer"], fp16=config.fp16)
    metrics: dict[str, Any] = {"config": dict(config.__dict__), "train": stats, "size_mb_own_files": _own_size_mb(out)}
    if evaluate:
        from visalign.shapes.evaluate import EvalConfig, evaluate_folder
        from visalign.shapes.prompt_sets import read_prompt_set

        prompts = read_prompt_set(Path(prompts_dir) / "video_eval.txt")
        sets = {"heldin": prompts[:24], "heldout_motion": prompts[24:]}
        metrics["eval"] = evaluate_folder(out, sets, EvalConfig(num_frames=config.num_frames, batch_size=8))
        log({"stage": "t2v-eval", **metrics["eval"]})
    (out / "build.json").write_text(json.dumps(metrics, indent=1))
    return metrics
