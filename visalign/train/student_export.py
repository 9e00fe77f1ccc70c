"""Save a trained few-step student as a stock diffusers pipeline folder (docs/methods.md#distillation).

The run's ``final/`` holds LoRA weights (or, for a full fine-tune, a pipeline folder with the teacher's DDIM
scheduler). The student folder is that model with the LoRA fused into the denoiser and ``LCMScheduler`` (the grid of
``distill.teacher_steps``) as its scheduler, so ``DiffusionPipeline.from_pretrained(folder)`` samples the student
with ``num_inference_steps = distill.student_steps`` and ``guidance_scale = distill.student_guidance``, no visalign
needed. ``student.json`` beside it records those two numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visalign.generators.consistency import student_scheduler


def export_student(teacher: str | Path, final_dir: str | Path, out_dir: str | Path, *, teacher_steps: int,
                   student_steps: int, student_guidance: float) -> Path:
    """Write the student pipeline folder ``out_dir`` (safetensors) and return it.

    Args:
        teacher: the teacher's pipeline folder or hub id (the base the LoRA was trained on).
        final_dir: the run's ``final/``: LoRA weights, or a full pipeline folder.
        teacher_steps, student_steps, student_guidance: the run's ``distill`` section.
    """
    from diffusers import DiffusionPipeline

    final_dir, out_dir = Path(final_dir), Path(out_dir)
    if (final_dir / "model_index.json").is_file():  # a full fine-tune: final/ is already the student's weights
        pipe = DiffusionPipeline.from_pretrained(str(final_dir), use_safetensors=True)
    else:
        pipe = DiffusionPipeline.from_pretrained(str(teacher), use_safetensors=True)
        pipe.load_lora_weights(str(final_dir))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.scheduler = student_scheduler(pipe.scheduler, teacher_steps)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    card: dict[str, Any] = {"num_inference_steps": int(student_steps), "guidance_scale": float(student_guidance),
                            "scheduler": type(pipe.scheduler).__name__, "original_inference_steps": int(teacher_steps),
                            "teacher": str(teacher)}
    (out_dir / "student.json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    return out_dir
