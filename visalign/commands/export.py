"""``visalign export RUN_DIR OUT_DIR``: a finished run's LoRA, adapter config and provenance manifest for sharing."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="Export a finished run: LoRA + adapter config + provenance manifest.",
                       description="Copy a run's final weights with a provenance manifest (base model, objective, "
                                   "rewards, seed, summary, versions, SHA-256 of every file); optionally a merged "
                                   "pipeline and a push to the Hugging Face Hub.")
    p.add_argument("run_dir", help="A finished `visalign train` run folder (with final/).")
    p.add_argument("out_dir", help="Where to write the export.")
    p.add_argument("--merge", action="store_true", help="Also write merged/: the base pipeline with the LoRA fused.")
    p.add_argument("--base", help="Base model to merge into (default: the run's model.model).")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the export to this Hub repo (needs network).")
    p.add_argument("--public", action="store_true", help="Create the Hub repo public (default private).")


def run(args: argparse.Namespace) -> int:
    from visalign.train.export import export_run

    try:
        out = export_run(args.run_dir, args.out_dir, merge=args.merge, base=args.base,
                         push_to_hub=args.push_to_hub, private=not args.public)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        print(f"visalign export: {err}", file=sys.stderr)
        return 1
    print(f"exported to {out} (manifest: {out / 'visalign_manifest.json'})")
    return 0
