"""``visalign rm``: train a reward model on preference pairs (``rm train``) and evaluate scorers on pairs
(``rm eval``). Math in docs/methods.md#reward-models."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

EPILOG = """examples:
  visalign rm train --base shapes-vlm --pairs pairs.jsonl --loss yes-no --steps 200 --out runs/rm --id shapes-rm
  VISALIGN_CARD_PATH=runs/rm/cards visalign rm eval --scorer shapes-rm --compare shapes-vlm --pairs heldout.jsonl

Pairs are read by the offline pair reader (a .jsonl/.csv with prompt, chosen, rejected columns, or a datasets
folder); pairs whose two images are identical are refused with their rows named.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rm", help="Train or evaluate reward models on preference pairs.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    rm_sub = p.add_subparsers(dest="rm_command", metavar="ACTION", required=True)
    t = rm_sub.add_parser("train", help="Fine-tune a yes-token VLM judge on pairs; writes weights + a scorer card.")
    t.add_argument("--base", required=True, help="A VlmYesScorer card id to start from (e.g. shapes-vlm).")
    t.add_argument("--pairs", required=True, help="Preference pairs (jsonl/csv/datasets folder).")
    t.add_argument("--loss", default="yes-no", choices=["yes-no", "bt", "pairwise-yes-no"])
    t.add_argument("--mode", default=None, choices=["pointwise", "pairwise"],
                   help="Override the base card's mode (pairwise-yes-no needs pairwise).")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--pairs-per-step", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--margin", type=float, default=0.0, help="BT margin (--loss bt).")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resolution", type=int, default=None, help="Resize pair images to this side.")
    t.add_argument("--out", required=True, help="Output folder: weights, metrics.json, cards/<id>.yaml.")
    t.add_argument("--id", required=True, help="Scorer id of the trained RM.")
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-progress", action="store_true")
    e = rm_sub.add_parser("eval", help="Pairwise accuracy, ECE, position-swap bias, agreement of scorers on pairs.")
    e.add_argument("--scorer", required=True, help="Scorer id to evaluate.")
    e.add_argument("--compare", default=None, help="A second scorer id: also report agreement with it.")
    e.add_argument("--pairs", required=True, help="Preference pairs (jsonl/csv/datasets folder).")
    e.add_argument("--resolution", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", default=None, help="Write the metrics as JSON here too.")


def _read(args: argparse.Namespace) -> tuple[list[str], object, list]:
    import torch

    from visalign.rm.pairs import IndexPair
    from visalign.train.sources.pair_data import read_pairs

    data = read_pairs(args.pairs, resolution=args.resolution)
    print(data.summary(), file=sys.stderr)
    prompts = [r.prompt for r in data.records for _ in range(2)]
    images = torch.stack([im for r in data.records for im in (r.chosen, r.rejected)])
    return prompts, images, [IndexPair(2 * k, 2 * k + 1) for k in range(len(data.records))]


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "eval": _eval}[args.rm_command](args)


def _train(args: argparse.Namespace) -> int:
    from visalign.rm.yes_token import YesTokenConfig, save_yes_token_rm, train_yes_token_rm
    from visalign.scorers import get_scorer
    from visalign.scorers.vlm_yes import DEFAULT_PAIRWISE_TEMPLATE, VlmYesScorer

    params = {}
    if args.mode == "pairwise":
        params = {"mode": "pairwise", "template": DEFAULT_PAIRWISE_TEMPLATE}
    elif args.mode == "pointwise":
        params = {"mode": "pointwise"}
    scorer = get_scorer(args.base, device=args.device, params=params or None)
    if not isinstance(scorer, VlmYesScorer):
        raise SystemExit(f"visalign rm train: --base {args.base!r} is a {type(scorer).__name__}; rm train "
                         "fine-tunes yes-token VLM judges (mechanism visalign.scorers.vlm_yes:VlmYesScorer).")
    prompts, images, pairs = _read(args)
    config = YesTokenConfig(loss=args.loss, steps=args.steps, pairs_per_step=args.pairs_per_step, lr=args.lr,
                            margin=args.margin, seed=args.seed)
    losses = train_yes_token_rm(scorer, images, prompts, pairs, config, progress=not args.no_progress)
    card = save_yes_token_rm(scorer, args.out, args.id, config=config,
                             metrics={"loss_first": losses[0], "loss_last": losses[-1], "pairs": len(pairs),
                                      "base": args.base})
    print(f"Trained {args.id!r}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; card {card}.\n"
          f"Use it: VISALIGN_CARD_PATH={card.parent} visalign score --scorer {args.id} ...")
    return 0


def pair_scores(scorer: object, prompts: list[str], images: object, pairs: list, batch_size: int) -> dict:
    """Scores of both sides of every pair: pointwise ``a``/``b`` (logit for probability scorers), and for
    pairwise judges P(first better) in both orders (``p_ab``, ``p_ba``)."""
    import torch

    from visalign.scorers import ScoreBatch

    a_idx = [p.a for p in pairs]
    b_idx = [p.b for p in pairs]
    if getattr(scorer, "mode", None) == "pairwise" or scorer.kind == "pairwise-vs-reference":
        p_ab, p_ba = [], []
        for s in range(0, len(pairs), batch_size):
            ia, ib = a_idx[s:s + batch_size], b_idx[s:s + batch_size]
            pr = [prompts[i] for i in ia]
            p_ab.append(scorer(ScoreBatch(prompts=pr, media=images[ia], references=images[ib])).raw)
            p_ba.append(scorer(ScoreBatch(prompts=pr, media=images[ib], references=images[ia])).raw)
        ab, ba = torch.cat(p_ab), torch.cat(p_ba)
        # The judge's preference for a as a log-odds gap, symmetric in the two orders.
        gap = torch.logit(((ab + 1 - ba) / 2).clamp(1e-6, 1 - 1e-6))
        return {"gap": gap, "p_ab": ab, "p_ba": ba}
    raw = []
    for s in range(0, len(images), batch_size):
        raw.append(scorer(ScoreBatch(prompts=prompts[s:s + batch_size], media=images[s:s + batch_size])).raw)
    values = torch.cat(raw).float()
    if scorer.card.normalize.get("kind") == "prob":
        values = torch.logit(values.clamp(1e-6, 1 - 1e-6))
    return {"gap": values[a_idx] - values[b_idx]}


def evaluate_scorer(scorer: object, prompts: list[str], images: object, pairs: list, batch_size: int = 32
                    ) -> tuple[dict, object]:
    """Pairwise accuracy, ECE of σ(gap) over both orders, and position-swap bias for pairwise judges."""
    import torch

    from visalign.rm.metrics import expected_calibration_error, pairwise_accuracy, position_swap_bias

    s = pair_scores(scorer, prompts, images, pairs, batch_size)
    gap = s["gap"]
    out = {"pairs": len(pairs), "accuracy": pairwise_accuracy(gap, torch.zeros_like(gap)),
           "ece": expected_calibration_error(torch.sigmoid(torch.cat([gap, -gap])),
                                             torch.cat([torch.ones_like(gap), torch.zeros_like(gap)]).bool())}
    if "p_ab" in s:
        out.update({f"swap_{k}": v for k, v in position_swap_bias(s["p_ab"], s["p_ba"]).items()})
    return out, gap


def _eval(args: argparse.Namespace) -> int:
    from visalign.rm.metrics import agreement
    from visalign.scorers import get_scorer

    prompts, images, pairs = _read(args)
    result: dict = {}
    gaps = {}
    for name in [args.scorer] + ([args.compare] if args.compare else []):
        scorer = get_scorer(name, device=args.device)
        result[name], gaps[name] = evaluate_scorer(scorer, prompts, images, pairs, args.batch_size)
    if args.compare:
        result["agreement"] = agreement(gaps[args.scorer], gaps[args.compare])
    for name, metrics in result.items():
        line = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"{k} {v}"
                         for k, v in metrics.items())
        print(f"{name}: {line}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0
