"""Generator adapter overhead on CPU: rollout-with-log-prob vs the stock diffusers call, and one training step vs a
bare UNet forward+backward over the same steps (targets: ≤ 10 % and ≤ 1.25×). Median of N runs in one process.

    python benchmarks/generators.py [--family sd|animatediff] [--runs 5] [--steps 8] [--batch 2]

The two sides of each comparison run *interleaved* (ours, theirs, ours, theirs, ...) and the ratio reported is the
median of the per-pair ratios: on a shared machine whose load drifts, timing all of one side and then all of the
other measures the drift, not the adapter (that is what gave the earlier 1.35–1.61× training-step ratios; a profile
shows the same UNet kernels, call for call, on both sides). The last line times the adapter-only arithmetic (DDIM
step + Gaussian log-prob, forward and backward, from a fixed prediction) to bound what the adapter adds per step.
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


def paired_medians(ours, theirs, runs: int) -> tuple[float, float, float]:
    """Median seconds of ``ours`` and ``theirs`` and the median per-pair ratio, over ``runs`` interleaved pairs."""
    ours(), theirs()  # warm-up: first calls allocate and pick kernels
    t_ours, t_theirs = [], []
    for _ in range(runs):
        for fn, times in ((ours, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(t_ours, t_theirs, strict=True)]
    return statistics.median(t_ours), statistics.median(t_theirs), statistics.median(ratios)


def adapter_step_seconds(gen, rollout, runs: int) -> float:
    """Median seconds of the adapter-only part of one training step: DDIM step + log-prob, forward and backward."""
    from visalign.generators.ddim_logprob import ddim_step_with_logprob

    scheduler = gen.pipeline.scheduler
    pred = torch.randn_like(rollout.latents[:, 0], dtype=torch.float32).requires_grad_(True)

    def step():
        out = ddim_step_with_logprob(pred, rollout.timesteps[0], rollout.schedule["prev_timesteps"][0],
                                     rollout.latents[:, 0], scheduler.alphas_cumprod, scheduler.final_alpha_cumprod,
                                     eta=1.0, prev_sample=rollout.latents[:, 1])
        out.log_prob_mean.sum().backward()

    step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
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

    t_ours, t_stock, r_rollout = paired_medians(ours, theirs, args.runs)

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

    t_train, t_bare, r_train = paired_medians(train_step, bare_step, args.runs)
    t_adapter = adapter_step_seconds(gen, rollout, 50)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"family={args.family} batch={args.batch} steps={steps} guidance={guidance} runs={args.runs} (interleaved)")
    print(f"| rollout with log-probs | {t_ours:.3f} s | stock pipeline call | {t_stock:.3f} s | "
          f"overhead {100 * (r_rollout - 1):+.1f} % |")
    print(f"| training step (all steps' log-probs + backward) | {t_train:.3f} s | bare denoiser fwd+bwd | "
          f"{t_bare:.3f} s | ratio {r_train:.3f}x |")
    print(f"| adapter-only DDIM step + log-prob fwd+bwd, per step | {1e3 * t_adapter:.2f} ms | "
          f"bare fwd+bwd per step | {1e3 * t_bare / steps:.1f} ms | {100 * t_adapter * steps / t_bare:.2f} % |")


if __name__ == "__main__":
    main()
