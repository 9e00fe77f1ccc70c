"""Oracle evaluation of a saved shapes-world pipeline folder, through the stock diffusers load path.

Builds on :mod:`visalign.shapes.oracle` (exact grading from pixels) and the shipped prompt sets
(:mod:`visalign.shapes.prompt_sets`). Sampling uses fixed per-prompt seeds, so two evaluations of two models
are paired sample for sample (docs/shapes.md#generator, evaluation protocol: DDIM 20 steps, η = 0, CFG 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visalign.shapes.grammar import parse_prompt
from visalign.shapes.oracle import ATTRIBUTES, grade


@dataclass
class EvalConfig:
    """How a pipeline folder is sampled for oracle evaluation."""

    guidance: float = field(default=4.0, metadata={"help": "Classifier-free guidance scale."})
    steps: int = field(default=20, metadata={"help": "DDIM steps."})
    eta: float = field(default=0.0, metadata={"help": "DDIM η: 0 is the deterministic sampler; 1 the stochastic "
                                                      "one GRPO rollouts train (noise seeded per prompt too)."})
    seed: int = field(default=1234, metadata={"help": "Prompt i is sampled with torch seed SEED + i."})
    batch_size: int = field(default=64, metadata={"help": "Prompts sampled together (memory vs speed)."})
    num_frames: int | None = field(default=None, metadata={"help": "Frames per clip (video pipelines only)."})


def sample_pipeline(pipeline: Any, prompts: Sequence[str], config: EvalConfig) -> np.ndarray:
    """Sample one image (or clip) per prompt with per-prompt seeded generators.

    Returns:
        float32 in [0, 1]: ``[B, 3, H, W]`` for image pipelines, ``[B, T, 3, H, W]`` for video pipelines.
    """
    import torch

    chunks = []
    for start in range(0, len(prompts), config.batch_size):
        chunk = list(prompts[start:start + config.batch_size])
        generators = [torch.Generator().manual_seed(config.seed + start + i) for i in range(len(chunk))]
        kwargs: dict[str, Any] = {"guidance_scale": config.guidance, "num_inference_steps": config.steps,
                                  "generator": generators, "output_type": "np"}
        if config.num_frames is not None:
            kwargs["num_frames"] = config.num_frames
        if config.eta:
            kwargs["eta"] = config.eta
        out = pipeline(chunk, **kwargs)
        media = np.asarray(out.frames if hasattr(out, "frames") else out.images, dtype=np.float32)
        # diffusers returns channels-last: images [B, H, W, 3], videos [B, T, H, W, 3].
        chunks.append(np.moveaxis(media, -1, -3))
    return np.clip(np.concatenate(chunks), 0.0, 1.0)


# Evaluation set name → shipped prompt file (``assets/shapes/prompts``).
EVAL_SET_FILES = {"heldin": "heldin_eval.txt", "heldout": "heldout_compositions.txt"}


def summarise(media: np.ndarray, prompts: Sequence[str]) -> dict[str, Any]:
    """Oracle accuracy of ``media`` (float in [0, 1], ``[B, 3, H, W]`` or ``[B, T, 3, H, W]``) vs ``prompts``.

    Returns:
        ``{"n", "all", "reward", "attributes": {name: accuracy}, "kinds": {kind: all-accuracy}}``; an attribute
        appears only when it applies to some prompt.
    """
    result = grade(media, list(prompts))
    kinds = [parse_prompt(p).kind for p in prompts]
    attributes = {a: float(np.nanmean(v)) for a, v in result.attributes.items() if a in ATTRIBUTES
                  and not np.all(np.isnan(v))}
    by_kind = {k: float(np.mean([ok for ok, kk in zip(result.all, kinds, strict=True) if kk == k]))
               for k in sorted(set(kinds))}
    return {"n": len(prompts), "all": float(np.mean(result.all)), "reward": float(np.mean(result.reward)),
            "attributes": attributes, "kinds": by_kind}


def evaluate_folder(folder: str | Path, prompt_sets: dict[str, Sequence[str]], config: EvalConfig | None = None,
                    *, pipeline: Any = None) -> dict[str, Any]:
    """Load ``folder`` with ``diffusers.DiffusionPipeline.from_pretrained`` (fp32) and grade every prompt set.

    Args:
        folder: a saved pipeline folder (ignored when ``pipeline`` is given).
        prompt_sets: set name → captions of the grammar.
        config: sampling settings (default :class:`EvalConfig`).
        pipeline: an already-loaded pipeline to evaluate instead.

    Returns:
        set name → :func:`summarise` dict.
    """
    import torch
    from diffusers import DiffusionPipeline

    config = config or EvalConfig()
    if pipeline is None:
        pipeline = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return {name: summarise(sample_pipeline(pipeline, prompts, config), prompts)
            for name, prompts in prompt_sets.items()}
