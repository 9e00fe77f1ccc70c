"""Few-step students of the shapes base model (docs/methods.md#distillation): does a 2-step student beat the teacher
sampled at 2 steps, and come close to the teacher at 20 steps, on the exact oracle?

    python benchmarks/shapes_distill.py --methods rg-lcm,r0          # 3 seeds each (5 and 4 CPU minutes per seed)
    python benchmarks/shapes_distill.py --methods r0,rg-lcm --seeds 0 --iterations 5 --out /tmp/distill  # smoke

Each seed distils ``assets/shapes/t2i`` (LoRA) through the real ``visalign distill`` machinery (the ``Trainer`` with
the ``teacher`` source and the method's objective, then :func:`visalign.train.student_export.export_student`) on the
demo's alignment prompts of every kind (the training compositions minus every evaluated one), with the differentiable
shapes rewards (the tuned CLIP contrast proxy plus the colour term; the oracle is not differentiable), and grades:

* every model **through stock diffusers** (``DiffusionPipeline.from_pretrained``, :func:`visalign.shapes.evaluate.
  evaluate_folder`): the exported student folder (``LCMScheduler``, ``--student-steps``, guidance 1), the teacher
  with DDIM η = 0 at the student's step count and at 20 steps (guidance 4), on the held-in single/count prompts
  (``heldin_eval.txt``, never trained on), ``--eval-images-per-prompt`` seeded samples each, oracle accuracy;
* throughput: images/s of the student and of the teacher at their step counts, in the same process on the same
  prompts (process CPU time and wall time; wall time is inflated by other work on a shared machine).

Outputs in ``--out``: ``seed<k>.json`` per seed, ``results.json`` (mean ± sd) and ``table.md`` (also printed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Per method: the objective, its params and its recipe (what BENCHMARKS.md reports; the command-line flags override
# the recipe). rg-lcm: a full fine-tune (LoRA r 16 at lr 1e-3 reached 0.6 % on seed 0 against 1.7 %), four
# consistency pairs per teacher trajectory, the reward term at 0.1 (the one-step outputs' proxy reward starts at
# 0.9: a larger weight pulls the distillation toward it). r0: LoRA r 8, the reward at full weight.
METHODS: dict[str, dict[str, Any]] = {
    "r0": {"objective": "r0", "params": {"reward_scale": 1.0, "weight_reg": 1.0, "distribution_reg": 0.1,
                                         "checkpoint_steps": False},
           "recipe": {"lora_rank": 8, "lr": 1e-3, "iterations": 100}},
    "rg-lcm": {"objective": "rg-lcm", "params": {"reward_scale": 0.1, "points_per_sample": 4},
               "recipe": {"lora_rank": 0, "lr": 2e-4, "iterations": 150}},
}
# Differentiable shapes rewards (the demo's: the tuned contrast proxy plus the colour term).
REWARD_TERMS = [{"scorer": "shapes-clip-tuned-contrast", "weight": 1.0}, {"scorer": "shapes-colour", "weight": 1.0}]
ORACLE = "shapes-oracle"
TEACHER_GUIDANCE = 4.0
TEACHER_FULL_STEPS = 20


def resolve_recipe(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The method's recipe with the command line's ``--lora-rank``, ``--lr`` and ``--iterations`` when given."""
    recipe = dict(METHODS[method]["recipe"])
    recipe.update({k: getattr(args, k) for k in recipe if getattr(args, k) is not None})
    return recipe


def train_config(method: str, seed: int, args: argparse.Namespace, prompt_file: Path, run_dir: Path) -> Any:
    """The distillation run's TrainConfig (the same sections a ``visalign distill`` recipe fills)."""
    from visalign.config import from_dict
    from visalign.train.config import TrainConfig

    spec = METHODS[method]
    recipe = resolve_recipe(method, args)
    data = {"model": {"model": str(REPO / "assets/shapes/t2i"), "lora_rank": recipe["lora_rank"],
                      "lora_alpha": float(max(recipe["lora_rank"], 1))},
            "sample": {"prompts": str(prompt_file), "prompts_per_step": args.prompts_per_step,
                       "images_per_prompt": 2},
            "reward": {"terms": [dict(t) for t in REWARD_TERMS]},
            "objective": {"name": spec["objective"], "params": dict(spec["params"])},
            "source": {"name": "teacher"},
            "distill": {"student_steps": args.student_steps, "teacher_steps": args.teacher_steps,
                        "teacher_guidance": TEACHER_GUIDANCE, "student_guidance": 1.0},
            "optim": {"lr": recipe["lr"]},
            "run": {"output_dir": str(run_dir), "iterations": recipe["iterations"], "seed": seed,
                    "checkpoint_every": recipe["iterations"], "progress": False, "tensorboard": False}}
    return from_dict(TrainConfig, data)


def grade_folder(folder: Path, prompts: list[str], steps: int, guidance: float, args: argparse.Namespace
                 ) -> dict[str, Any]:
    """Oracle accuracy of a pipeline folder loaded by stock diffusers, and its images/s (CPU and wall)."""
    import torch
    from diffusers import DiffusionPipeline

    from visalign.shapes.evaluate import EvalConfig, evaluate_folder

    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    repeated = [p for p in prompts for _ in range(args.eval_images_per_prompt)]
    config = EvalConfig(guidance=guidance, steps=steps, seed=args.eval_seed, batch_size=64)
    c0, w0 = time.process_time(), time.perf_counter()
    result = evaluate_folder(folder, {"heldin": repeated}, config, pipeline=pipe)["heldin"]
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"scheduler": type(pipe.scheduler).__name__, "steps": steps, "guidance": guidance, "n": result["n"],
            "oracle_all": result["all"], "attributes": result["attributes"], "kinds": result["kinds"],
            "images_per_cpu_second": len(repeated) / cpu, "images_per_wall_second": len(repeated) / wall}


def run_seed(method: str, seed: int, args: argparse.Namespace, prompts: Any) -> dict[str, Any]:
    from visalign.train.loop import Trainer
    from visalign.train.student_export import export_student

    out = Path(args.out)
    run_dir = out / "runs" / f"{method}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    prompt_file = run_dir / "train_prompts.txt"
    prompt_file.write_text("\n".join(prompts.align) + "\n", encoding="utf-8")
    config = train_config(method, seed, args, prompt_file, run_dir)
    c0, w0 = time.process_time(), time.perf_counter()
    summary = Trainer(config).run(resume=False)
    c1, w1 = time.process_time(), time.perf_counter()
    folder = export_student(config.model.model, summary["final_weights"], run_dir / "student",
                            teacher_steps=args.teacher_steps, student_steps=args.student_steps, student_guidance=1.0)
    student = grade_folder(folder, prompts.eval_sets["heldin"], args.student_steps, 1.0, args)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"method": method, "seed": seed, "student": student, "train_cpu_seconds": c1 - c0,
            "train_wall_seconds": w1 - w0, "train_prompts": len(prompts.align),
            "train_reward_first": summary["train_reward_first"], "train_reward_last": summary["train_reward_last"],
            "params": METHODS[method]["params"], **resolve_recipe(method, args),
            "prompts_per_step": args.prompts_per_step}


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def report(teacher: dict[str, Any], cells: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The Markdown table: oracle accuracy (%) and images/s of each model at its step count."""
    def pct(stat: dict[str, float]) -> str:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['sd']:.1f}"

    lines = ["| model | sampler | steps | oracle all, held-in (%) | images/s (CPU) | images/s (wall) |",
             "|---|---|---|---|---|---|"]
    for key in ("teacher_few", "teacher_full"):
        t = teacher[key]
        lines.append(f"| teacher | DDIM η 0, CFG {t['guidance']:g} | {t['steps']} | {100 * t['oracle_all']:.1f} | "
                     f"{t['images_per_cpu_second']:.1f} | {t['images_per_wall_second']:.1f} |")
    for method in dict.fromkeys(c["method"] for c in cells):
        rows = [c for c in cells if c["method"] == method]
        acc = mean_sd([c["student"]["oracle_all"] for c in rows])
        cpu = mean_sd([c["student"]["images_per_cpu_second"] for c in rows])
        wall = mean_sd([c["student"]["images_per_wall_second"] for c in rows])
        lines.append(f"| student {method} ({len(rows)} seeds) | LCM, no CFG | {args.student_steps} | {pct(acc)} | "
                     f"{cpu['mean']:.1f} | {wall['mean']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="rg-lcm,r0", help="Comma-separated ids of METHODS.")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iterations", type=int, default=None, help="Override the methods' recipes.")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="Override the methods' recipes.")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank; 0 = full fine-tune (overrides).")
    p.add_argument("--student-steps", type=int, default=2)
    # 15, not 20: the grid then starts at 989 (ᾱ = 2.4e-4) rather than 999 (ᾱ = 2.4e-9), where the shapes model's
    # x0 estimate amplifies its errors 2·10⁴ times (docs/methods.md#distillation).
    p.add_argument("--teacher-steps", type=int, default=15, help="The LCM grid (teacher ODE steps).")
    p.add_argument("--eval-images-per-prompt", type=int, default=2)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--params", default="{}", help="JSON merged into every method's objective params.")
    p.add_argument("--threads", type=int, default=2, help="torch threads of this process.")
    p.add_argument("--out", default="runs/shapes-distill")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from visalign.shapes.demo import DemoConfig, demo_prompts

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for spec in METHODS.values():
        spec["params"].update(json.loads(args.params))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = demo_prompts(DemoConfig(align_kinds=["single", "count", "relation"], polish_iterations=0))
    base = REPO / "assets/shapes/t2i"
    heldin = prompts.eval_sets["heldin"]
    teacher = {"teacher_few": grade_folder(base, heldin, args.student_steps, TEACHER_GUIDANCE, args),
               "teacher_full": grade_folder(base, heldin, TEACHER_FULL_STEPS, TEACHER_GUIDANCE, args)}
    print(json.dumps({k: round(v["oracle_all"], 4) for k, v in teacher.items()}))
    cells = []
    for method in args.methods.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            cell = run_seed(method, seed, args, prompts)
            (out / f"{method}-seed{seed}.json").write_text(json.dumps(cell, indent=1))
            print(f"{method} seed {seed}: oracle {100 * cell['student']['oracle_all']:.1f} %, "
                  f"train {cell['train_cpu_seconds']:.0f} CPU s")
            cells.append(cell)
    table = report(teacher, cells, args)
    results = {"teacher": teacher, "cells": cells, "args": vars(args), "table": table}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
