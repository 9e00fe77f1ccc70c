"""``visalign rm``: train a yes-token reward model on preference data (``rm train``) and evaluate scorers on
pairs (``rm eval``). The library does the work (visalign/rm/train.py, visalign/rm/evaluate.py); math in
docs/methods.md#reward-models."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

TRAIN_EPILOG = """data (image paths relative to the table):
  pairs.jsonl      {"prompt": "two red circles", "chosen": "a.png", "rejected": "b.png", "tie": 0}
  labels.csv       prompt,image,label          (label 1/0: every good x bad image becomes a pair, any prompts)

losses:
  yes-no           the judge answers Yes for chosen/good images and No for rejected/bad ones (what the yes-token
                   scorer reads as its reward, P("Yes"))
  pairwise-yes-no  "is the first image better than the second?" in both orders (a pairwise card: --mode pairwise)
  bt | bt-ties | soli-ties   Bradley-Terry (margin), Rao-Kupper BT with ties (kappa), SoliReward wide ties, on
                   the yes/no log-odds of each image

examples:
  visalign rm train --data pairs.jsonl --base shapes-vlm --loss yes-no --steps 200 --out runs/rm --id shapes-rm
  visalign rm train rm.yaml --steps 50          (YAML keys are the flag names; flags override them)
  visalign rm eval --scorer runs/rm/card.yaml --compare shapes-vlm --data heldout.jsonl --out eval.json

Output: OUT/weights/ (the model), OUT/card.yaml (a scorer card: get_scorer("OUT/card.yaml")), OUT/metrics.json.
Refused with the rows named: identical chosen/rejected images, missing files, ties for a loss without ties.
"""

EVAL_EPILOG = """metrics (docs/methods.md#reward-models):
  accuracy   share of non-tie pairs the scorer orders like the label (exact score ties count half)
  ece        expected calibration error of sigma(gap), both orders, 10 bins (probability scores as logits)
  ties       predicted-tie rate and three-way accuracy with |gap| <= --tie-eps (when the data has ties)
  swap       position-swap bias and verdict consistency (pairwise-vs-reference judges, asked both orders)
  agreement  sign agreement and Pearson correlation of the two scorers' gaps (--compare)
"""

_NO_FLAG = ("progress",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from visalign.rm.train import RmTrainConfig

    p = sub.add_parser("rm", help="Train or evaluate reward models on preference pairs.",
                       description="Train yes-token VLM reward models on preference data, and evaluate any scorer on "
                                   "pairs.")
    rm_sub = p.add_subparsers(dest="rm_command", metavar="ACTION", required=True)
    t = rm_sub.add_parser("train", help="Fine-tune a yes-token VLM judge; writes weights + a scorer card.",
                          epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Fine-tune a yes-token VLM judge (VQAScore contract) on pairs or pointwise "
                                      "labels, then save it as a scorer that get_scorer loads at once.")
    t.add_argument("config", nargs="?", default=None, help="Optional YAML config; flags given override it.")
    for f in dataclasses.fields(RmTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in _NO_FLAG:
            t.add_argument("--no-" + f.name, dest=f.name, action="store_false", default=None, help="Hide the bar.")
            continue
        text = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")  # argparse formats help with %
        t.add_argument(flag, type=type(f.default), default=None, help=text)
    e = rm_sub.add_parser("eval", help="Pairwise accuracy, ties, ECE, position-swap bias, agreement on pairs.",
                          epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--scorer", required=True, help="Scorer id or card.yaml path to evaluate.")
    e.add_argument("--compare", default=None, help="A second scorer: its metrics and the agreement of the two.")
    e.add_argument("--data", required=True, help="A pairs table (prompt, chosen, rejected[, tie]).")
    e.add_argument("--tie-eps", type=float, default=None,
                   help="Predict a tie when |gap| <= this (score gap; logits for probability scores). Default: the "
                        "three-way-best value on these pairs, when they have ties.")
    e.add_argument("--bins", type=int, default=10, help="ECE bins.")
    e.add_argument("--resolution", type=int, default=None, help="Resize images to this square side in px.")
    e.add_argument("--batch-size", type=int, default=32, help="Images per scorer call.")
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", default=None, help="Write the metrics as JSON here too.")


def run(args: argparse.Namespace) -> int:
    try:
        return {"train": _train, "eval": _eval}[args.rm_command](args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, not a traceback
        print(f"visalign rm {args.rm_command}: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from visalign.rm.train import RmTrainConfig, load_config, train_rm

    names = [f.name for f in dataclasses.fields(RmTrainConfig)]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    train_rm(load_config(args.config, overrides), log=lambda line: print(line, file=sys.stderr))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from visalign.rm.data import read_rm_table
    from visalign.rm.evaluate import best_tie_eps, compare, pair_metrics, score_pairs
    from visalign.scorers import get_scorer

    data = read_rm_table(args.data, resolution=args.resolution)
    print(f"rm eval: {data.summary()} from {args.data}", file=sys.stderr)
    tie = torch.tensor([p.tie for p in data.pairs])
    result: dict = {"data": str(args.data), "scorers": {}}
    scores = {}
    for name in [args.scorer] + ([args.compare] if args.compare else []):
        scorer = get_scorer(name, device=args.device)
        scores[name] = score_pairs(scorer, data.prompts, data.images, data.pairs, batch_size=args.batch_size)
        eps = args.tie_eps if args.tie_eps is not None else (best_tie_eps(scores[name].gap, tie) if tie.any()
                                                             else None)
        result["scorers"][name] = pair_metrics(scores[name], tie, tie_eps=eps, bins=args.bins)
    if args.compare:
        result["agreement"] = compare(scores[args.scorer], scores[args.compare])
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


def format_table(result: dict) -> str:
    """The metrics as a fixed-width table: one row per scorer, then the agreement line."""
    keys = ["pairs", "ties", "accuracy", "ece", "predicted_tie_rate", "tie_accuracy", "swap_bias",
            "swap_consistency"]
    width = max(len(n) for n in result["scorers"]) + 2
    lines = ["scorer".ljust(width) + "".join(k.rjust(19) for k in keys)]
    for name, metrics in result["scorers"].items():
        cells = [f"{metrics[k]:.4f}" if k in metrics and k not in ("pairs", "ties") else
                 (f"{int(metrics[k])}" if k in metrics else "-") for k in keys]
        lines.append(name.ljust(width) + "".join(c.rjust(19) for c in cells))
    if "agreement" in result:
        a = result["agreement"]
        lines.append(f"agreement: sign {a['sign']:.4f}, pearson {a['pearson']:.4f}")
    return "\n".join(lines)
