"""``visalign distill RECIPE [key.sub=value ...]``: a few-step student from a teacher (RG-LCM, R0), trained by the
same engine, checkpoints, resume and logs as ``visalign train``, then saved as a stock diffusers pipeline folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  visalign distill pipelines/tiny-sd-distill-r0.yaml
  visalign distill pipelines/shapes-distill-r0.yaml distill.student_steps=4 run.output_dir=runs/r0-4
  visalign distill pipelines/shapes-distill-rg-lcm.yaml --help-config

The run folder holds what `visalign train` writes (config.json, metrics.jsonl, checkpoints/, final/) and student/, a
diffusers pipeline with LCMScheduler: DiffusionPipeline.from_pretrained("RUN/student")(prompt,
num_inference_steps=distill.student_steps, guidance_scale=distill.student_guidance). Re-running the same command
resumes from the newest complete checkpoint; --no-resume starts over.
"""

OBJECTIVES = ("rg-lcm", "r0")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="Distil a few-step student (RG-LCM, R0) loadable by stock diffusers.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Reward-guided few-step distillation: teacher ODE → student update → LCM pipeline.")
    p.add_argument("recipe", nargs="?", help="A YAML recipe (see pipelines/*distill*).")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. distill.student_steps=4.")
    p.add_argument("--no-resume", action="store_true", help="Ignore existing checkpoints in run.output_dir.")
    p.add_argument("--help-config", action="store_true", help="Print every config field and exit.")


def run(args: argparse.Namespace) -> int:
    from visalign.commands.train import _recipe_path, objective_param_lines, summary_table
    from visalign.config import ConfigError, help_lines
    from visalign.train.config import TrainConfig, load_train_config

    if args.help_config:
        print("\n".join(help_lines(TrainConfig) + objective_param_lines()))
        return 0
    if not args.recipe:
        print("visalign distill: give a recipe, e.g. visalign distill pipelines/tiny-sd-distill-r0.yaml",
              file=sys.stderr)
        return 2
    try:
        config = load_train_config(_recipe_path(args.recipe), args.overrides)
        if config.objective.name not in OBJECTIVES:
            raise ValueError(f"objective.name is {config.objective.name!r}; visalign distill trains a few-step "
                             f"student with one of {list(OBJECTIVES)} (use visalign train for the others).")
    except (ConfigError, ValueError) as err:
        print(f"visalign distill: {err}", file=sys.stderr)
        return 2
    from visalign.train.loop import Trainer, TrainingError
    from visalign.train.student_export import export_student

    try:
        trainer = Trainer(config)
        summary = trainer.run(resume=not args.no_resume)
        if not trainer.dist.is_main:
            return 0
        d = config.distill
        folder = export_student(config.model.model, summary["final_weights"], Path(config.run.output_dir) / "student",
                                teacher_steps=d.teacher_steps, student_steps=d.student_steps,
                                student_guidance=d.student_guidance)
    except (TrainingError, OSError, ValueError) as err:
        print(f"visalign distill: {err}", file=sys.stderr)
        return 1
    print(summary_table(summary))
    print(f"student pipeline: {folder}  (DiffusionPipeline.from_pretrained(that folder)(prompt, "
          f"num_inference_steps={d.student_steps}, guidance_scale={d.student_guidance:g}))")
    return 0
