"""Time per training iteration of ``visalign train``, split into its stages: sampling (rollout with per-step
log-probs), scoring (the RewardSpec) and update (the objective's recomputed log-probs, backward, optimizer step).

    python benchmarks/train_iteration.py [--runs 5] [--objective grpo] [--prompts-per-step 2] [--images 4] [--steps 4]
    python benchmarks/train_iteration.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda \
        --dtype bfloat16 --steps 20 --images 8           # the GPU row (needs the weights locally)

Runs the real :class:`visalign.train.loop.Trainer` stages on the tiny random-init SD of
``tests/generators/conftest.py`` (32 px, UNet (32, 64), LoRA r = 4, CPU) with the ``pipelines/tiny-sd-grpo.yaml``
recipe; one warm-up iteration, then the median of ``--runs`` iterations per stage. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def time_stages(trainer, runs: int) -> dict[str, list[float]]:
    """Seconds of each stage over ``runs`` iterations (after one warm-up iteration)."""
    times: dict[str, list[float]] = {"sample": [], "score": [], "update": [], "iteration": []}
    for i in range(runs + 1):
        t0 = time.perf_counter()
        rollout = trainer.source.sample()
        t1 = time.perf_counter()
        scored = trainer.source.score(rollout)
        t2 = time.perf_counter()
        trainer.update(scored)
        t3 = time.perf_counter()
        trainer.iteration += 1
        if i == 0:
            continue  # warm-up: first calls allocate and pick kernels
        for key, value in (("sample", t1 - t0), ("score", t2 - t1), ("update", t3 - t2), ("iteration", t3 - t0)):
            times[key].append(value)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--objective", default="grpo")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--images", type=int, default=4, help="images per prompt (the group size)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per rollout")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="", help="an SD pipeline folder or hub id; default: the tiny random one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--resolution", type=int, default=0, help="pixels; 0 = the model's own")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from tests.generators.conftest import build_sd
    from visalign.table import format_table
    from visalign.train.config import load_train_config
    from visalign.train.loop import Trainer

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model = args.model or build_sd(work / "sd")
    config = load_train_config(REPO / "pipelines" / "tiny-sd-grpo.yaml", [
        f"model.model={model}", f"run.output_dir={work / 'run'}", f"objective.name={args.objective}",
        f"sample.prompts_per_step={args.prompts_per_step}", f"sample.images_per_prompt={args.images}",
        f"sample.steps={args.steps}", "eval.prompts=null", "run.tensorboard=false", "run.progress=false",
        f"model.device={args.device}", f"model.dtype={args.dtype}",
        f"model.resolution={args.resolution or 'null'}"])
    trainer = Trainer(config)
    times = time_stages(trainer, args.runs)
    batch = args.prompts_per_step * args.images
    total = statistics.median(times["iteration"])
    rows = [(stage, f"{statistics.median(times[stage]):.3f} s", f"{min(times[stage]):.3f} s",
             f"{100 * statistics.median(times[stage]) / total:.0f} %") for stage in ("sample", "score", "update")]
    rows.append(("whole iteration", f"{total:.3f} s", f"{min(times['iteration']):.3f} s",
                 f"{batch / total:.2f} samples/s"))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    print(f"# {where}, {args.threads} thread(s), torch {torch.__version__}; batch {batch} "
          f"({args.prompts_per_step} prompts × {args.images}), {args.steps} DDIM steps, {args.dtype}, LoRA r=4, "
          f"objective {args.objective}, reward brightness; median of {args.runs} iterations")
    print(format_table(["stage", "median", "min", "share"], rows, markdown=True))


if __name__ == "__main__":
    main()
