"""``visalign sample``: generate media from a (fine-tuned) generator, with a grid and the seed of every file.

Thin by design (docs/extending.md#files-and-names): parse, :func:`visalign.generators.load_generator`, ``rollout``,
write files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="Generate images/videos from a diffusers model (optionally with a LoRA).",
                       description="Sample every prompt of a file; writes one file per sample, grid.png and "
                                   "seeds.json (prompt and seed of each file, so any sample can be regenerated).")
    p.add_argument("--model", required=True, help="Hub id or local diffusers pipeline folder.")
    p.add_argument("--lora", help="LoRA folder written by visalign (or any diffusers LoRA for this base model).")
    p.add_argument("--prompts", required=True, help="Text file, one prompt per line (blank and # lines skipped).")
    p.add_argument("--out", required=True, help="Output folder (created).")
    p.add_argument("--images-per-prompt", type=int, default=1, help="Samples per prompt.")
    p.add_argument("--steps", type=int, default=30, help="Denoising steps.")
    p.add_argument("--guidance", type=float, default=5.0, help="Classifier-free guidance scale (<= 1 turns it off).")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta / SDE noise level; 0 = deterministic sampler.")
    p.add_argument("--seed", type=int, default=0, help="Sample i uses seed SEED + i.")
    p.add_argument("--negative-prompt", default=None, help="Negative prompt for every sample.")
    p.add_argument("--height", type=int, help="Height in pixels (default: the model's native size).")
    p.add_argument("--width", type=int, help="Width in pixels (default: the model's native size).")
    p.add_argument("--num-frames", type=int, help="Frames per video (video models only).")
    p.add_argument("--batch-size", type=int, default=4, help="Prompts sampled together (memory vs speed).")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="Compute dtype.")
    p.add_argument("--device", default="cpu", help="Device, e.g. cpu or cuda.")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file: one per line, blank lines and lines starting with '#' skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file; give a text file with one prompt per line.")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts; write one prompt per line.")
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch

    from visalign.generators import load_generator
    from visalign.media import make_grid, save_image, save_video

    prompts = read_prompts(args.prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = load_generator(args.model, dtype=args.dtype, device=args.device, lora=args.lora)
    records, firsts = [], []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        # Seeds continue across chunks, so the files do not depend on --batch-size.
        rollout = generator.rollout(chunk, images_per_prompt=args.images_per_prompt, steps=args.steps,
                                    guidance=args.guidance, eta=args.eta, seed=args.seed + len(records),
                                    negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                                    num_frames=args.num_frames)
        for media, prompt, seed in zip(rollout.media, rollout.prompts, rollout.seeds, strict=True):
            name = f"{len(records):05d}" + (".gif" if media.ndim == 4 else ".png")
            (save_video if media.ndim == 4 else save_image)(media, out / name)
            firsts.append(media[0] if media.ndim == 4 else media)  # a video's first frame stands for it in the grid
            records.append({"file": name, "prompt": prompt, "seed": seed})
    save_image(make_grid(torch.stack(firsts).cpu(), columns=args.images_per_prompt), out / "grid.png")
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    (out / "seeds.json").write_text(json.dumps({"settings": settings, "samples": records}, indent=2))
    print(f"Wrote {len(records)} samples, grid.png and seeds.json to {out}")
    return 0
