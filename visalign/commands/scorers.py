"""``visalign scorers list|show``: what the registry holds, as a table or one card."""

from __future__ import annotations

import argparse

import yaml

from visalign.scorers import list_scorers, scorer_card
from visalign.table import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scorers", help="List registered scorers or show one card.",
                       description="Inspect the scorer registry (cards in scorers/ plus VISALIGN_CARD_PATH).")
    action = p.add_subparsers(dest="action", metavar="ACTION")
    lst = action.add_parser("list", help="Table of every scorer id with its capabilities.")
    lst.add_argument("--modality", choices=["image", "video", "text"], help="Only scorers of this modality.")
    show = action.add_parser("show", help="Print one scorer's card.")
    show.add_argument("id", help="A scorer id from 'visalign scorers list'.")


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        card = scorer_card(args.id)
        data = {"id": card.id, "mechanism": card.mechanism, "modality": card.modality, "kind": card.kind,
                "needs": list(card.needs), "differentiable": card.differentiable, "range": list(card.raw_range),
                "normalize": card.normalize or {"kind": "identity"}, "weights": card.weights, "params": card.params,
                "reward_range": list(card.normalizer.output_range(card.raw_range)), "source": card.source}
        if card.description:
            print(card.description, end="\n\n")
        print(yaml.safe_dump(data, sort_keys=False).rstrip())
        return 0
    rows = []
    for name in list_scorers():
        card = scorer_card(name)
        # Bare ``visalign scorers`` (no action) lists everything, like ``list`` without a filter.
        modality = getattr(args, "modality", None)
        if modality and card.modality != modality:
            continue
        rows.append([card.id, card.modality, card.kind, "yes" if card.differentiable else "no",
                     ",".join(card.needs) or "-", card.weights_source])
    print(format_table(["id", "modality", "kind", "differentiable", "needs", "weights"], rows))
    return 0
