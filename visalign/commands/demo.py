"""``visalign demo``: align the shipped shapes-world model with a learned proxy reward and write a report.

Thin by design (docs/extending.md#files-and-names): flags map onto :class:`visalign.shapes.demo.DemoConfig`, and
:func:`visalign.shapes.demo.run_demo` does the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

EPILOG = """examples:
  visalign demo                                   # GRPO on the tuned CLIP proxy + colour, then polish; runs/demo/
  visalign demo --reward shapes-oracle --out runs/demo-oracle   # the verifiable reward itself (+ colour fidelity)
  visalign demo --objective draft                 # reward backprop through the 10-step chain (4 x 4 samples)
  visalign demo --objective nft --polish-iterations 0   # DiffusionNFT (likelihood-free, η = 0 sampling)
  visalign demo --extra-reward none               # the proxy alone, without the colour-fidelity term
  visalign demo --polish-iterations 0             # GRPO only, no reward-backprop polish afterwards
  visalign demo --polish-reward shapes-colour     # polish the colours alone
  visalign demo --reward shapes-vlm --iterations 40
  visalign demo --align-kinds count relation --eval-kinds single count relation   # relations too
  visalign demo --set "optim.betas=[0.98, 0.999]"   # any training key (visalign train --help-config)
  visalign demo --iterations 2 --eval-heldin 8 --eval-heldout 8 --eval-images-per-prompt 1  # a quick smoke run
"""

# flag → DemoConfig field, for the fields exposed on the command line.
FLAGS = {"base_model": str, "reward": str, "objective": str, "iterations": int, "prompts_per_step": int,
         "images_per_prompt": int, "steps": int, "eta": float, "train_fraction": float, "lr": float, "lora_rank": int,
         "eval_heldin": int, "eval_heldout": int, "eval_steps": int, "eval_images_per_prompt": int,
         "grid_prompts": int, "seed": int, "polish_iterations": int, "polish_k": int,
         "polish_lr": float}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from visalign.shapes.demo import DemoConfig

    p = sub.add_parser("demo", help="Align the built-in shapes model with a learned proxy and report the effect.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Evaluate the shipped shapes-world model with the exact oracle, align it "
                                   "(LoRA, GRPO on the learned CLIP proxy plus a colour-fidelity term by default, "
                                   "then a short reward-backprop polish of the colours), evaluate again on prompts "
                                   "not used for alignment, and write runs/demo/report.html.")
    defaults = {f.name: f for f in dataclasses.fields(DemoConfig)}
    for name, kind in FLAGS.items():
        spec = defaults[name]
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=spec.default, help=spec.metadata["help"])
    p.add_argument("--lora-targets", nargs="+", metavar="NAME", default=defaults["lora_targets"].default_factory(),
                   help=defaults["lora_targets"].metadata["help"])
    for name in ("align_kinds", "eval_kinds"):
        p.add_argument("--" + name.replace("_", "-"), nargs="+", metavar="KIND",
                       choices=("single", "count", "relation"),
                       default=defaults[name].default_factory(), help=defaults[name].metadata["help"])
    p.add_argument("--extra-reward", dest="extra_rewards", action="append", default=None, metavar="ID[:WEIGHT]",
                   help=defaults["extra_rewards"].metadata["help"] + " Repeat for several; 'none' for no extra term. "
                        f"Default: {' '.join(defaults['extra_rewards'].default_factory()) or 'none'}.")
    p.add_argument("--polish-reward", dest="polish_rewards", action="append", default=None, metavar="ID[:WEIGHT]",
                   help=defaults["polish_rewards"].metadata["help"] + " Repeat for several.")
    p.add_argument("--sde-window", nargs=2, type=int, metavar=("START", "STOP"),
                   default=defaults["sde_window"].default, help=defaults["sde_window"].metadata["help"])
    p.add_argument("--objective-params", default=None, help="Objective hyper-parameters as JSON, e.g. "
                                                             "'{\"clip_range\": 0.2}'; default: the objective's "
                                                             "demo recipe (draft: '{\"k\": 0}').")
    p.add_argument("--set", dest="train_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=defaults["train_overrides"].metadata["help"] + " Repeat for several.")
    p.add_argument("--out", default="runs/demo", help="Run folder; report.html is written there.")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; 0 keeps torch's default. 1 by default: on a 2-core machine shared "
                        "with other jobs a tiny-UNet forward took 5.8 s with 2 threads (spinning at barriers).")


def run(args: argparse.Namespace) -> int:
    import torch

    from visalign.shapes.demo import DemoConfig, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        params = json.loads(args.objective_params) if args.objective_params is not None else None
        config = DemoConfig(**{name: getattr(args, name) for name in FLAGS}, objective_params=params,
                            sde_window=args.sde_window, lora_targets=args.lora_targets,
                            align_kinds=args.align_kinds, eval_kinds=args.eval_kinds,
                            train_overrides=args.train_overrides, output_dir=args.out,
                            polish_rewards=args.polish_rewards,
                            **({} if args.extra_rewards is None else
                               {"extra_rewards": [e for e in args.extra_rewards if e != "none"]}))
        result = run_demo(config)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as err:  # ConfigError is a ValueError
        print(f"visalign demo: {err}", file=sys.stderr)
        return 2
    for name, numbers in result.summary()["sets"].items():
        before, after = numbers["oracle_all"]
        print(f"{name}: oracle accuracy {100 * before:.1f}% → {100 * after:.1f}% "
              f"({100 * (after - before):+.1f} pts); proxy {numbers['proxy'][0]:.3f} → {numbers['proxy'][1]:.3f}")
    print(f"aligned LoRA (stock diffusers load_lora_weights): {result.lora_dir}\n"
          f"grade it on more prompts: visalign shapes eval --lora {result.lora_dir} --prompts 192")
    return 0
