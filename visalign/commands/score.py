"""``visalign score``: score a folder of images or videos with one or more registered scorers."""

from __future__ import annotations

import argparse
import sys

EXIT_SKIPPED = 3  # some files were unreadable and skipped; every good file was still scored

EPILOG = """examples:
  visalign score --scorer brightness,saturation --images assets/samples --out scores.csv
  visalign score --scorer clip-vit-b32 --images gen/ --prompts prompts.txt --out scores.jsonl
  visalign score --scorer pickscore --weights pickscore=/models/PickScore_v1 --images gen/ \\
      --captions captions.csv --out scores.csv --device cuda --dtype bfloat16

Prompts pair with files in sorted file-name order (--prompts: one line per file), or by name
(--captions: a .jsonl/.csv table with 'file' and 'prompt' columns; extra columns become metadata).
Unreadable files are reported and skipped (exit code 3); --strict stops at the first one instead.
"""

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="Score a folder of images or videos.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score every image (or video) in a folder with one or more scorers and write "
                                   "one row per file, streaming; a summary table is printed at the end.")
    p.add_argument("--scorer", required=True, help="Scorer id(s), comma-separated (see 'visalign scorers list').")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="Folder of images (png, jpg, webp, ...).")
    src.add_argument("--videos", metavar="DIR", help="Folder of videos (mp4/gif, or sub-folders of frames).")
    p.add_argument("--prompts", metavar="FILE", help="Text file, one prompt per media file, in sorted file order.")
    p.add_argument("--captions", metavar="FILE", help="A .jsonl or .csv with 'file' and 'prompt' columns.")
    p.add_argument("--references", metavar="DIR", help="Reference images: same name stem as each file, or just one.")
    p.add_argument("--out", required=True, metavar="FILE", help="Output table: .csv or .jsonl.")
    p.add_argument("--batch-size", type=int, default=16, help="Files per scoring batch (default 16).")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu).")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Model compute dtype (default float32).")
    p.add_argument("--weights", action="append", default=[], metavar="ID=DIR",
                   help="Load scorer ID's weights from a local folder instead of its hub id (repeatable).")
    p.add_argument("--max-frames", type=int, default=None, help="Read at most this many frames per video.")
    p.add_argument("--strict", action="store_true", help="Stop at the first unreadable file instead of skipping it.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def _parse_weights(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"visalign score: --weights wants ID=DIR, got {pair!r}.")
        out[name] = folder
    return out


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from visalign.media import MediaError
    from visalign.registry import UnknownIdError
    from visalign.scorers import WeightsUnavailableError, get_scorer, scorer_card
    from visalign.scoring import InputError, RowWriter, RunningSummary, SkippedFile, collect_items, score_items
    from visalign.table import format_table

    modality = "video" if args.videos else "image"
    weights = _parse_weights(args.weights)
    ids = [s.strip() for s in args.scorer.split(",") if s.strip()]
    if args.batch_size < 1:
        raise SystemExit("visalign score: --batch-size must be at least 1.")
    try:
        cards = [scorer_card(i) for i in ids]
        for card in cards:
            if card.modality == "text":
                raise InputError(f"Scorer {card.id!r} scores texts, not {modality}s.")
            if "prompt" in card.needs and not (args.prompts or args.captions):
                raise InputError(f"Scorer {card.id!r} needs prompts: pass --prompts FILE or --captions FILE.")
            if "reference" in card.needs and not args.references:
                raise InputError(f"Scorer {card.id!r} compares with references: pass --references DIR.")
        unknown_weights = set(weights) - set(ids)
        if unknown_weights:
            raise InputError(f"--weights names {sorted(unknown_weights)}, which are not among --scorer {ids}.")
        scorers = [get_scorer(i, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]), weights=weights.get(i))
                   for i in ids]
        ids = [card.id for card in cards]  # a card file path (visalign rm train's card.yaml) is keyed by its id
        items = collect_items(args.videos or args.images, modality, args.prompts, args.captions, args.references)
    except (UnknownIdError, InputError, MediaError) as err:
        print(f"visalign score: {err}", file=sys.stderr)
        return 2

    skipped: list[SkippedFile] = []
    summary = RunningSummary(ids)
    bar = tqdm(total=len(items), unit=modality, disable=args.no_progress, dynamic_ncols=True)
    try:
        with RowWriter(args.out, ids) as writer:
            for row in score_items(scorers, items, modality=modality, batch_size=args.batch_size,
                                   strict=args.strict, max_frames=args.max_frames, skipped=skipped):
                writer.write(row)
                summary.add(row)
                bar.update(1)
                bar.set_postfix({ids[0]: f"{summary.stats[ids[0]]['mean']:.4f}", "skipped": len(skipped)},
                                refresh=False)
            bar.update(len(items) - bar.n)
    except WeightsUnavailableError as err:
        bar.close()
        print(f"visalign score: {err}", file=sys.stderr)
        return 2
    except MediaError as err:  # only raised with --strict
        bar.close()
        print(f"visalign score: {err}\nStopped at the first unreadable file (--strict); rows so far are in "
              f"{args.out}.", file=sys.stderr)
        return 1
    bar.close()
    print(format_table(RunningSummary.HEADER, summary.rows()))
    print(f"wrote {len(items) - len(skipped)} rows to {args.out}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        for s in skipped:
            print(f"  {s.reason}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0
