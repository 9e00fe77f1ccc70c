"""Generator adapters over diffusers pipelines: rollouts with exact per-step log-probs, LoRA, save/load.

>>> from visalign.generators import list_generators
>>> "StableDiffusionPipeline" in list_generators()
True

The registry maps a diffusers pipeline class name (``model_index.json``'s ``_class_name``) to the adapter that
serves it, as a lazy ``"module:Class"`` string (docs/extending.md#registries): importing this package loads no
diffusers model code. :func:`load_generator` reads the class name from a local folder or the hub and picks the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from visalign.generators.base import (
    Condition,
    GeneratorAdapter,
    LoraSpec,
    Rollout,
    SamplingPlan,
    StepOutput,
    resolve_dtype,
    select_train_steps,
)
from visalign.generators.denoising_loss import DenoisingLoss
from visalign.registry import Registry

__all__ = ["Condition", "DenoisingLoss", "GeneratorAdapter", "LoraSpec", "Rollout", "SamplingPlan", "StepOutput",
           "GENERATORS", "generator_class", "list_generators", "load_generator", "pipeline_class_name",
           "select_train_steps", "UnsupportedPipelineError"]

# Pipeline class name → adapter. One line per class; families sharing a mechanism share an adapter class.
GENERATORS: Registry[type[GeneratorAdapter]] = Registry("generator pipeline class", {
    "StableDiffusionPipeline": "visalign.generators.unet:StableDiffusionAdapter",
    "StableDiffusionXLPipeline": "visalign.generators.unet:StableDiffusionXLAdapter",
    "AnimateDiffPipeline": "visalign.generators.unet_video:AnimateDiffAdapter",
    "TextToVideoSDPipeline": "visalign.generators.unet_video:TextToVideoSDAdapter",
    "StableDiffusion3Pipeline": "visalign.generators.flow:StableDiffusion3Adapter",
    "FluxPipeline": "visalign.generators.flow:FluxAdapter",
    "WanPipeline": "visalign.generators.flow_video:WanAdapter",
    "LTXPipeline": "visalign.generators.flow_video:LTXAdapter",
    "CogVideoXPipeline": "visalign.generators.cogvideox:CogVideoXAdapter",
})

# Families for the error message: a user with an unsupported class wants to know what *kinds* of model work.
FAMILIES = {
    "UNet + DDIM (η > 0)": ["StableDiffusionPipeline", "StableDiffusionXLPipeline"],
    "UNet video + DDIM (η > 0)": ["AnimateDiffPipeline", "TextToVideoSDPipeline"],
    "flow matching + SDE (image)": ["StableDiffusion3Pipeline", "FluxPipeline"],
    "flow matching + SDE (video)": ["WanPipeline", "LTXPipeline"],
    "CogVideoX (v-prediction DDIM, η > 0)": ["CogVideoXPipeline"],
}


class UnsupportedPipelineError(ValueError):
    """A model whose pipeline class no adapter serves; the message lists the supported families."""


def list_generators() -> list[str]:
    """Every supported pipeline class name, sorted."""
    return GENERATORS.list()


def generator_class(pipeline_class: str) -> type[GeneratorAdapter]:
    """The adapter class for a diffusers pipeline class name (or an import path ``"pkg.mod:Adapter"``)."""
    if pipeline_class not in GENERATORS and ":" not in pipeline_class:
        families = "; ".join(f"{family}: {', '.join(names)}" for family, names in FAMILIES.items())
        others = sorted(set(list_generators()) - {n for names in FAMILIES.values() for n in names})
        if others:
            families += f"; other: {', '.join(others)}"
        raise UnsupportedPipelineError(
            f"Pipeline class {pipeline_class!r} is not supported. Supported families — {families}. "
            "Convert the model to one of these pipelines, or pass adapter='pkg.module:YourAdapter'.")
    return GENERATORS.get(pipeline_class)


def pipeline_class_name(model_id_or_dir: str | Path) -> str:
    """``_class_name`` from the model's ``model_index.json`` (local folder, or the hub / its cache)."""
    path = Path(model_id_or_dir)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{path} has no model_index.json; point at a diffusers pipeline folder "
                                    "(one written by pipeline.save_pretrained or GeneratorAdapter.save).")
    else:
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(str(model_id_or_dir), "model_index.json"))
    return json.loads(index.read_text())["_class_name"]


def load_generator(model_id_or_dir: str | Path, *, dtype: torch.dtype | str = torch.float32,
                   device: str | torch.device = "cpu", lora: str | Path | None = None,
                   adapter: str | None = None) -> GeneratorAdapter:
    """Load a diffusers pipeline and wrap it in the adapter for its class.

    Args:
        model_id_or_dir: a hub id or a local pipeline folder (safetensors weights).
        dtype: compute dtype: ``torch.float32``, ``"bf16"``, ``"fp16"``, ...
        device: where to run (``"cpu"``, ``"cuda"``).
        lora: optional LoRA folder (written by ``GeneratorAdapter.save`` or ``pipe.save_lora_weights``).
        adapter: override the lookup with a registered pipeline class name or ``"pkg.module:Adapter"``.

    Returns:
        A :class:`GeneratorAdapter` with every parameter frozen except the loaded LoRA's.
    """
    cls = generator_class(adapter or pipeline_class_name(model_id_or_dir))
    return cls.from_pretrained(model_id_or_dir, dtype=resolve_dtype(dtype), device=device, lora=lora)
