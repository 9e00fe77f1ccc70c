"""Generator adapter overhead on CPU: rollout-with-log-prob vs the stock diffusers call, and one training step vs a
bare UNet forward+backward over the same steps (targets: ≤ 10 % and ≤ 1.25×). Median of N runs in one process.

    python benchmarks/generators.py [--family sd|animatediff] [--runs 5] [--steps 8] [--batch 2]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default="sd", choices=["sd", "animatediff"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import diffusers

    from tests.generators.conftest import build_animatediff, build_sd
    from visalign.generators import LoraSpec, load_generator

    folder = Path(tempfile.mkdtemp()) / args.family
    path = build_sd(folder) if args.family == "sd" else build_animatediff(folder)
    video = {"num_frames": 4} if args.family == "animatediff" else {}
    prompts = ["a red cube", "two blue circles", "a cat", "a dog"][: args.batch]
    gen = load_generator(path)
    stock = getattr(diffusers, gen.pipeline_classes[0]).from_pretrained(path)
    stock.set_progress_bar_config(disable=True)
    guidance, steps = 5.0, args.steps

    def ours():
        gen.rollout(prompts, steps=steps, guidance=guidance, eta=1.0, seed=0, **video)

    def theirs():
        stock(prompts, num_inference_steps=steps, guidance_scale=guidance, eta=1.0, output_type="pt",
              generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))], **video)

    t_ours, t_stock = median_seconds(ours, args.runs), median_seconds(theirs, args.runs)

    gen.add_lora(LoraSpec(rank=4, alpha=4.0))
    rollout = gen.rollout(prompts, steps=steps, guidance=guidance, eta=1.0, seed=0, **video)

    def train_step():
        for i in range(steps):  # per-step backward, as objectives do, so memory holds one step's graph
            gen.step_log_prob(rollout, [i]).sum().backward()

    def bare_step():
        plan = rollout.plan
        for i in range(steps):
            with torch.enable_grad():
                gen.predict(plan, rollout.latents[:, i], i).float().square().mean().backward()

    t_train, t_bare = median_seconds(train_step, args.runs), median_seconds(bare_step, args.runs)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print(f"family={args.family} batch={args.batch} steps={steps} guidance={guidance} runs={args.runs}")
    print(f"| rollout with log-probs | {t_ours:.3f} s | stock pipeline call | {t_stock:.3f} s | "
          f"overhead {100 * (t_ours / t_stock - 1):+.1f} % |")
    print(f"| training step (all steps' log-probs + backward) | {t_train:.3f} s | bare UNet fwd+bwd | "
          f"{t_bare:.3f} s | "
          f"ratio {t_train / t_bare:.3f}x |")


if __name__ == "__main__":
    main()
