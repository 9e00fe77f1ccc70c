"""The GPU suite: one script, random weights at real sizes, the numbers that decide whether the training path is
fast enough (docs/architecture.md#scale). Under 8 minutes on one H100/H200 at ``--size real``; ``--size tiny`` runs
the same code on CPU in seconds (tests/test_gpu_suite.py).

    python benchmarks/gpu_suite.py --device cuda --dtype bfloat16 --out benchmarks/results/gpu_suite.json
    python benchmarks/gpu_suite.py --size tiny                         # CPU smoke run of every measurement

Models (random init, so no download): an SD1.5-size UNet pipeline at 512 px (UNet 860 M parameters, VAE, a CLIP-L-
size text encoder with a character-level tokenizer) and an SD3.5-Medium-size flow DiT (``SD3Transformer2DModel``,
24 layers × 1536 wide, 2.24 B parameters, 1024 px → 128² latents) measured as a denoiser (its three text encoders are
replaced by random embeddings of the right shapes).

Measurements (median of ``--runs`` interleaved pairs where two things are compared):

- SD1.5: visalign's rollout with per-step log-probs vs the stock ``StableDiffusionPipeline`` call (same steps,
  CFG, batch); a LoRA training step (every step's log-prob, backward) vs a bare UNet forward+backward over the same
  steps; images per GPU per second of the rollout; per-phase time of a real ``Trainer`` iteration (sample, score,
  update); MFU of the training step; peak memory of the update with and without gradient checkpointing.
- Both models: denoiser forward+backward time with SDPA (``AttnProcessor2_0``), the eager attention
  (``AttnProcessor``) and xformers when installed; MFU; peak memory with and without checkpointing.

MFU = FLOPs counted by ``torch.utils.flop_counter`` on one forward (backward counted as 2× forward) ÷ time ÷ the
device's peak dense bf16 FLOP/s (``--peak-tflops``; known for H100/H200 SXM: 989). CPU runs report FLOPs and time
but no MFU, and peak memory only on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Peak dense bf16 tensor FLOP/s by device-name fragment (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}

# SD1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json) and a tiny one of the same layout.
SD_UNET = {"real": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                        block_out_channels=(320, 640, 1280, 1280)),
           "tiny": dict(sample_size=16, cross_attention_dim=32, attention_head_dim=8, layers_per_block=1,
                        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))}
SD_VAE = {"real": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
          "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)}
SD_TEXT = {"real": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
           "tiny": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)}
# SD3.5 Medium's transformer (stabilityai/stable-diffusion-3.5-medium transformer/config.json) and a tiny one.
DIT = {"real": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                    dual_attention_layers=tuple(range(13))),
       "tiny": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                    num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                    pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32, qk_norm="rms_norm",
                    dual_attention_layers=(0,))}
SIZES = {"real": {"batch": 4, "steps": 20, "dit_batch": 2, "text_tokens": 77, "t5_tokens": 256},
         "tiny": {"batch": 2, "steps": 2, "dit_batch": 2, "text_tokens": 16, "t5_tokens": 8}}


def paired(ours: Callable[[], Any], theirs: Callable[[], Any], runs: int) -> dict[str, float]:
    """Median seconds of two callables timed interleaved after one warm-up each, and the median per-pair ratio."""
    ours(), theirs()
    a, b = [], []
    for _ in range(runs):
        for fn, times in ((ours, a), (theirs, b)):
            times.append(timed(fn))
    return {"ours_s": statistics.median(a), "theirs_s": statistics.median(b),
            "ratio": statistics.median(x / y for x, y in zip(a, b, strict=True))}


def timed(fn: Callable[[], Any]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory(fn: Callable[[], Any], device: str) -> float | None:
    """Peak CUDA memory (GiB) allocated while ``fn`` runs; None off CUDA."""
    if not device.startswith("cuda"):
        fn()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() / 2**30


def forward_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    return None if not peak_tflops else flops / seconds / (peak_tflops * 1e12)


def attention_variants(module: torch.nn.Module) -> dict[str, Callable[[], None]]:
    """Attention backends to compare: SDPA, eager, and xformers when it is installed."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    variants: dict[str, Callable[[], None]] = {}
    if hasattr(module, "set_attn_processor") and not hasattr(module, "transformer_blocks"):
        variants["sdpa"] = lambda: module.set_attn_processor(AttnProcessor2_0())
        variants["eager"] = lambda: module.set_attn_processor(AttnProcessor())
    else:  # joint-attention DiTs keep their own processors; SDPA is their default
        variants["sdpa"] = lambda: None
    with contextlib.suppress(Exception):
        import xformers  # noqa: F401

        variants["xformers"] = module.enable_xformers_memory_efficient_attention
    return variants


def denoiser_suite(name: str, module: torch.nn.Module, inputs: Callable[[], dict[str, Any]], args: Any
                   ) -> dict[str, Any]:
    """fwd+bwd time per attention backend, FLOPs, MFU and peak memory with and without checkpointing."""
    module.train(False)
    module.requires_grad_(True)

    def step() -> None:
        out = module(**inputs(), return_dict=False)[0]
        out.float().square().mean().backward()
        module.zero_grad(set_to_none=True)

    with torch.autocast(args.device.split(":")[0], dtype=args.autocast, enabled=args.autocast is not None):
        flops = 3 * forward_flops(lambda: module(**inputs(), return_dict=False))
        result: dict[str, Any] = {"params_m": sum(p.numel() for p in module.parameters()) / 1e6,
                                  "train_step_gflops": flops / 1e9, "attention": {}}
        for variant, apply in attention_variants(module).items():
            apply()
            step()
            seconds = statistics.median(timed(step) for _ in range(args.runs))
            result["attention"][variant] = {"fwd_bwd_s": seconds, "mfu": mfu(flops, seconds, args.peak_tflops)}
        attention_variants(module)["sdpa"]()
        result["peak_gib"] = peak_memory(step, args.device)
        module.enable_gradient_checkpointing()
        step()
        result["peak_gib_checkpointing"] = peak_memory(step, args.device)
        result["fwd_bwd_s_checkpointing"] = statistics.median(timed(step) for _ in range(args.runs))
        module.disable_gradient_checkpointing()
    print(f"[{name}] {json.dumps(result)}", flush=True)
    return result


def build_sd_pipeline(folder: Path, size: str) -> Path:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.generators.conftest import ddim_scheduler, write_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(folder / "_tok")
    tokenizer.model_max_length = SIZES[size]["text_tokens"]
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, vocab_size=514,
                                        max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
                                        **SD_TEXT[size]))
    pipe = StableDiffusionPipeline(unet=UNet2DConditionModel(**SD_UNET[size]), vae=AutoencoderKL(**SD_VAE[size]),
                                   text_encoder=text, tokenizer=tokenizer, scheduler=ddim_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def sd_suite(args: Any, work: Path) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline

    from benchmarks.train_iteration import time_stages
    from visalign.generators import LoraSpec, load_generator
    from visalign.train.config import load_train_config
    from visalign.train.loop import Trainer

    s = SIZES[args.size]
    folder = build_sd_pipeline(work / "sd", args.size)
    prompts = [f"prompt {i}" for i in range(s["batch"])]
    gen = load_generator(folder, dtype=args.dtype, device=args.device)
    stock = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=getattr(torch, args.dtype)).to(args.device)
    stock.set_progress_bar_config(disable=True)
    steps, guidance = s["steps"], 7.5

    def ours() -> None:
        gen.rollout(prompts, steps=steps, guidance=guidance, eta=1.0, seed=0)

    def theirs() -> None:
        stock(prompts, num_inference_steps=steps, guidance_scale=guidance, eta=1.0, output_type="pt",
              generator=[torch.Generator(args.device).manual_seed(i) for i in range(len(prompts))])

    out: dict[str, Any] = {"rollout_vs_stock": paired(ours, theirs, args.runs)}
    out["images_per_gpu_per_s"] = s["batch"] / out["rollout_vs_stock"]["ours_s"]
    gen.add_lora(LoraSpec(rank=16, alpha=16.0))
    rollout = gen.rollout(prompts, steps=steps, guidance=guidance, eta=1.0, seed=0)

    def train_step() -> None:
        for i in range(steps):
            gen.step_log_prob(rollout, [i]).sum().backward()

    def bare_step() -> None:
        for i in range(steps):
            with torch.enable_grad():
                gen.predict(rollout.plan, rollout.latents[:, i], i).float().square().mean().backward()

    out["update_vs_bare_fwd_bwd"] = paired(train_step, bare_step, args.runs)
    unet = gen.denoiser
    latents = rollout.latents[:, 0]
    embeds = torch.randn(2 * s["batch"], s["text_tokens"], unet.config.cross_attention_dim, device=args.device,
                         dtype=getattr(torch, args.dtype))
    x = torch.cat([latents, latents]).to(getattr(torch, args.dtype))
    t = torch.full((x.shape[0],), 500, device=args.device)
    fwd = forward_flops(lambda: unet(x, t, encoder_hidden_states=embeds, return_dict=False))
    out["update_mfu"] = mfu(3 * fwd * steps, out["update_vs_bare_fwd_bwd"]["ours_s"], args.peak_tflops)
    out["update_peak_gib"] = peak_memory(train_step, args.device)
    unet.enable_gradient_checkpointing()
    out["update_peak_gib_checkpointing"] = peak_memory(train_step, args.device)
    unet.disable_gradient_checkpointing()
    out["unet"] = denoiser_suite("sd15-unet", unet, lambda: {"sample": x, "timestep": t,
                                                              "encoder_hidden_states": embeds}, args)

    config = load_train_config(REPO / "pipelines" / "tiny-sd-grpo.yaml", [
        f"model.model={folder}", f"run.output_dir={work / 'run'}", "sample.prompts_per_step=2",
        f"sample.images_per_prompt={max(2, s['batch'] // 2)}", f"sample.steps={steps}", "eval.prompts=null",
        "run.tensorboard=false", "run.progress=false", f"model.device={args.device}", f"model.dtype={args.dtype}",
        "model.lora_rank=16", "model.lora_alpha=16"])
    times = time_stages(Trainer(config), args.runs)
    out["trainer_phases_s"] = {k: statistics.median(v) for k, v in times.items()}
    print(f"[sd15] {json.dumps({k: v for k, v in out.items() if k != 'unet'})}", flush=True)
    return out


def dit_suite(args: Any) -> dict[str, Any]:
    from diffusers import SD3Transformer2DModel

    s, cfg = SIZES[args.size], DIT[args.size]
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):  # initialised where it runs: 2.24 B parameters are slow to init on a CPU
        model = SD3Transformer2DModel(**cfg).to(dtype)
    b, side = s["dit_batch"], cfg["sample_size"]
    x = torch.randn(b, cfg["in_channels"], side, side, device=args.device, dtype=dtype)
    text = torch.randn(b, s["t5_tokens"] + s["text_tokens"], cfg["joint_attention_dim"], device=args.device,
                       dtype=dtype)
    pooled = torch.randn(b, cfg["pooled_projection_dim"], device=args.device, dtype=dtype)
    t = torch.full((b,), 500.0, device=args.device)
    result = denoiser_suite("sd35m-dit", model, lambda: {"hidden_states": x, "encoder_hidden_states": text,
                                                          "pooled_projections": pooled, "timestep": t}, args)
    result["images_per_gpu_per_s_fwd_bwd"] = b / result["attention"]["sdpa"]["fwd_bwd_s"]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak dense bf16 TFLOP/s for MFU")
    parser.add_argument("--only", choices=["sd15", "dit"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.autocast = None  # the models are cast to args.dtype; autocast stays off so dtypes are what they say
    name = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU"
    if args.peak_tflops is None and cuda:
        args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "size": args.size, "dtype": args.dtype,
                               "runs": args.runs, "peak_tflops": args.peak_tflops}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as work:
        if args.only in (None, "sd15"):
            results["sd15"] = sd_suite(args, Path(work))
        if args.only in (None, "dit"):
            results["sd35m_dit"] = dit_suite(args)
    results["wall_s"] = time.perf_counter() - start
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(f"done in {results['wall_s']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
