"""Benchmark: Diffusion-DPO on oracle-labelled pairs of the shapes base model's own samples, over seeds.

Per seed:

1. sample ``--samples-per-prompt`` images of each of the first ``--prompts`` demo alignment prompts
   (:func:`visalign.shapes.demo.demo_prompts`: training compositions minus every evaluated one) with the BASE model
   (DDIM η = 0 with fresh per-sample noise, the demo's guidance), seeded by the seed; grade each with the exact oracle
   (``shapes-oracle``); per prompt, the best vs the worst sample becomes a (chosen, rejected) pair when their oracle
   rewards differ (PNG files + ``pairs.jsonl`` in the seed's run folder);
2. train ``diffusion-dpo`` on those pairs (the ``pairs`` source; the demo's LoRA shape and targets);
3. evaluate the trained LoRA with :func:`visalign.shapes.demo.evaluate` (η = 0, the demo's fixed eval seeds) on the
   held-in set and the held-out compositions.

The base model's evaluation does not depend on the seed and is computed once. ``results.json`` holds every seed's
numbers and the mean ± sd (sample sd, ddof 1) of the oracle-accuracy gains in points; a Markdown table is printed.

    python benchmarks/shapes_dpo.py --seeds 0 1 2 --out benchmarks/results/shapes_dpo
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SETS = ("heldin", "heldout")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prompts", type=int, default=80, help="Alignment prompts sampled per seed (first N).")
    p.add_argument("--samples-per-prompt", type=int, default=16, help="Base samples per prompt (G).")
    p.add_argument("--pairs-per-prompt", type=int, default=4,
                   help="Pairs per prompt: the i-th best vs the i-th worst, i < K (disjoint; 1 = best vs worst).")
    p.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the base samples.")
    p.add_argument("--iterations", type=int, default=60, help="Diffusion-DPO iterations.")
    p.add_argument("--pairs-per-step", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=5000.0)
    p.add_argument("--sft-weight", type=float, default=0.0)
    p.add_argument("--eval-prompts", type=int, default=None,
                   help="Cap on the prompts of each evaluation set; default: the demo sets (88 held-in, 48 held-out).")
    p.add_argument("--eval-images-per-prompt", type=int, default=None, help="Default: the demo's (4).")
    p.add_argument("--eval-steps", type=int, default=None, help="Default: the demo's (20).")
    p.add_argument("--out", default="runs/shapes_dpo", help="Output folder (results.json, results.md, runs/).")
    p.add_argument("--keep-runs", action="store_true", help="Keep the per-seed run folders (images, LoRA).")
    return p.parse_args(argv)


def demo_config(args: argparse.Namespace, seed: int = 0) -> Any:
    from visalign.shapes.demo import DemoConfig

    kwargs: dict[str, Any] = {"seed": seed, "polish_iterations": 0}
    if args.eval_prompts is not None:
        kwargs.update(eval_heldin=args.eval_prompts, eval_heldout=args.eval_prompts)
    if args.eval_images_per_prompt is not None:
        kwargs["eval_images_per_prompt"] = args.eval_images_per_prompt
    if args.eval_steps is not None:
        kwargs["eval_steps"] = args.eval_steps
    return DemoConfig(**kwargs)


def make_pairs(adapter: Any, prompts: list[str], oracle: Any, args: argparse.Namespace, seed: int, folder: Path
               ) -> dict[str, Any]:
    """Sample G base images per prompt, grade them, write best-vs-worst pairs; returns counts and the jsonl path."""
    import torch

    from visalign.media import save_image
    from visalign.scorers import ScoreBatch

    demo = demo_config(args, seed)
    g = args.samples_per_prompt
    folder.mkdir(parents=True, exist_ok=True)
    rows, rewards_all = [], []
    per_call = max(1, 48 // g)
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        rollout = adapter.rollout(chunk, images_per_prompt=g, steps=args.sample_steps, guidance=demo.guidance,
                                  eta=0.0, seed=seed * 1_000_003 + start * g)
        media = rollout.media.detach().float().cpu().clamp(0, 1)
        reward = oracle(ScoreBatch(prompts=list(rollout.prompts), media=media)).reward.float().cpu()
        rewards_all += reward.tolist()
        for i, prompt in enumerate(chunk):
            r = reward[i * g:(i + 1) * g]
            order = torch.argsort(r, descending=True, stable=True).tolist()
            for j in range(min(args.pairs_per_prompt, g // 2)):
                best, worst = order[j], order[g - 1 - j]
                if float(r[best]) <= float(r[worst]):
                    break
                name = f"p{start + i:04d}_{j}"
                chosen, rejected = f"{name}_chosen.png", f"{name}_rejected.png"
                save_image(media[i * g + best], folder / chosen)
                save_image(media[i * g + worst], folder / rejected)
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                             "chosen_reward": float(r[best]), "rejected_reward": float(r[worst])})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"path": path, "pairs": len(rows), "samples": len(rewards_all),
            "sample_oracle_reward": sum(rewards_all) / max(1, len(rewards_all)),
            "chosen_reward": sum(r["chosen_reward"] for r in rows) / max(1, len(rows)),
            "rejected_reward": sum(r["rejected_reward"] for r in rows) / max(1, len(rows))}


def train_config(args: argparse.Namespace, pairs_path: Path, run_dir: Path, seed: int, pairs: int) -> Any:
    from visalign.config import from_dict
    from visalign.shapes.demo import resolve_asset
    from visalign.train.config import TrainConfig

    demo = demo_config(args, seed)
    data = {
        "model": {"model": str(resolve_asset(demo.base_model)), "lora_rank": demo.lora_rank,
                  "lora_alpha": float(max(demo.lora_rank, 1)), "lora_targets": list(demo.lora_targets)},
        "sample": {"prompts": ""},
        "reward": {"terms": []},
        "objective": {"name": "diffusion-dpo", "params": {"beta": args.beta, "sft_weight": args.sft_weight}},
        "source": {"name": "pairs", "pairs": {"path": str(pairs_path),
                                              "pairs_per_step": min(args.pairs_per_step, pairs)}},
        "optim": {"lr": args.lr},
        "eval": {"prompts": None},
        "run": {"output_dir": str(run_dir / "train"), "iterations": args.iterations, "seed": seed,
                "checkpoint_every": args.iterations, "keep_last": 1, "tensorboard": False, "progress": False},
    }
    return from_dict(TrainConfig, data)


def accuracy(evaluation: Any) -> dict[str, dict[str, Any]]:
    """Per set: oracle all-attributes accuracy (fraction), mean oracle reward, per-attribute accuracy."""
    return {name: {"all": float(o["all"]), "reward": float(o["reward"]), "n": int(o["n"]),
                   "attributes": {k: (None if v is None else float(v)) for k, v in o["attributes"].items()}}
            for name, o in evaluation.oracle.items()}


def run_seed(seed: int, args: argparse.Namespace, prompts: Any, base_eval: dict[str, Any], base_adapter: Any,
             oracle: Any, log: Any = print) -> dict[str, Any]:
    from visalign.shapes.demo import evaluate
    from visalign.train.logging import read_metrics
    from visalign.train.loop import Trainer

    run_dir = Path(args.out) / "runs" / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    wall, cpu = {}, {}

    c0, w0 = time.process_time(), time.perf_counter()
    made = make_pairs(base_adapter, prompts.align[: args.prompts], oracle, args, seed, run_dir / "pairs")
    c1, w1 = time.process_time(), time.perf_counter()
    wall["pairs"], cpu["pairs"] = w1 - w0, c1 - c0
    log(f"  seed {seed}: {made['pairs']} pairs from {made['samples']} base samples "
        f"(mean oracle reward {made['sample_oracle_reward']:.3f}; chosen {made['chosen_reward']:.3f} vs rejected "
        f"{made['rejected_reward']:.3f}) in {wall['pairs']:.0f} s")
    if made["pairs"] == 0:
        raise SystemExit(f"shapes_dpo: seed {seed} made no pairs (every prompt's samples tie); raise "
                         "--samples-per-prompt or --prompts.")

    config = train_config(args, made["path"], run_dir, seed, made["pairs"])
    trainer = Trainer(config)
    trainer.run(resume=False)
    c2, w2 = time.process_time(), time.perf_counter()
    wall["train"], cpu["train"] = w2 - w1, c2 - c1
    history = read_metrics(Path(config.run.output_dir))
    losses = [row["loss"] for row in history if "loss" in row]
    acc = [row["implicit_acc"] for row in history if "implicit_acc" in row]

    after = accuracy(evaluate(trainer.adapter, prompts, oracle, demo_config(args, seed)))
    c3, w3 = time.process_time(), time.perf_counter()
    wall["eval"], cpu["eval"] = w3 - w2, c3 - c2
    wall["total"], cpu["total"] = w3 - w0, c3 - c0
    gains = {name: 100 * (after[name]["all"] - base_eval[name]["all"]) for name in after}
    log(f"  seed {seed}: loss {losses[0]:.4f} → {losses[-1]:.4f}; "
        + ", ".join(f"{n} {100 * after[n]['all']:.1f} % ({gains[n]:+.1f})" for n in after)
        + f"; {wall['total']:.0f} s wall, {cpu['total']:.0f} s CPU")
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    made.pop("path")
    tail = max(1, len(losses) // 5)
    return {"seed": seed, **made, "after": after, "gain_points": gains,
            "loss_first": losses[0], "loss_last": losses[-1], "loss_last_fifth_mean": sum(losses[-tail:]) / tail,
            "implicit_acc_last_fifth_mean": sum(acc[-tail:]) / tail if acc else None,
            "losses": losses, "wall_seconds": wall, "cpu_seconds": cpu}


def mean_sd(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def markdown(result: dict[str, Any]) -> str:
    base = result["base"]
    lines = ["| seed | pairs | held-in acc % (gain) | held-out acc % (gain) | loss first → last | wall s | CPU s |",
             "|---|---|---|---|---|---|---|",
             "| base | – | " + " | ".join(f"{100 * base[n]['all']:.1f}" if n in base else "–" for n in SETS)
             + " | – | – | – |"]
    for r in result["seeds"]:
        cells = [f"{100 * r['after'][n]['all']:.1f} ({r['gain_points'][n]:+.1f})" if n in r["after"] else "–"
                 for n in SETS]
        lines.append(f"| {r['seed']} | {r['pairs']} | {cells[0]} | {cells[1]} | {r['loss_first']:.3f} → "
                     f"{r['loss_last']:.3f} | {r['wall_seconds']['total']:.0f} | {r['cpu_seconds']['total']:.0f} |")
    summary = result["summary"]["gain_points"]

    def fmt(name: str) -> str:
        s = summary.get(name)
        if s is None:
            return "–"
        return f"{s['mean']:+.1f} ± {s['sd']:.1f}" if s["sd"] is not None else f"{s['mean']:+.1f}"

    lines.append(f"| mean ± sd gain (pts) | {result['summary']['pairs']['mean']:.1f} | {fmt('heldin')} | "
                 f"{fmt('heldout')} | – | {result['summary']['wall_total']['mean']:.0f} | "
                 f"{result['summary']['cpu_total']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, log: Any = print) -> dict[str, Any]:
    import torch

    from visalign.generators import load_generator
    from visalign.scorers import get_scorer
    from visalign.shapes.demo import demo_prompts, evaluate, resolve_asset

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = demo_config(args)
    prompts = demo_prompts(demo)
    if args.prompts > len(prompts.align):
        log(f"  note: only {len(prompts.align)} alignment prompts; using all of them")
    oracle = get_scorer("shapes-oracle")
    c0, w0 = time.process_time(), time.perf_counter()
    base_adapter = load_generator(resolve_asset(demo.base_model))
    base_eval = accuracy(evaluate(base_adapter, prompts, oracle, demo))
    base_seconds = {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}
    log("  base: " + ", ".join(f"{n} {100 * v['all']:.1f} % (n = {v['n']})" for n, v in base_eval.items())
        + f"; {base_seconds['wall']:.0f} s")
    seeds = [run_seed(seed, args, prompts, base_eval, base_adapter, oracle, log) for seed in args.seeds]
    summary = {"gain_points": {n: mean_sd([r["gain_points"][n] for r in seeds]) for n in base_eval},
               "pairs": mean_sd([float(r["pairs"]) for r in seeds]),
               "wall_total": mean_sd([r["wall_seconds"]["total"] for r in seeds]),
               "cpu_total": mean_sd([r["cpu_seconds"]["total"] for r in seeds])}
    result = {"benchmark": "shapes_dpo", "command": "python benchmarks/shapes_dpo.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "args": vars(args), "align_prompts_available": len(prompts.align),
              "eval_prompts": {n: len(v) for n, v in prompts.eval_sets.items()},
              "eval_images_per_prompt": demo.eval_images_per_prompt, "eval_steps": demo.eval_steps,
              "torch_threads": torch.get_num_threads(), "base": base_eval, "base_eval_seconds": base_seconds,
              "seeds": seeds, "summary": summary}
    if not all(math.isfinite(v) for r in seeds for v in r["gain_points"].values()):
        log("  warning: a non-finite gain")
    (out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    table = markdown(result)
    (out / "results.md").write_text(table, encoding="utf-8")
    if not args.keep_runs:
        shutil.rmtree(out / "runs", ignore_errors=True)
    log(table)
    return result


if __name__ == "__main__":
    main()
