"""``visalign train RECIPE [key.sub=value ...]``: online reward fine-tuning from a YAML recipe."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  visalign train pipelines/tiny-sd-grpo.yaml
  visalign train pipelines/tiny-sd-grpo.yaml objective.name=prdp optim.lr=3e-5 run.output_dir=runs/prdp
  visalign train --help-config          # every config field with its default and help

The run folder gets config.json, metrics.jsonl (+ TensorBoard), grids/, checkpoints/ and final/ (LoRA weights
that stock diffusers loads with pipe.load_lora_weights). Re-running the same command resumes from the newest
complete checkpoint (refused when the recipe changed, unless --resume-changed); --no-resume starts over. SIGTERM or
Ctrl-C stops after the current iteration at a checkpoint, with exit status 0.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="Fine-tune a generator against rewards (GRPO, PRDP, DRAGON, RAFT, DRaFT...).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Online reward fine-tuning: rollout → score → advantages → objective update.")
    p.add_argument("recipe", nargs="?", help="A YAML recipe (see pipelines/).")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=3e-5.")
    p.add_argument("--no-resume", action="store_true", help="Ignore existing checkpoints in run.output_dir.")
    p.add_argument("--resume-changed", action="store_true",
                   help="Resume even though the recipe differs from the checkpoint's (the differences are printed).")
    p.add_argument("--help-config", action="store_true", help="Print every config field and exit.")


def run(args: argparse.Namespace) -> int:
    from visalign.config import ConfigError, help_lines
    from visalign.train.config import TrainConfig, load_train_config

    if args.help_config:
        print("\n".join(help_lines(TrainConfig) + objective_param_lines()))
        return 0
    if not args.recipe:
        print("visalign train: give a recipe, e.g. visalign train pipelines/tiny-sd-grpo.yaml", file=sys.stderr)
        return 2
    try:
        config = load_train_config(_recipe_path(args.recipe), args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"visalign train: {err}", file=sys.stderr)
        return 2
    from visalign.train.loop import Trainer, TrainingError

    try:
        trainer = Trainer(config)
        summary = trainer.run(resume=not args.no_resume, resume_changed=args.resume_changed)
    except (TrainingError, OSError, ValueError) as err:  # OSError: unwritable folders, missing files
        print(f"visalign train: {err}", file=sys.stderr)
        return 1
    if not trainer.dist.is_main:  # under accelerate launch the main process reports for all of them
        return 0
    if summary.get("stopped_by"):  # SIGTERM / SIGINT: a clean stop at a checkpoint is a success
        print(f"stopped by {summary['stopped_by']} at iteration {summary['iterations']}; checkpoint "
              f"{summary['checkpoint']}. Run the same command again to resume.")
        return 0
    print(summary_table(summary))
    loads_with = ("a peft / transformers folder: model.load_adapter(that folder)"
                  if getattr(trainer.adapter, "modality", "image") == "text"
                  else "pipe.load_lora_weights(that folder) in diffusers")
    print(f"final weights: {summary['final_weights']}  ({loads_with})")
    return 0


def summary_table(summary: dict) -> str:
    """The run summary as a terminal table: training-proxy and eval rewards and diagnostics, start → end."""
    from visalign.table import format_table

    nan = float("nan")
    rows = [("train reward (proxy)", summary["train_reward_first"], summary["train_reward_last"]),
            ("reward std within groups", summary["reward_std_first"], summary["reward_std_last"]),
            ("diversity (pairwise px distance)", summary["diversity_first"], summary["diversity_last"])]
    for key, after in summary["eval_after"].items():
        rows.append((key, summary["eval_before"].get(key, nan), after))
    rows.append(("path KL to reference (last eval)", "", summary["path_kl_last"]))
    rows.append(("NaN samples dropped / collapse warnings", "",
                 f"{summary['nan_dropped']} / {summary['collapse_warnings']}"))
    return format_table(["metric", "start", f"end (iteration {summary['iterations']})"], rows)


def _recipe_path(name: str) -> str:
    """A recipe path, or the name of a shipped recipe (``tiny-sd-grpo``) found in the installed package data."""
    from pathlib import Path

    if Path(name).exists():
        return name
    from visalign.scorers.card import package_data_dir

    shipped = package_data_dir("visalign.recipes", "pipelines") / (name if name.endswith(".yaml") else name + ".yaml")
    return str(shipped) if shipped.exists() else name


def objective_param_lines() -> list[str]:
    """``objective.params`` of every built-in objective, typed by its Params dataclass (for ``--help-config``)."""
    from visalign.config import help_lines
    from visalign.objectives.base import OBJECTIVES

    lines = []
    for name in OBJECTIVES.list():
        cls = OBJECTIVES.get(name)
        needs = ", ".join(sorted(cls.needs)) or "nothing"
        lines.append(f"objective.params when objective.name={name}  (consumes {cls.consumes.__name__}, needs {needs}, "
                     f"default source {cls.default_source}):")
        lines.extend(help_lines(cls.Params, "  objective.params."))
    return lines
