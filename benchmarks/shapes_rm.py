"""Benchmark: train yes-token VLM reward models on oracle-labelled shapes base samples, and compare them with the
shipped VLM proxy (``shapes-vlm``) on the same held-out pairs.

1. sample ``--samples-per-prompt`` images of each training prompt (the shipped training compositions of every
   still kind minus every composition the demo evaluates) and of each held-out prompt (the demo's held-out
   compositions: relations the base model never saw) with the BASE model (DDIM, η alternating 0/1, the demo's
   guidance); grade each with the exact oracle (``shapes-oracle``: the fraction of attributes satisfied);
2. pairs: within each prompt, every two samples with different oracle rewards are a pair (higher wins), equal
   rewards a tie. Held-out pairs come only from held-out prompts;
3. train from the shipped ``shapes-vlm`` with each ``--losses`` entry (``yes-no``: samples with every attribute
   right answer Yes, the others No, as cross-prompt good × bad pairs; ``bt``: BT on the yes/no log-odds of the
   decided within-prompt pairs, ties dropped; ``bt-ties``: Rao–Kupper on all of them, ties included);
4. report held-out pairwise accuracy (decided pairs), ECE, three-way accuracy with ties (tie band fitted on the
   training pairs) and the Rao–Kupper NLL of the outcomes with ties (κ fitted on the training pairs) for each
   trained RM and for the shipped proxy, on the same pairs.

    python benchmarks/shapes_rm.py --seeds 0 --out benchmarks/results/shapes_rm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
ALIGN_KINDS = ("single", "count", "relation")
sys.path.insert(0, str(REPO))  # run as a script from anywhere


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="Training seeds (the samples are shared).")
    p.add_argument("--train-prompts", type=int, default=160, help="Training prompts sampled (first N).")
    p.add_argument("--heldout-prompts", type=int, default=48, help="Held-out prompts sampled (first N).")
    p.add_argument("--samples-per-prompt", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the base samples.")
    p.add_argument("--losses", nargs="+", default=["yes-no", "bt", "bt-ties"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pairs-per-step", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kappa", type=float, default=1.0, help="Rao-Kupper kappa of bt-ties.")
    p.add_argument("--max-pairs", type=int, default=4000, help="Cap on cross-prompt good x bad pairs (yes-no).")
    p.add_argument("--base", default="shapes-vlm", help="The VLM card to start from (and compare against).")
    p.add_argument("--vision-init", default=None,
                   help="A CLIP proxy folder whose vision tower replaces the base's before training.")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="Save/load the labelled samples here (a .pt file).")
    p.add_argument("--out", default="runs/shapes_rm", help="Output folder (results.json, results.md).")
    p.add_argument("--save-rm", default=None, help="Also save the first seed's RM of the first loss here.")
    return p.parse_args(argv)


def sample_split(adapter: Any, oracle: Any, prompts: list[str], per_prompt: int, steps: int, guidance: float,
                 seed: int) -> dict[str, Any]:
    """Base samples of ``prompts`` (each ``per_prompt`` times, consecutive) with oracle rewards and ``all``."""
    from visalign.scorers import ScoreBatch

    images, reward, right = [], [], []
    chunk = max(1, 64 // per_prompt)
    for k, s in enumerate(range(0, len(prompts), chunk)):
        part = prompts[s:s + chunk]
        with torch.no_grad():
            media = adapter.rollout(part, images_per_prompt=per_prompt, steps=steps, guidance=guidance,
                                    eta=float(k % 2), seed=seed * 100_003 + 7 + k * 64).media.float().clamp(0, 1)
        out = oracle(ScoreBatch(prompts=[p for p in part for _ in range(per_prompt)], media=media))
        images.append(media)
        reward.append(out.raw.float())
        right.append(out.extras["all"].float())
    return {"images": torch.cat(images), "prompts": [p for p in prompts for _ in range(per_prompt)],
            "reward": torch.cat(reward), "all": torch.cat(right) > 0.5}


def labelled_samples(args: argparse.Namespace, log: Any) -> dict[str, dict[str, Any]]:
    """Train and held-out samples with oracle labels (from ``--cache`` when it exists)."""
    if args.cache and Path(args.cache).is_file():
        return torch.load(args.cache, weights_only=False)
    from visalign.generators import load_generator
    from visalign.scorers import get_scorer
    from visalign.shapes.demo import DemoConfig, demo_prompts

    config = DemoConfig()
    # Every kind, relations included, so the RM sees relations; evaluated compositions stay out either way.
    prompts = demo_prompts(DemoConfig(align_kinds=list(ALIGN_KINDS)))
    adapter = load_generator(str(REPO / config.base_model))
    oracle = get_scorer("shapes-oracle")
    data = {}
    for name, chosen in (("train", prompts.align[:args.train_prompts]),
                         ("heldout", prompts.eval_sets["heldout"][:args.heldout_prompts])):
        start = time.perf_counter()
        data[name] = sample_split(adapter, oracle, chosen, args.samples_per_prompt, args.sample_steps,
                                  config.guidance, args.sample_seed + (0 if name == "train" else 1))
        log(f"{name}: {len(data[name]['images'])} samples of {len(chosen)} prompts in "
            f"{time.perf_counter() - start:.0f} s; oracle all-correct {float(data[name]['all'].float().mean()):.3f}, "
            f"mean reward {float(data[name]['reward'].mean()):.3f}")
    if args.cache:
        Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, args.cache)
    return data


def split_pairs(split: dict[str, Any]) -> list[Any]:
    """Every within-prompt pair: higher oracle reward wins, equal rewards are ties."""
    from visalign.rm.pairs import pairs_from_scores

    return pairs_from_scores(split["prompts"], split["reward"], tie_eps=1e-6, keep_ties=True)


def training_pairs(loss: str, split: dict[str, Any], args: argparse.Namespace, seed: int) -> list[Any]:
    """The pairs each loss trains on (see the module docstring, step 3)."""
    from visalign.rm.losses import get_loss
    from visalign.rm.pairs import cross_prompt_pairs

    if get_loss(loss).kind == "verdict":
        return cross_prompt_pairs(split["all"], max_pairs=args.max_pairs, seed=seed)
    pairs = split_pairs(split)
    return pairs if get_loss(loss).ties == "use" else [p for p in pairs if not p.tie]


def load_base(args: argparse.Namespace) -> Any:
    """A fresh copy of the base VLM judge (optionally with another CLIP's vision tower)."""
    from visalign.scorers import get_scorer

    scorer = get_scorer(args.base)
    scorer.ensure_loaded()
    if args.vision_init:
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(args.vision_init, use_safetensors=True)
        tower = scorer.model.model.vision_tower
        getattr(tower, "vision_model", tower).load_state_dict(clip.vision_model.state_dict(), strict=True)
    return scorer


def evaluate(scorer: Any, data: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Held-out metrics of one scorer; the tie band is fitted on the training pairs."""
    from visalign.rm.evaluate import best_tie_eps, fit_kappa, pair_metrics, rao_kupper_nll, score_pairs

    out: dict[str, Any] = {}
    train_pairs = split_pairs(data["train"])
    train = score_pairs(scorer, data["train"]["prompts"], data["train"]["images"], train_pairs)
    train_tie = torch.tensor([p.tie for p in train_pairs])
    eps = best_tie_eps(train.gap, train_tie)
    out["train"] = pair_metrics(train, train_tie, tie_eps=eps)
    pairs = split_pairs(data["heldout"])
    held = score_pairs(scorer, data["heldout"]["prompts"], data["heldout"]["images"], pairs)
    held_tie = torch.tensor([p.tie for p in pairs])
    out["heldout"] = pair_metrics(held, held_tie, tie_eps=eps)
    # Outcome likelihood with ties: κ fitted on the training pairs' gaps, NLL on the held-out pairs.
    kappa = fit_kappa(train.gap, train_tie)
    out["heldout"].update(kappa=kappa, tie_nll=rao_kupper_nll(held.gap, held_tie, kappa))
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def main(argv: list[str] | None = None, log: Any = print) -> dict[str, Any]:
    from visalign.rm.losses import LossParams
    from visalign.rm.yes_token import YesTokenConfig, save_yes_token_rm, train_yes_token_rm

    args = parse_args(argv)
    torch.set_num_threads(1)
    data = labelled_samples(args, log)
    result: dict[str, Any] = {"command": "python benchmarks/shapes_rm.py " + " ".join(argv or sys.argv[1:]),
                              "args": vars(args), "runs": {}}
    for name, split in data.items():
        pairs = split_pairs(split)
        result[f"{name}_data"] = {"samples": len(split["images"]), "all_correct": float(split["all"].float().mean()),
                                  "pairs": len(pairs), "ties": sum(p.tie for p in pairs)}
    log(f"data: {result['train_data']} / held-out {result['heldout_data']}")
    start = time.perf_counter()
    result["shipped"] = evaluate(load_base(argparse.Namespace(**{**vars(args), "vision_init": None})), data)
    log(f"shipped {args.base}: held-out {result['shipped']['heldout']} ({time.perf_counter() - start:.0f} s)")
    for loss in args.losses:
        for seed in args.seeds:
            scorer = load_base(args)
            config = YesTokenConfig(loss=loss, steps=args.steps, pairs_per_step=args.pairs_per_step, lr=args.lr,
                                    seed=seed, params=LossParams(kappa=args.kappa))
            pairs = training_pairs(loss, data["train"], args, seed)
            torch.manual_seed(seed)
            start = time.perf_counter()
            losses = train_yes_token_rm(scorer, data["train"]["images"], data["train"]["prompts"], pairs, config,
                                        progress=False)
            seconds = time.perf_counter() - start
            run = {"loss": loss, "seed": seed, "train_pairs": len(pairs), "loss_first": losses[0],
                   "loss_last": sum(losses[-10:]) / len(losses[-10:]), "train_seconds": seconds,
                   **evaluate(scorer, data)}
            result["runs"][f"{loss}/seed{seed}"] = run
            log(f"{loss} seed {seed}: {len(pairs)} pairs, loss {losses[0]:.3f} -> {run['loss_last']:.3f} in "
                f"{seconds:.0f} s; held-out {run['heldout']}")
            if args.save_rm and loss == args.losses[0] and seed == args.seeds[0]:
                save_yes_token_rm(scorer, args.save_rm, "shapes-rm", config=config,
                                  metrics={"heldout": run["heldout"], "shipped_heldout": result["shipped"]["heldout"]})
    result["summary"] = {loss: {key: summary([r["heldout"][key] for r in result["runs"].values() if r["loss"] == loss
                                              and key in r["heldout"]])
                                for key in ("accuracy", "ece", "tie_accuracy", "tie_nll")} for loss in args.losses}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    rows = ["| scorer | held-out accuracy | ECE | 3-way acc. (ties) | tie NLL |", "|---|---|---|---|---|"]
    sh = result["shipped"]["heldout"]
    rows.append(f"| {args.base} (shipped) | {sh['accuracy']:.3f} | {sh['ece']:.3f} | {sh['tie_accuracy']:.3f} | "
                f"{sh['tie_nll']:.3f} |")
    for loss, s in result["summary"].items():
        acc = s["accuracy"]
        rows.append(f"| {loss} | {acc['median']:.3f} ({acc['mean']:.3f} ± {acc['sd']:.3f}, n={acc['n']}) | "
                    f"{s['ece']['median']:.3f} | {s['tie_accuracy']['median']:.3f} | {s['tie_nll']['median']:.3f} |")
    (out / "results.md").write_text("\n".join(rows) + "\n")
    log("\n".join(rows))
    return result


if __name__ == "__main__":
    main()
