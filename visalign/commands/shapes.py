"""``visalign shapes build``: train the shapes world's shipped models on CPU, or ``--check`` the shipped ones.

Thin by design (STYLE.md §2.2): parse, then call :mod:`visalign.shapes.build_t2i`, :mod:`visalign.shapes.build_t2v`
and :mod:`visalign.shapes.check`. Every build is seeded; ``--minutes`` caps the denoiser's training time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ASSETS = ("t2i", "t2v")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shapes", help="Build or check the shapes world's shipped models (assets/shapes).",
                       description="Train the shapes world's tiny generators on CPU (seeded, reproducible) into "
                                   "assets/shapes, or retrain a small part and compare with the recorded metrics.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    b = actions.add_parser("build", help="Train the assets (or --check the shipped ones).")
    b.add_argument("--only", choices=ASSETS, action="append",
                   help="Build only this asset (repeatable); default: all of " + ", ".join(ASSETS) + ".")
    b.add_argument("--out", default="assets/shapes", help="Folder holding one sub-folder per asset.")
    b.add_argument("--minutes", type=float, default=None,
                   help="Wall-clock cap on each denoiser's training, minutes (default: the recipe's: 45 t2i, 8 t2v).")
    b.add_argument("--seed", type=int, default=0, help="Seed of every random draw of the build.")
    b.add_argument("--resume", action="store_true", help="Continue from the checkpoints in <out>/<asset>.work.")
    b.add_argument("--no-eval", action="store_true", help="Skip the oracle evaluation of the saved folders.")
    b.add_argument("--check", action="store_true",
                   help="Do not build: retrain a few UNet steps of each shipped asset twice (must be bit-identical) "
                        "and compare loss and VAE accuracy with the asset's build.json.")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) != "build":
        raise SystemExit("usage: visalign shapes build [--only t2i|t2v] [--minutes M] [--out DIR] [--check]")
    assets = args.only or list(ASSETS)
    out = Path(args.out)
    if args.check:
        return _check(out, assets)
    for asset in assets:
        if asset == "t2i":
            from visalign.shapes.build_t2i import T2IBuildConfig, build_t2i
            from visalign.shapes.check import record_check

            config = T2IBuildConfig(out=str(out / "t2i"), seed=args.seed, resume=args.resume)
            if args.minutes is not None:
                config.unet_minutes = args.minutes
            metrics = build_t2i(config, evaluate=not args.no_eval, prompts_dir=out / "prompts")
            metrics["check"] = record_check(out / "t2i", args.seed)
        else:
            from visalign.shapes.build_t2v import T2VBuildConfig, build_t2v

            config = T2VBuildConfig(out=str(out / "t2v"), image_dir=str(out / "t2i"), seed=args.seed)
            if args.minutes is not None:
                config.minutes = args.minutes
            metrics = build_t2v(config, evaluate=not args.no_eval, prompts_dir=out / "prompts")
        print(json.dumps({"asset": asset, "eval": metrics.get("eval"), "size_mb": metrics.get("size_mb")}))
    return 0


def _check(out: Path, assets: list[str]) -> int:
    from visalign.shapes.check import check_t2i

    failed = False
    for asset in assets:
        if asset != "t2i":
            print(json.dumps({"asset": asset, "skipped": "the check retrains the t2i UNet; the t2v build reuses "
                                                          "its VAE and tokenizer"}))
            continue
        folder = out / asset
        if not (folder / "model_index.json").exists():
            raise SystemExit(f"{folder} is not a pipeline folder; build it first with 'visalign shapes build "
                             f"--only {asset} --out {out}'.")
        result = check_t2i(folder)
        failed |= not result["ok"]
        print(json.dumps({"asset": asset, **result}))
    return 1 if failed else 0
