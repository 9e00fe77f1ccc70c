"""The shapes-world objective benchmark: every objective × reward × seed, aligned at a fixed budget and graded by
the exact oracle (issue 6, scope item 5; docs/methods.md#hacking-diagnostics, proxy vs gold).

    python benchmarks/shapes_objectives.py                                   # the full grid (hours of CPU)
    python benchmarks/shapes_objectives.py --resume                          # go on after a stop, cell by cell
    python benchmarks/shapes_objectives.py --objectives grpo,raft --rewards oracle,ensemble --seeds 0 \
        --iterations 2 --curve-every 1 --eval-heldin 8 --eval-heldout 8 --out /tmp/bench_smoke   # a smoke run
    python benchmarks/shapes_objectives.py --report-only --out runs/shapes-objectives   # redo table and plots

Each cell aligns the shipped base ``assets/shapes/t2i`` with LoRA through the real
:class:`visalign.train.loop.Trainer` on the demo's alignment prompts (:func:`visalign.shapes.demo.demo_prompts`:
the training compositions minus every evaluated composition), with the recipe of ``OBJECTIVES`` below, and records:

* oracle accuracy (``all`` and per attribute) before and after, on held-in prompts never aligned on
  (``heldin_eval.txt``) and on held-out compositions (``heldout_compositions.txt``), with
  :func:`visalign.shapes.demo.evaluate` (DDIM η = 0, the same eval seeds before and after, so samples pair);
* the proxy gain: the training reward's mean on those same samples, before and after;
* the proxy–oracle gap over training: the Trainer's own evaluation every ``--curve-every`` iterations on a held-in
  subset, scored by the oracle (``eval/reward``) and by the training reward (``eval/proxy/reward``);
* the CPU seconds of the process (all threads) spent aligning and evaluating.

Outputs in ``--out``: ``cells/<objective>__<reward>__seed<k>.json`` (written as each cell finishes, so a stopped
grid loses at most the cell in flight), ``results.json`` (every cell found in ``cells/`` plus the mean ± sd per
objective × reward), ``table.md`` (also printed), ``curves_<reward>.png`` (oracle and proxy vs iteration, one line
per objective, mean over seeds) and ``overoptimisation.png`` (proxy gain vs oracle gain, one point per cell).
"""

from __future__ import annotations

import argparse
import difflib
import gc
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the tables (the one place to tune the benchmark)

# Per objective: the objective id of the training loop, its hyper-parameters, and the alignment recipe. A recipe
# key is any DemoConfig field among RECIPE_KEYS; a key left out takes DemoConfig's default, so the demo's tuned
# values flow in until an objective needs its own. "rewards" pins the rewards an objective runs on (else --rewards).
OBJECTIVES: dict[str, dict[str, Any]] = {
    "grpo": {"objective": "grpo", "params": {}, "recipe": {}},
    "prdp": {"objective": "prdp", "params": {}, "recipe": {}},
    "dragon": {"objective": "dragon", "params": {}, "recipe": {}},
    "raft": {"objective": "raft", "params": {}, "recipe": {}},
    # Parrot-style multi-reward GRPO: only the batch's non-dominated samples over the reward terms carry the
    # update, which needs at least two terms, hence its own two-proxy reward.
    "pareto": {"objective": "grpo", "params": {}, "recipe": {}, "pareto": True, "rewards": ["clip+vlm"]},
    # Reward backprop needs a differentiable reward (the oracle is not) and samples with the deterministic sampler
    # the evaluation uses; 4 × 4 samples per iteration, since each one carries a graph through the chain.
    "draft": {"objective": "draft", "params": {"k": 0, "checkpoint_steps": False},
              "recipe": {"eta": 0.0, "prompts_per_step": 4, "images_per_prompt": 4}, "rewards": ["clip"]},
    "alignprop": {"objective": "alignprop", "params": {"checkpoint_steps": False},
                  "recipe": {"eta": 0.0, "prompts_per_step": 4, "images_per_prompt": 4}, "rewards": ["clip"]},
    # The demo's two stages: GRPO, then DRaFT-K backpropagating the reward's differentiable terms through the last
    # steps of the η = 0 chain (assets/shapes/README.md, Demo, point 22). Rewards without such a term cannot run it.
    "grpo+polish": {"objective": "grpo", "params": {}, "recipe": {"polish_iterations": 40}},
    # The likelihood-free forward-process objectives (docs/methods.md#nft, docs/methods.md#awm): they train on the
    # clean final samples, so they sample with the deterministic η = 0 sampler the evaluation uses (DemoConfig's
    # generic recipe) and re-noise at the levels of the trained steps (the first 3 of 10).
    "nft": {"objective": "nft", "params": {}, "recipe": {}},
    "awm": {"objective": "awm", "params": {}, "recipe": {}},
}

# Per reward: the reward.terms of the training loop; "uncertainty_weights" multiplies each sample's loss by the
# uncertainty scorer's extras weight (reward.uncertainty_weights).
REWARDS: dict[str, dict[str, Any]] = {
    "oracle": {"terms": [{"scorer": "shapes-oracle", "weight": 1.0}]},
    "clip": {"terms": [{"scorer": "shapes-clip", "weight": 1.0}]},
    "vlm": {"terms": [{"scorer": "shapes-vlm", "weight": 1.0}]},
    "ensemble": {"terms": [{"scorer": "shapes-ensemble", "weight": 1.0}]},
    "uncertainty": {"terms": [{"scorer": "shapes-uncertainty", "weight": 1.0}], "uncertainty_weights": True},
    # The oracle plus the continuous colour fidelity (shapes-colour), which prices hue drift and darkening before the
    # oracle's chroma rule flips a colour; both verifiable from pixels. Weights 0.5 keep the total in [0, 1].
    "oracle+colour": {"terms": [{"scorer": "shapes-oracle", "weight": 0.5, "name": "oracle"},
                                {"scorer": "shapes-colour", "weight": 0.5, "name": "colour"}]},
    # Weights 0.5 keep the total in [0, 1] like the single-term rewards, so proxy gains compare across rows.
    "clip+vlm": {"terms": [{"scorer": "shapes-clip", "weight": 0.5, "name": "clip"},
                           {"scorer": "shapes-vlm", "weight": 0.5, "name": "vlm"}]},
}
DEFAULT_REWARDS = ("oracle", "clip", "vlm", "ensemble", "uncertainty")
RECIPE_KEYS = ("lr", "iterations", "prompts_per_step", "images_per_prompt", "steps", "train_steps_per_update",
               "train_fraction", "eta", "sde_window", "guidance", "lora_rank", "align_kinds", "eval_kinds",
               "polish_iterations", "polish_k", "polish_lr")
# The benchmark compares objectives: the demo's polish stage stays off unless a row asks for it ("grpo+polish").
HARNESS_RECIPE = {"polish_iterations": 0}
ORACLE = "shapes-oracle"

# ---------------------------------------------------------------- one cell


def cell_name(objective: str, reward: str, seed: int) -> str:
    return f"{objective}__{reward}__seed{seed}"


def resolve_recipe(objective: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """DemoConfig defaults ← ``OBJECTIVES[objective]["recipe"]`` ← command-line ``overrides`` (RECIPE_KEYS only)."""
    from visalign.shapes.demo import DemoConfig

    defaults = DemoConfig(objective=OBJECTIVES[objective]["objective"])  # with that objective's demo recipe
    recipe = {**{k: getattr(defaults, k) for k in RECIPE_KEYS if hasattr(defaults, k)}, **HARNESS_RECIPE}
    for where, values in ((f"OBJECTIVES[{objective!r}]['recipe']", OBJECTIVES[objective].get("recipe", {})),
                          ("--recipe", overrides)):
        unknown = sorted(set(values) - set(recipe))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; recipe keys are {sorted(recipe)}.")
        recipe.update(values)
    return recipe


def polish_rewards(terms: list[dict[str, Any]]) -> list[str]:
    """``ID:WEIGHT`` entries of the reward terms a polish stage can backpropagate (weighted, differentiable)."""
    from visalign.shapes.demo import differentiable_terms

    pairs = differentiable_terms([(t["scorer"], t["weight"]) for t in terms])
    kept = [f"{scorer}:{weight}" for scorer, weight in pairs]
    if not kept:
        raise ValueError(f"a polish stage backpropagates the reward, but none of {[t['scorer'] for t in terms]} is "
                         "differentiable; run that reward without polish_iterations.")
    return kept


def fingerprint(objective: str, reward: str, recipe: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides a cell's numbers; a resumed cell must match it."""
    entry = OBJECTIVES[objective]
    return {"objective": entry["objective"], "params": entry.get("params", {}), "pareto": bool(entry.get("pareto")),
            "terms": REWARDS[reward]["terms"], "uncertainty_weights": bool(REWARDS[reward].get("uncertainty_weights")),
            "recipe": recipe, "eval_heldin": args.eval_heldin, "eval_heldout": args.eval_heldout,
            "eval_steps": args.eval_steps, "eval_images_per_prompt": args.eval_images_per_prompt,
            "curve_every": args.curve_every, "curve_prompts": args.curve_prompts}


def build_train_config(demo: Any, spec: dict[str, Any], align_file: Path, curve_file: Path, run_dir: Path,
                       curve_every: int, curve_prompts: int) -> Any:
    """The demo's TrainConfig with this cell's reward terms, Pareto/uncertainty switches and Trainer evaluation
    (the oracle as held-out scorer on the held-in curve prompts, DDIM η = 0 with the demo's eval steps and seed)."""
    from visalign.config import from_dict, to_dict
    from visalign.shapes.demo import train_config
    from visalign.train.config import TrainConfig

    data = to_dict(train_config(demo, align_file, run_dir))
    data["reward"]["terms"] = [dict(t) for t in spec["terms"]]
    data["reward"]["pareto"] = spec["pareto"]
    data["reward"]["uncertainty_weights"] = spec["uncertainty_weights"]
    data["eval"] = {"prompts": str(curve_file), "every": curve_every, "scorers": [ORACLE], "steps": demo.eval_steps,
                    "eta": 0.0, "max_prompts": curve_prompts, "seed": demo.eval_seed}
    data["run"]["progress"] = False
    return from_dict(TrainConfig, data)


class TotalReward:
    """The training reward's weighted total as a scorer-like callable for :func:`visalign.shapes.demo.evaluate`
    (which reads ``.reward``): ``batch → object with reward [B] float32``. A class, not a closure
    (docs/extending.md#scorers-and-rewards)."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def __call__(self, batch: Any) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(reward=self.spec(batch).total)


def read_curves(train_dir: Path) -> dict[str, list[float | None]]:
    """``iteration``, ``oracle`` (eval/reward), ``proxy`` (eval/proxy/reward), ``path_kl`` per evaluation row of
    the Trainer's metrics.jsonl; a step logged twice (the last periodic eval and the final one) keeps the last."""
    from visalign.train.logging import read_metrics

    rows: dict[int, dict[str, Any]] = {}
    for row in read_metrics(train_dir):
        if "eval/reward" in row:
            rows.setdefault(int(row["step"]), {}).update(row)
    steps = sorted(rows)
    return {"iteration": steps, "oracle": [_finite(rows[s].get("eval/reward")) for s in steps],
            "proxy": [_finite(rows[s].get("eval/proxy/reward")) for s in steps],
            "path_kl": [_finite(rows[s].get("path_kl")) for s in steps]}


def run_cell(objective: str, reward: str, seed: int, recipe: dict[str, Any], args: argparse.Namespace
             ) -> dict[str, Any]:
    """Align one cell and return its JSON-ready record (see the module docstring for what it holds)."""
    from visalign.shapes.demo import DemoConfig, DemoResult, demo_prompts, evaluate, polish_config, train_config
    from visalign.train.loop import Trainer

    spec = fingerprint(objective, reward, recipe, args)
    run_dir = Path(args.out) / "runs" / cell_name(objective, reward, seed)
    shutil.rmtree(run_dir, ignore_errors=True)  # a cell stopped half-way starts over
    run_dir.mkdir(parents=True)
    demo = DemoConfig(**recipe, reward=spec["terms"][0]["scorer"], objective=spec["objective"],
                      objective_params=dict(spec["params"]), eval_heldin=args.eval_heldin,
                      eval_heldout=args.eval_heldout, eval_steps=args.eval_steps,
                      eval_images_per_prompt=args.eval_images_per_prompt, seed=seed, output_dir=str(run_dir),
                      polish_rewards=polish_rewards(spec["terms"]) if recipe.get("polish_iterations") else None)
    prompts = demo_prompts(demo)
    curve_set = prompts.eval_sets.get("heldin") or next(iter(prompts.eval_sets.values()))
    align_file, curve_file = run_dir / "align_prompts.txt", run_dir / "curve_prompts.txt"
    align_file.write_text("\n".join(prompts.align) + "\n", encoding="utf-8")
    curve_file.write_text("\n".join(curve_set[: args.curve_prompts]) + "\n", encoding="utf-8")
    config = build_train_config(demo, spec, align_file, curve_file, run_dir, args.curve_every, args.curve_prompts)

    c0, w0 = time.process_time(), time.perf_counter()
    trainer = Trainer(config)
    proxy = TotalReward(trainer.reward)  # the training reward's own scorers: weights load once
    curve_cpu = _time_methods(trainer, ("evaluate",))
    _time_methods(trainer.source, ("path_kl",), curve_cpu)
    c1, w1 = time.process_time(), time.perf_counter()
    before = evaluate(trainer.adapter, prompts, proxy, demo)
    c2, w2 = time.process_time(), time.perf_counter()
    train_summary = trainer.run(resume=False)
    final = Path(config.run.output_dir) / "final"
    if demo.polish_iterations:  # the polish is part of the aligning budget; it runs no curve evaluations
        polish = train_config(polish_config(demo), align_file, run_dir, stage="polish", init_lora=final)
        polish.run.progress = False
        trainer = Trainer(polish)
        trainer.run(resume=False)
        final = Path(polish.run.output_dir) / "final"
    c3, w3 = time.process_time(), time.perf_counter()
    after = evaluate(trainer.adapter, prompts, proxy, demo)
    c4, w4 = time.process_time(), time.perf_counter()
    # "align" is the budget that objectives compete on: the Trainer's run minus its curve evaluations (the
    # benchmark's own measurement, which a user's run would not pay for).
    cpu = {"load": c1 - c0, "eval": (c2 - c1) + (c4 - c3), "curves": curve_cpu["seconds"],
           "align": c3 - c2 - curve_cpu["seconds"], "total": c4 - c0}
    wall = {"load": w1 - w0, "eval": (w2 - w1) + (w4 - w3), "align_and_curves": w3 - w2, "total": w4 - w0}
    summary = DemoResult({}, before, after, prompts, train_summary, [], wall, final).summary()
    # Checkpoints only serve a resume inside the cell, which the benchmark never does; the final LoRA stays.
    for stage in (Path(config.run.output_dir), run_dir / "polish"):
        shutil.rmtree(stage / "checkpoints", ignore_errors=True)
    keep = ("train_reward_first", "train_reward_last", "reward_std_first", "reward_std_last", "diversity_first",
            "diversity_last", "path_kl_last", "nan_dropped", "collapse_warnings", "final_weights")
    return _clean({"objective": objective, "reward": reward, "seed": seed, "fingerprint": spec,
                   "align_prompts": len(prompts.align), "sets": summary["sets"],
                   "curves": read_curves(Path(config.run.output_dir)), "cpu_seconds": cpu, "wall_seconds": wall,
                   "train": {k: train_summary.get(k) for k in keep}, "torch_threads": _threads()})


# ---------------------------------------------------------------- the grid


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(objective, reward, seed) cells in run order: seed-major, so a partial grid has every row at seed 0."""
    cells = []
    for seed in args.seeds:
        for objective in args.objectives:
            for reward in OBJECTIVES[objective].get("rewards") or args.rewards:
                cells.append((objective, reward, seed))
    return cells


def run_grid(args: argparse.Namespace, log: Any = print) -> None:
    """Run every planned cell (skipping finished ones with ``--resume``), writing each cell's JSON as it ends."""
    cells_dir = Path(args.out) / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    todo = plan(args)
    for i, (objective, reward, seed) in enumerate(todo, start=1):
        name = cell_name(objective, reward, seed)
        path = cells_dir / f"{name}.json"
        recipe = resolve_recipe(objective, args.recipe)
        if args.iterations is not None:
            recipe["iterations"] = args.iterations
        if args.resume and path.is_file():
            _check_resumable(path, fingerprint(objective, reward, recipe, args))
            log(f"[{i}/{len(todo)}] {name}: done earlier, skipped (--resume)")
            continue
        log(f"[{i}/{len(todo)}] {name}: {recipe['iterations']} iterations of {recipe['prompts_per_step']} prompts x "
            f"{recipe['images_per_prompt']} samples, lr {recipe['lr']}")
        record = run_cell(objective, reward, seed, recipe, args)
        _write_json(path, record)
        log("      " + _cell_line(record))
        gc.collect()  # the next cell loads its own Trainer; free this one's model and scorers first


def _check_resumable(path: Path, expected: dict[str, Any]) -> None:
    recorded = json.loads(path.read_text(encoding="utf-8")).get("fingerprint", {})
    differ = sorted(k for k in set(expected) | set(recorded) if _clean(expected.get(k)) != recorded.get(k))
    if differ:
        raise SystemExit(f"shapes_objectives: {path} was run with different settings ({', '.join(differ)}); "
                         "--resume would mix two recipes in one table. Use another --out, or delete that file to "
                         "rerun the cell.")


# ---------------------------------------------------------------- results: aggregate, table, plots


def load_cells(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / "cells").glob("*.json"))]


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd over seeds per (objective, reward): oracle gains in points, proxy gain, attribute gains, CPU."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["objective"], cell["reward"]), []).append(cell)
    rows = []
    for (objective, reward), members in groups.items():
        row: dict[str, Any] = {"objective": objective, "reward": reward, "seeds": sorted(c["seed"] for c in members)}
        for set_name in ("heldin", "heldout"):
            sets = [c["sets"][set_name] for c in members if set_name in c["sets"]]
            if not sets:
                continue
            row[f"{set_name}/oracle_all_gain_pts"] = _mean_sd([100 * s["oracle_all_gain"] for s in sets])
            row[f"{set_name}/proxy_gain"] = _mean_sd([s["proxy_gain"] for s in sets])
            row[f"{set_name}/oracle_all_before"] = _mean_sd([100 * s["oracle_all"][0] for s in sets])
            for attr in sets[0]["attributes"]:
                gains = [100 * (s["attributes"][attr][1] - s["attributes"][attr][0]) for s in sets
                         if None not in s["attributes"].get(attr, [None])]
                row[f"{set_name}/{attr}_gain_pts"] = _mean_sd(gains)
        row["cpu_minutes_align"] = _mean_sd([c["cpu_seconds"]["align"] / 60 for c in members])
        row["cpu_minutes_total"] = _mean_sd([c["cpu_seconds"]["total"] / 60 for c in members])
        rows.append(row)
    order = {name: i for i, name in enumerate(OBJECTIVES)}
    rewards = {name: i for i, name in enumerate(REWARDS)}
    return sorted(rows, key=lambda r: (order.get(r["objective"], 99), rewards.get(r["reward"], 99), r["reward"]))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary table: oracle-all gain held-in / held-out, per-attribute gains (held-in / held-out), proxy gain
    on the held-in samples and CPU minutes of the alignment, mean ± sd over seeds."""
    from visalign.table import format_table

    attrs = [a for a in ("colour", "shape", "count", "position", "motion")
             if any(f"heldin/{a}_gain_pts" in r or f"heldout/{a}_gain_pts" in r for r in rows)]
    header = (["objective", "reward", "seeds", "Δ all held-in (pts)", "Δ all held-out (pts)"]
              + [f"Δ {a} in / out (pts)" for a in attrs] + ["Δ proxy held-in", "CPU min (align)"])
    body = []
    for r in rows:
        body.append([r["objective"], r["reward"], len(r["seeds"]), _pm(r.get("heldin/oracle_all_gain_pts")),
                     _pm(r.get("heldout/oracle_all_gain_pts"))]
                    + [f"{_pm(r.get(f'heldin/{a}_gain_pts'))} / {_pm(r.get(f'heldout/{a}_gain_pts'))}" for a in attrs]
                    + [_pm(r.get("heldin/proxy_gain"), digits=3), _pm(r.get("cpu_minutes_align"), signed=False)])
    return format_table(header, body, markdown=True)


def plot_curves(cells: list[dict[str, Any]], out: Path) -> list[Path]:
    """``curves_<reward>.png``: eval oracle reward and eval proxy reward vs iteration, one line per objective (mean
    over seeds, band = ± sd) on the held-in curve prompts."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a CPU box; PNGs only
    import matplotlib.pyplot as plt

    written = []
    for reward in sorted({c["reward"] for c in cells}):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
        for objective in [o for o in OBJECTIVES if any(c["objective"] == o and c["reward"] == reward for c in cells)]:
            runs = [c["curves"] for c in cells if c["objective"] == objective and c["reward"] == reward]
            for ax, key in zip(axes, ("oracle", "proxy"), strict=True):
                steps, mean, sd = _mean_curve(runs, key)
                if not steps:
                    continue
                (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{objective} (n={len(runs)})")
                ax.fill_between(steps, [m - s for m, s in zip(mean, sd, strict=True)],
                                [m + s for m, s in zip(mean, sd, strict=True)], color=line.get_color(), alpha=0.15)
        axes[0].set_title("oracle reward (gold) on held-in eval prompts")
        axes[1].set_title(f"training reward ({reward}) on the same samples")
        for ax in axes:
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("mean reward")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"shapes world, reward {reward}: proxy vs oracle during alignment")
        fig.tight_layout()
        path = out / f"curves_{reward}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_overoptimisation(cells: list[dict[str, Any]], out: Path) -> Path:
    """``overoptimisation.png``: per cell, proxy gain (x) vs oracle-all gain in points (y), held-in and held-out;
    points right of x = 0 and below y = 0 are a proxy that rose while the gold fell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = dict(zip(OBJECTIVES, "osD^vPX*hd", strict=True))
    rewards = sorted({c["reward"] for c in cells})
    colours = {r: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(rewards)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, set_name in zip(axes, ("heldin", "heldout"), strict=True):
        for c in cells:
            s = c["sets"].get(set_name)
            if s is not None:
                ax.scatter(s["proxy_gain"], 100 * s["oracle_all_gain"], marker=markers.get(c["objective"], "x"),
                           color=colours[c["reward"]], alpha=0.8, s=30)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("proxy gain (training reward, after − before)")
        ax.set_title({"heldin": "held-in prompts", "heldout": "held-out compositions"}[set_name])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("oracle 'all' gain (points)")
    handles = ([plt.Line2D([], [], ls="", marker="o", color=colours[r], label=r) for r in rewards]
               + [plt.Line2D([], [], ls="", marker=m, color="black", label=o) for o, m in markers.items()
                  if any(c["objective"] == o for c in cells)])
    axes[1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle("overoptimisation: proxy gain vs oracle gain, one point per cell")
    fig.tight_layout()
    path = out / "overoptimisation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, log: Any = print) -> dict[str, Any]:
    """Rebuild ``results.json``, ``table.md`` and the PNGs from every cell JSON in ``out/cells``; return results."""
    cells = load_cells(out)
    if not cells:
        raise SystemExit(f"shapes_objectives: no finished cells in {out / 'cells'}; run the grid first.")
    rows = aggregate(cells)
    results = {"cells": cells, "aggregate": rows}
    _write_json(out / "results.json", _clean(results))
    base = cells[0]["sets"]
    lines = ["Base model, oracle 'all' accuracy: "
             + ", ".join(f"{k} {100 * v['oracle_all'][0]:.1f} % (n={v['n']})" for k, v in base.items()),
             "", markdown_table(rows)]
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table, encoding="utf-8")
    log(table)
    for path in [*plot_curves(cells, out), plot_overoptimisation(cells, out)]:
        log(f"wrote {path}")
    return results


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from visalign.shapes.demo import DemoConfig

    demo = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help="Comma list of OBJECTIVES keys.")
    p.add_argument("--rewards", default=",".join(DEFAULT_REWARDS), help="Comma list of REWARDS keys (objectives "
                   "with pinned rewards, such as pareto, run on their own).")
    p.add_argument("--seeds", default="0,1,2", help="Comma list of alignment seeds.")
    p.add_argument("--iterations", type=int, default=None, help="Iterations of every cell (default: the table's).")
    p.add_argument("--curve-every", type=int, default=5, help="Trainer eval (oracle + proxy) every N iterations.")
    p.add_argument("--curve-prompts", type=int, default=16, help="Held-in prompts of the curve evaluation.")
    p.add_argument("--eval-heldin", type=int, default=demo.eval_heldin, help="Held-in eval prompts (first N).")
    p.add_argument("--eval-images-per-prompt", type=int, default=demo.eval_images_per_prompt,
                   help="Evaluation samples per prompt (fixed seeds).")
    p.add_argument("--eval-heldout", type=int, default=demo.eval_heldout, help="Held-out eval prompts (first N).")
    p.add_argument("--eval-steps", type=int, default=demo.eval_steps, help="DDIM steps of η = 0 eval samples.")
    p.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"Override the table's recipe for every objective; keys: {', '.join(RECIPE_KEYS)}.")
    p.add_argument("--out", default="runs/shapes-objectives", help="Output folder.")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default).")
    p.add_argument("--resume", action="store_true", help="Skip cells whose JSON exists in OUT/cells.")
    p.add_argument("--report-only", action="store_true", help="Only rebuild results.json, table and plots.")
    args = p.parse_args(argv)
    args.objectives = _names(args.objectives, OBJECTIVES, "--objectives")
    args.rewards = _names(args.rewards, REWARDS, "--rewards")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers; got {args.seeds!r}.")
    args.recipe = _overrides(args.recipe, p)
    if args.curve_every < 0 or args.curve_prompts < 1 or (args.iterations is not None and args.iterations < 1):
        p.error("--curve-every must be >= 0, --curve-prompts and --iterations >= 1.")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the requested grid (or only the report) and return the combined results."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        try:
            run_grid(args)
        except BaseException:  # a stopped grid (Ctrl-C, a failing cell) still gets a table of its finished cells
            if any((out / "cells").glob("*.json")):
                write_report(out)
            raise
    return write_report(out)


# ---------------------------------------------------------------- small helpers


def _names(text: str, table: dict[str, Any], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in table:
            near = difflib.get_close_matches(n, list(table))
            raise SystemExit(f"shapes_objectives: unknown {flag} entry {n!r}; close: {near}. Known: {list(table)}.")
    return names


def _overrides(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in RECIPE_KEYS:
            parser.error(f"--recipe {item!r}: write KEY=VALUE with KEY one of {', '.join(RECIPE_KEYS)}.")
        values[key] = yaml.safe_load(value)  # 3e-4, null, [count, relation] parse as in recipes
    return values


def _mean_sd(values: list[float]) -> dict[str, float | int | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _pm(stat: dict[str, Any] | None, digits: int = 1, signed: bool = True) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
    return text if stat.get("sd") is None else f"{text} ± {stat['sd']:.{digits}f}"


def _mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and sd over runs at the iterations every run evaluated (seeds of one cell share the schedule)."""
    common = set.intersection(*[{s for s, v in zip(r["iteration"], r[key], strict=True) if v is not None}
                                for r in runs]) if runs else set()
    steps = sorted(common)
    per_step = [[r[key][r["iteration"].index(s)] for r in runs] for s in steps]
    return (steps, [statistics.fmean(v) for v in per_step],
            [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_step])


def _cell_line(record: dict[str, Any]) -> str:
    parts = [f"{name} all {100 * s['oracle_all'][0]:.1f} → {100 * s['oracle_all'][1]:.1f} %, proxy "
             f"{s['proxy'][0]:.3f} → {s['proxy'][1]:.3f}" for name, s in record["sets"].items()]
    return "; ".join(parts) + f"; align CPU {record['cpu_seconds']['align'] / 60:.1f} min"


def _time_methods(obj: Any, names: tuple[str, ...], totals: dict[str, float] | None = None) -> dict[str, float]:
    """Wrap ``obj``'s methods so the process CPU seconds spent inside them add up in the returned dict (``totals``
    when given, so methods of several objects share one sum)."""
    totals = {"seconds": 0.0} if totals is None else totals

    def timed(method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                totals["seconds"] += time.process_time() - start
        return call

    for name in names:
        setattr(obj, name, timed(getattr(obj, name)))
    return totals


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → None (strict JSON readers reject NaN), tuples → lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def _quiet_loading() -> None:
    """No per-cell "Loading weights" / "Loading pipeline components" bars: the grid's own lines stay readable."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _write_json(path: Path, data: Any) -> None:
    """Write atomically (temp file + rename), so a kill mid-write never leaves a torn cell file for --resume."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    _quiet_loading()  # here, not in main(): a caller such as the test keeps its own logging settings
    main()
