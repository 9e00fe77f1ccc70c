"""``visalign convert-weights SRC DST``: turn a published pickle checkpoint into safetensors, once."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-weights", help="Convert a .pt/.pth checkpoint to .safetensors (weights_only loading).",
        description="Read a pickled checkpoint with torch.load(weights_only=True), which refuses arbitrary Python "
                    "objects, and write its tensors to a safetensors file that scorer cards point at "
                    "(e.g. the LAION aesthetic MLP or HPS v2.1).")
    p.add_argument("source", help="The published checkpoint (.pt, .pth or .bin).")
    p.add_argument("destination", help="The .safetensors file to write; folders are created.")
    p.add_argument("--key", default=None,
                   help="Key that wraps the state dict (e.g. state_dict); found automatically when omitted.")
    p.add_argument("--overwrite", action="store_true", help="Replace the destination if it exists.")


def run(args: argparse.Namespace) -> int:
    from visalign.scorers.convert import convert_checkpoint

    try:
        report = convert_checkpoint(args.source, args.destination, key=args.key, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"visalign convert-weights: {err}") from None
    print(f"Wrote {report.destination}: {report.num_tensors} tensors, {report.num_parameters:,} values "
          f"(source sha256 {report.source_sha256[:16]}...).")
    return 0
