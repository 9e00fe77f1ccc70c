"""Tiny random-init flow-matching and CogVideoX pipelines, built in code and saved as diffusers folders.

Component sizes follow diffusers' own fast tests (``get_dummy_components`` in tests/pipelines/{stable_diffusion_3,
flux,wan,ltx,cogvideo}) except that the tokenizers are built here from a few words instead of being downloaded
(``hf-internal-testing/tiny-random-*`` is unreachable offline). Each builder writes ``pipe.save_pretrained(folder)``
once (safetensors) and returns the folder, so adapters are exercised through the real ``from_pretrained`` path.

Imported explicitly by tests/generators/test_flow*.py and test_cogvideox.py (not a conftest, so it cannot clash
with the UNet adapters' tests/generators/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

WORDS = ("a an the red blue green yellow cube circle square triangle of and on left right two one painting cat "
         "dog photo monkey dance blurry").split()


def clip_tokenizer(folder: Path):
    """A character-level CLIP BPE tokenizer (256 byte symbols, their ``</w>`` forms, no merges) saved to ``folder``.

    Built through ``from_pretrained`` on written vocab/merges files: transformers 5's ``vocab_file=`` constructor
    silently yields a two-token vocabulary.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    src = folder / "_clip_tokenizer_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(src, model_max_length=77, pad_token="<|endoftext|>")


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table (256 symbols), in its canonical order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def t5_tokenizer():
    """A word-level (Unigram) T5 tokenizer over :data:`WORDS` plus single letters; ids < 64."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"] + ["▁" + w for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz") + ["▁"]
    model = models.Unigram([(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)], unk_id=2)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def t5_encoder(umt5: bool = False):
    """A 1-layer, 32-wide T5 encoder (UMT5 for Wan, whose pipeline declares that class)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    sizes = dict(vocab_size=64, d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4)
    torch.manual_seed(0)
    return UMT5EncoderModel(UMT5Config(**sizes)) if umt5 else T5EncoderModel(T5Config(**sizes))


def _clip_text(with_projection: bool, eos_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=eos_token_id - 1, eos_token_id=eos_token_id, hidden_size=32,
                            intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                            vocab_size=520, hidden_act="gelu", projection_dim=32, max_position_embeddings=77)
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _image_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def build_sd3(folder: Path) -> Path:
    """StableDiffusion3Pipeline: 1-layer SD3 transformer, two 2-layer CLIPs, a 1-layer T5; VAE factor 2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    out = folder / "sd3"
    if (out / "model_index.json").exists():
        return out
    tok = clip_tokenizer(folder)
    eos = tok.eos_token_id
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer, vae=_image_vae(4),
        text_encoder=_clip_text(True, eos), text_encoder_2=_clip_text(True, eos), text_encoder_3=t5_encoder(),
        tokenizer=tok, tokenizer_2=tok, tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(out)
    return out


def build_flux(folder: Path) -> Path:
    """FluxPipeline: 1 double + 1 single block, CLIP + T5; guidance-distilled (``guidance_embeds=True``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    out = folder / "flux"
    if (out / "model_index.json").exists():
        return out
    tok = clip_tokenizer(folder)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=16, max_image_seq_len=256)
    pipe = FluxPipeline(scheduler=scheduler, transformer=transformer, vae=_image_vae(1),
                        text_encoder=_clip_text(False, tok.eos_token_id), text_encoder_2=t5_encoder(),
                        tokenizer=tok, tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(out)
    return out


def build_wan(folder: Path) -> Path:
    """WanPipeline (2.1 text-to-video): 2-layer transformer, tiny causal 3-D VAE (×8 space, ×4 time)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    out = folder / "wan"
    if (out / "model_index.json").exists():
        return out
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    pipe = WanPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(umt5=True), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer)
    pipe.save_pretrained(out)
    return out


def build_ltx(folder: Path) -> Path:
    """LTXPipeline: 1-layer LTX transformer, tiny LTX VAE (×4 space, ×4 time)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    out = folder / "ltx"
    if (out / "model_index.json").exists():
        return out
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=1, caption_channels=32)
    torch.manual_seed(0)
    # The decoder is given the encoder's sizes explicitly: its defaults in diffusers 0.42 upsample three times,
    # which would decode to 4× the frames/pixels the pipeline's compression ratios predict.
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                                patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5_encoder(),
                       tokenizer=t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(out)
    return out


def build_cogvideox(folder: Path) -> Path:
    """CogVideoXPipeline: 1-layer transformer, tiny CogVideoX VAE (×8 space, ×4 time), CogVideoX's DDIM."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    out = folder / "cogvideox"
    if (out / "model_index.json").exists():
        return out
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=16)
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    # CogVideoX-2b's scheduler config: v-prediction, zero terminal SNR, trailing spacing.
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing", beta_schedule="scaled_linear",
                                       beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=True,
                                       snr_shift_scale=3.0)
    pipe = CogVideoXPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(), vae=vae, transformer=transformer,
                             scheduler=scheduler)
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def flow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One session folder shared by every tiny flow/CogVideoX pipeline."""
    return tmp_path_factory.mktemp("tiny-flow-pipelines")
