"""Tune the CLIP proxy on the base generator's own samples: a reward model fitted to generations, not renders.

The shipped CLIP proxy (``assets/shapes/clip``) learned the world from clean renders and VAE round trips. What it
must judge during alignment are the base model's samples: blurred edges, darker hues and, above all, one object too
many. Learned reward models in the field are trained on generated images for that reason (ImageReward, PickScore and
HPS label generations, not photos). Here the exact oracle plays the annotator:

1. sample the base pipeline on the shipped training prompts (DDIM 10 steps, η 0 and 1 alternating, CFG 4: the
   samplers alignment draws from);
2. describe each sample by what the oracle *detects*, not by its prompt (:func:`describe_scene`), keeping the
   images that read as a caption of the grammar (one thing 1-4 times, or two things on a clear axis);
3. continue the proxy's contrastive hard-negative training (:func:`~visalign.shapes.build_proxies.
   clip_hard_negative_loss`) on batches of half such samples, half fresh renders, so the render skills stay.

The proxy stays imperfect and learned: its hard-negative accuracy on held-back samples is recorded in
``metrics.json`` (before and after) beside the usual render splits. assets/shapes/README.md, "Proxies", has the
numbers and the demo effect.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from visalign.shapes.build_proxies import (
    Augment,
    ProxyBatch,
    _ClipEncoder,
    _evaluate_splits,
    _load_vae,
    _record,
    _train,
    clip_hard_negative_loss,
    eval_set_from,
    hard_negative_accuracy,
    iter_proxy_batches,
    sample_negatives,
    torch_threads,
)
from visalign.shapes.grammar import caption
from visalign.shapes.oracle import COLOUR_NAMES, SHAPE_NAMES, Objects, detect_objects
from visalign.shapes.world import COLOURS, SHAPES, CountPrompt, PromptSpec, RelationPrompt, Thing

AXIS_MARGIN = 1.5  # a pair reads as a relation only when one axis dominates by this factor (the renderer's rule)


@dataclass
class TuneConfig:
    """How :func:`tune_clip_on_samples` samples, labels and trains (defaults: the shipped ``clip-tuned/``)."""

    sample_batches: int = field(default=40, metadata={"help": "Sampling calls (prompts_per_batch x 4 images each)."})
    prompts_per_batch: int = field(default=16, metadata={"help": "Training prompts per sampling call."})
    images_per_prompt: int = field(default=4, metadata={"help": "Samples per prompt."})
    sample_steps: int = field(default=10, metadata={"help": "DDIM steps of the samples (the alignment sampler's)."})
    guidance: float = field(default=4.0, metadata={"help": "Classifier-free guidance scale of the samples."})
    held_back: int = field(default=150, metadata={"help": "Described samples kept out of training, for accuracy."})
    steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Samples per step (as many renders come beside them)."})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate (constant; a fine-tune, not a build)."})
    seed: int = field(default=0, metadata={"help": "Seeds the prompt order, the sampling noise and the batches."})


def describe_scene(objects: Objects, rng: np.random.Generator) -> PromptSpec | None:
    """The grammar's caption of what an image shows, from the oracle's detections; None when none fits.

    One thing (colour and shape) 1-4 times → a count prompt; two different things with one axis dominating by
    ``AXIS_MARGIN`` → a relation, the first object drawn at random. Anything else (five objects, an off-palette
    blob, two things on a diagonal, three mixed things) has no caption in the grammar.
    """
    n = len(objects)
    if not 1 <= n <= 4 or (objects.colour >= len(COLOURS)).any() or (objects.shape >= len(SHAPES)).any():
        return None
    things = [Thing(COLOUR_NAMES[c], SHAPE_NAMES[s]) for c, s in zip(objects.colour, objects.shape, strict=True)]
    if len(set(things)) == 1:
        return CountPrompt(things[0], n)
    if n != 2:
        return None
    i, j = (0, 1) if rng.random() < 0.5 else (1, 0)
    dx, dy = objects.x[i] - objects.x[j], objects.y[i] - objects.y[j]
    if abs(dx) >= AXIS_MARGIN * abs(dy):
        relation = "left_of" if dx < 0 else "right_of"
    elif abs(dy) >= AXIS_MARGIN * abs(dx):
        relation = "above" if dy < 0 else "below"
    else:
        return None
    return RelationPrompt(things[i], relation, things[j])


def sample_and_describe(adapter: Any, prompts: Sequence[str], config: TuneConfig
                        ) -> tuple[Tensor, list[PromptSpec], int]:
    """Sample the base model and keep the images the oracle can caption.

    Returns:
        (images float32 ``[N, 3, H, W]`` in [0, 1], their detected specs, number of samples drawn).
    """
    rng = np.random.default_rng([config.seed, 3])
    order = rng.permutation(len(prompts))
    per = config.prompts_per_batch
    images, specs, drawn = [], [], 0
    for b in range(config.sample_batches):
        start = (b * per) % len(prompts)
        chosen = [prompts[k] for k in order[start:start + per]]
        with torch.no_grad():  # both samplers alignment draws from: η = 0 (evaluation, DRaFT) and η = 1 (GRPO)
            rollout = adapter.rollout(chosen, images_per_prompt=config.images_per_prompt, steps=config.sample_steps,
                                      guidance=config.guidance, eta=float(b % 2),
                                      seed=config.seed * 100_003 + 100 + b * 64)
        media = rollout.media.float().clamp(0, 1)
        drawn += len(media)
        for k, objects in enumerate(detect_objects(media.numpy())):
            spec = describe_scene(objects, rng)
            if spec is not None:
                images.append(media[k])
                specs.append(spec)
    if len(specs) <= config.held_back + config.batch_size:
        raise ValueError(f"Only {len(specs)} of {drawn} samples could be captioned; raise sample_batches so more "
                         f"than held_back + batch_size ({config.held_back + config.batch_size}) remain.")
    return torch.stack(images), specs, drawn


def tune_clip_on_samples(clip_dir: str | Path, t2i_dir: str | Path, out_dir: str | Path, prompts: Sequence[str],
                         config: TuneConfig | None = None, num_threads: int | None = 1,
                         eval_images: int = 300) -> dict[str, Any]:
    """Copy the CLIP proxy folder ``clip_dir`` to ``out_dir`` and fine-tune it on described base samples.

    Args:
        clip_dir: a CLIP proxy folder (``build_clip_proxy``'s output); left unchanged.
        t2i_dir: the base pipeline folder whose samples the proxy learns to judge.
        out_dir: replaced by the tuned folder (weights, tokenizer, processor, ``metrics.json``).
        prompts: prompts to sample (the shipped ``train.txt``: never the evaluation sets' held-out compositions).
        config: sampling and training settings.
        num_threads: torch intra-op threads while tuning (None keeps torch's setting).
        eval_images: renders per split for the render hard-negative accuracy.

    Returns:
        Metrics: samples drawn and described, steps and loss, ``samples_before`` / ``samples_after`` (hard-negative
        accuracy on the held-back samples) and ``heldin`` / ``heldout`` (on renders, as every proxy records).
    """
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from visalign.generators import load_generator
    from visalign.scorers.clip import hf_preprocess

    config = config or TuneConfig()
    out, t2i = Path(out_dir), Path(t2i_dir)
    with torch_threads(num_threads):
        images, specs, drawn = sample_and_describe(load_generator(str(t2i)), prompts, config)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(clip_dir, out)
        model = CLIPModel.from_pretrained(out)
        encoder = _ClipEncoder(model, CLIPTokenizer.from_pretrained(out),
                               hf_preprocess(CLIPImageProcessor.from_pretrained(out), "x"))
        held = eval_set_from(images[:config.held_back], specs[:config.held_back],
                             np.random.default_rng([config.seed, 5]))
        train_images, train_specs = images[config.held_back:], specs[config.held_back:]

        def accuracy() -> dict[str, float]:
            model.eval()
            with torch.no_grad():
                return hard_negative_accuracy(encoder.cosine, held)

        metrics: dict[str, Any] = {"samples_drawn": drawn, "samples_described": len(specs),
                                   "samples_before": accuracy()}
        rng = np.random.default_rng([config.seed, 4])
        renders = iter_proxy_batches(config.seed + 1, config.batch_size, 2, Augment(_load_vae(t2i / "vae")))

        def step(_: int) -> Tensor:
            idx = rng.choice(len(train_specs), config.batch_size, replace=False)
            chosen = [train_specs[i] for i in idx]
            rendered = next(renders)
            batch = ProxyBatch(torch.cat([train_images[torch.as_tensor(idx)], rendered.images]),
                               chosen + rendered.specs,
                               [caption(s, rng) for s in chosen] + rendered.captions,
                               [sample_negatives(s, rng, 2) for s in chosen] + rendered.negatives)
            return clip_hard_negative_loss(encoder, batch)

        model.train()
        metrics.update(_train(list(model.parameters()), step, config.steps, 60.0, config.lr,
                              "tuning the CLIP proxy on base samples", warmup=1, decay=False))
        metrics["samples_after"] = accuracy()
        model.save_pretrained(out, safe_serialization=True)
        with torch.no_grad():
            _evaluate_splits(metrics, encoder.cosine, eval_images)
    return _record(out, metrics, tuned_from=str(clip_dir), base_model=str(t2i_dir), **asdict(config))
