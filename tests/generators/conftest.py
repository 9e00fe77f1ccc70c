"""Tiny random-init UNet pipelines (SD, SDXL, AnimateDiff, TextToVideoSD), built in code, saved as diffusers folders.

Component sizes follow diffusers' fast tests (``get_dummy_components`` in tests/pipelines/{stable_diffusion,
stable_diffusion_xl, animatediff, text_to_video_synthesis}) shrunk further (one layer per block, 16-px latents).
The CLIP tokenizer is written here as character-level vocab/merges files and loaded with ``from_pretrained``
(transformers 5's ``vocab_file=`` constructor silently yields a two-token vocabulary). Every builder saves the
pipeline with ``save_pretrained`` (safetensors) once per session and returns the folder, so adapters are exercised
through the real ``from_pretrained`` loading path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TOKENS = 16  # tokenizer/model max length; short prompts keep the text encoders cheap


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table (256 symbols), in its canonical order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def write_clip_tokenizer(folder: Path):
    """A character-level CLIP tokenizer (514 ids) saved in ``folder``; returns it loaded with ``from_pretrained``."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=TOKENS, pad_token="<|endoftext|>")


def clip_text_encoder(with_projection: bool = False, hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=hidden,
                            intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=514,
                            max_position_embeddings=TOKENS, projection_dim=projection_dim, hidden_act="gelu")
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=32, sample_size=32)


def ddim_scheduler(**overrides):
    from diffusers import DDIMScheduler

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    config.update(overrides)
    return DDIMScheduler(**config)


def build_sd(folder: Path, cross_attention_dim: int = 32, prediction_type: str = "epsilon") -> Path:
    """Tiny ``StableDiffusionPipeline``: 32-px images (VAE factor 2, 16-px latents)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=tiny_vae(), text_encoder=clip_text_encoder(hidden=cross_attention_dim),
        tokenizer=write_clip_tokenizer(folder / "_tok"), scheduler=ddim_scheduler(prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_sdxl(folder: Path) -> Path:
    """Tiny ``StableDiffusionXLPipeline``: two CLIP encoders (16 + 16 → 32 cross-attn dim), pooled + time ids."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=16 + 6 * 8, cross_attention_dim=32,
                                norm_num_groups=32)
    tokenizer = write_clip_tokenizer(folder / "_tok")
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=tiny_vae(), text_encoder=clip_text_encoder(hidden=16),
        text_encoder_2=clip_text_encoder(with_projection=True, hidden=16, projection_dim=16),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=ddim_scheduler(), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def unet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session folder holding the tiny UNet pipelines, each written once."""
    return tmp_path_factory.mktemp("tiny-unet-pipelines")


@pytest.fixture(scope="session")
def sd_path(unet_dir: Path) -> Path:
    return build_sd(unet_dir / "sd")


@pytest.fixture(scope="session")
def sd_other_path(unet_dir: Path) -> Path:
    """A second tiny SD whose cross-attention width differs (48): its LoRA shapes do not fit ``sd_path``."""
    return build_sd(unet_dir / "sd-other", cross_attention_dim=48)


@pytest.fixture(scope="session")
def sdxl_path(unet_dir: Path) -> Path:
    return build_sdxl(unet_dir / "sdxl")


def build_animatediff(folder: Path) -> Path:
    """Tiny ``AnimateDiffPipeline``: SD UNet + one motion layer per block (32-px frames)."""
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    motion = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=32,
                           motion_num_attention_heads=4)
    pipe = AnimateDiffPipeline(unet=unet, motion_adapter=motion, vae=tiny_vae(), text_encoder=clip_text_encoder(),
                               tokenizer=write_clip_tokenizer(folder / "_tok"), scheduler=ddim_scheduler(),
                               feature_extractor=None, image_encoder=None)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_text_to_video(folder: Path) -> Path:
    """Tiny ``TextToVideoSDPipeline`` (ModelScope layout): a ``UNet3DConditionModel``."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    unet = UNet3DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    pipe = TextToVideoSDPipeline(unet=unet, vae=tiny_vae(), text_encoder=clip_text_encoder(),
                                 tokenizer=write_clip_tokenizer(folder / "_tok"), scheduler=ddim_scheduler())
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def video_paths(unet_dir: Path) -> dict[str, Path]:
    """Pipeline class name → folder of its tiny video pipeline."""
    return {"AnimateDiffPipeline": build_animatediff(unet_dir / "animatediff"),
            "TextToVideoSDPipeline": build_text_to_video(unet_dir / "t2v")}


def stock_images(pipe, prompts, seeds, steps, guidance, lora_dir=None):
    """The stock diffusers pipeline's output, ``output_type="pt"`` ([B, 3, H, W] in [0, 1]); with ``lora_dir`` the
    LoRA is loaded with ``load_lora_weights`` for this call and unloaded afterwards."""
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    try:
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                    output_type="pt").images
    finally:
        if lora_dir is not None:
            pipe.unload_lora_weights()
