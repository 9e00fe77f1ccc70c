"""``visalign shapes build``: train the shapes world's shipped models on CPU, or ``--check`` the shipped ones.
``visalign shapes eval``: grade a pipeline folder (and a LoRA on it) with the exact oracle, GenEval-style.

Thin by design (docs/extending.md#files-and-names): parse, then call :mod:`visalign.shapes.build_t2i`,
:mod:`visalign.shapes.build_t2v`,
:mod:`visalign.shapes.check` and :mod:`visalign.shapes.evaluate`. Every build is seeded; ``--minutes`` caps the
denoiser's training time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ASSETS = ("t2i", "t2v", "clip-tuned")


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
    e = actions.add_parser(
        "eval", help="Oracle accuracy of a pipeline folder, or of a LoRA against its base (paired samples).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample the shipped evaluation prompts once each with fixed per-prompt seeds through stock "
                    "diffusers (DiffusionPipeline.from_pretrained, load_lora_weights) and grade every image with the "
                    "exact oracle: whole-prompt accuracy ('all'), mean reward, per attribute and per prompt kind. "
                    "With --lora the base is graded first on the same seeds, so the gain is paired.",
        epilog="examples:\n"
               "  visalign shapes eval                                         # the shipped base, DDIM 20 steps\n"
               "  visalign shapes eval --lora runs/demo/polish/final --prompts 192   # aligned vs base\n"
               "  visalign shapes eval --lora runs/demo/train/final --eta 1 --steps 10   # the GRPO stage, on its "
               "sampler")
    e.add_argument("--model", default="assets/shapes/t2i", help="Pipeline folder (default: the shipped base).")
    e.add_argument("--lora", default=None, help="LoRA folder (pytorch_lora_weights.safetensors) to grade against "
                                                "the base.")
    e.add_argument("--sets", default="heldin,heldout", help="Comma list of evaluation sets: heldin (training "
                                                            "compositions), heldout (unseen compositions).")
    e.add_argument("--prompts", type=int, default=96, help="First N prompts of each set (each set has 192).")
    e.add_argument("--prompts-dir", default="assets/shapes/prompts", help="Folder of the shipped prompt sets.")
    e.add_argument("--steps", type=int, default=20, help="DDIM steps.")
    e.add_argument("--eta", type=float, default=0.0, help="DDIM η (0: deterministic; 1: the GRPO sampler).")
    e.add_argument("--guidance", type=float, default=4.0, help="Classifier-free guidance scale.")
    e.add_argument("--seed", type=int, default=1234, help="Prompt i of a set is sampled with seed SEED + i.")
    e.add_argument("--json", default=None, help="Also write the numbers to this JSON file.")
    e.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 keeps torch's default).")


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None)
    if action == "eval":
        return _eval(args)
    if action != "build":
        raise SystemExit("usage: visalign shapes build [--only t2i|t2v|clip-tuned] [--minutes M] [--out DIR]\n"
                         "                             [--check]\n"
                         "       visalign shapes eval [--model DIR] [--lora DIR] [--eta E] [--steps S]")
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
        elif asset == "clip-tuned":
            metrics = _build_clip_tuned(out, args.seed)
        else:
            from visalign.shapes.build_t2v import T2VBuildConfig, build_t2v

            config = T2VBuildConfig(out=str(out / "t2v"), image_dir=str(out / "t2i"), seed=args.seed)
            if args.minutes is not None:
                config.minutes = args.minutes
            metrics = build_t2v(config, evaluate=not args.no_eval, prompts_dir=out / "prompts")
        print(json.dumps({"asset": asset, "eval": metrics.get("eval"), "size_mb": metrics.get("size_mb")}))
    return 0


def _build_clip_tuned(out: Path, seed: int) -> dict:
    """``clip-tuned/``: the CLIP proxy fine-tuned on the base t2i's own samples, captioned by the oracle."""
    from visalign.shapes.prompt_sets import read_prompt_set
    from visalign.shapes.tune_proxy import TuneConfig, tune_clip_on_samples

    for needed in ("clip", "t2i"):
        if not (out / needed / "config.json").is_file() and not (out / needed / "model_index.json").is_file():
            raise SystemExit(f"clip-tuned starts from {out / needed}, which is not built; ship or build it first.")
    metrics = tune_clip_on_samples(out / "clip", out / "t2i", out / "clip-tuned",
                                   read_prompt_set(out / "prompts" / "train.txt"), TuneConfig(seed=seed))
    metrics["size_mb"] = round(sum(f.stat().st_size for f in (out / "clip-tuned").iterdir()) / 2**20, 2)
    return {"eval": {k: metrics[k] for k in ("samples_before", "samples_after", "heldin", "heldout")}, **metrics}


def _check(out: Path, assets: list[str]) -> int:
    from visalign.shapes.check import check_t2i

    failed = False
    for asset in assets:
        if asset != "t2i":
            print(json.dumps({"asset": asset, "skipped": "the check retrains the t2i UNet; the t2v build reuses "
                                                          "its VAE and tokenizer, clip-tuned samples it"}))
            continue
        folder = out / asset
        if not (folder / "model_index.json").exists():
            raise SystemExit(f"{folder} is not a pipeline folder; build it first with 'visalign shapes build "
                             f"--only {asset} --out {out}'.")
        result = check_t2i(folder)
        failed |= not result["ok"]
        print(json.dumps({"asset": asset, **result}))
    return 1 if failed else 0


def _eval(args: argparse.Namespace) -> int:
    import torch
    from diffusers import DiffusionPipeline

    from visalign.shapes.demo import resolve_asset
    from visalign.shapes.evaluate import EVAL_SET_FILES, EvalConfig, evaluate_folder
    from visalign.shapes.prompt_sets import read_prompt_set

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.sets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(EVAL_SET_FILES))
    if unknown or not names:
        raise SystemExit(f"visalign shapes eval: unknown set(s) {unknown or args.sets!r}; use "
                         f"{sorted(EVAL_SET_FILES)}.")
    if args.prompts < 1 or args.steps < 1 or args.eta < 0:
        raise SystemExit("visalign shapes eval: --prompts and --steps must be >= 1 and --eta >= 0.")
    folder = resolve_asset(args.prompts_dir)
    sets = {n: read_prompt_set(folder / EVAL_SET_FILES[n])[: args.prompts] for n in names}
    config = EvalConfig(guidance=args.guidance, steps=args.steps, eta=args.eta, seed=args.seed)
    model = resolve_asset(args.model)
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"visalign shapes eval: {model} is not a diffusers pipeline folder (no model_index.json).")
    if args.lora and not (Path(args.lora) / "pytorch_lora_weights.safetensors").is_file():
        raise SystemExit(f"visalign shapes eval: {args.lora} holds no pytorch_lora_weights.safetensors (the folder "
                         "visalign train writes as final/).")
    pipeline = DiffusionPipeline.from_pretrained(str(model), dtype=torch.float32)
    results = {"base": evaluate_folder(model, sets, config, pipeline=pipeline)}
    if args.lora:
        pipeline.load_lora_weights(str(args.lora))
        results["lora"] = evaluate_folder(model, sets, config, pipeline=pipeline)
    for name in names:
        for which, numbers in results.items():
            print(_eval_line(f"{name:8s} {which:4s}", numbers[name]))
        if "lora" in results:
            gain = 100 * (results["lora"][name]["all"] - results["base"][name]["all"])
            print(f"{name:8s} gain {gain:+.1f} points of 'all' over {results['base'][name]['n']} paired prompts")
    if args.json:
        record = {"model": str(model), "lora": args.lora, "sampler": vars(config), "sets": results}
        Path(args.json).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return 0


def _eval_line(label: str, numbers: dict) -> str:
    attributes = " ".join(f"{a} {100 * v:.1f}" for a, v in numbers["attributes"].items())
    kinds = " ".join(f"{k} {100 * v:.1f}" for k, v in numbers["kinds"].items())
    return (f"{label} all {100 * numbers['all']:5.1f}%  reward {numbers['reward']:.3f}  | {attributes}  | "
            f"by kind: {kinds}")
