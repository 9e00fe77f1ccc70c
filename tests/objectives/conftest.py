"""Shared fixtures of the objective tests: one tiny SD pipeline whose images vary in brightness, and a Trainer factory.

The random tiny SD pipeline (tests/generators/conftest.py:build_sd) decodes to nearly uniform grey: the per-image
brightness std is ~5e-4, too small for any rule reward to separate samples. Two changes to its VAE decoder give a
brightness reward a signal the objectives can climb within tens of CPU iterations:

- ``norm_num_groups=1``: with 32 groups over the decoder's 32 channels every GroupNorm normalises each channel on its
  own, so a latent's channel means never reach the pixels (they explain 8% of the brightness variance of 32-px
  samples). One group normalises all channels together and keeps their relative means: 60% explained.
- ``conv_out`` weight and bias ×10 spread the pixels (clamped to [0, 1] by the decoder's output conversion).

Per-image brightness std of 3-step η = 1 samples (64 of them): 0.007 with the ×10 alone, 0.016 with both at 32 px,
0.066 at 8 px (``model.resolution=8``: 4×4 latents, so a channel mean is 1/16 of a channel's variance, not 1/256).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.generators.conftest import build_sd

PROMPTS = ["a red cube", "two blue circles"]


def build_bright_sd(folder: Path) -> Path:
    """Tiny SD (32-px images by default) whose VAE decoder passes brightness through (see the module docstring);
    saved as a diffusers folder, so tests load it through ``from_pretrained``."""
    import shutil

    from diffusers import AutoencoderKL

    if (folder / "vae" / ".bright").is_file():
        return folder
    build_sd(folder)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=1, sample_size=32)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(10.0)
        vae.decoder.conv_out.bias.mul_(10.0)
    shutil.rmtree(folder / "vae")
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    (folder / "vae" / ".bright").write_text("norm_num_groups=1, conv_out x10\n")
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run these tests on one intra-op thread. On a shared, oversubscribed CPU two OpenMP threads spin-wait for each
    other: a tiny-SD training iteration measured 0.5 s of CPU with one thread and ~20 s with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bright_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny SD pipeline with a brightness signal, written once per session."""
    return build_bright_sd(tmp_path_factory.mktemp("objectives") / "sd-bright")


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("objective-prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def train_overrides(model: Path, prompts: Path, output_dir: Path, objective: str, *, iterations: int, seed: int = 0,
                    lr: float = 1e-3, params: dict | None = None) -> list[str]:
    """``key=value`` overrides of the CPU acceptance runs: full fine-tune, 2 prompts × 4 images, 3 DDIM steps, no CFG,
    brightness reward; no checkpoints before the end, no progress bar, no TensorBoard."""
    overrides = [f"model.model={model}", "model.lora_rank=0", f"sample.prompts={prompts}", "sample.prompts_per_step=2",
                 "sample.images_per_prompt=4", "sample.steps=3", "sample.guidance=1.0", "sample.eta=1.0",
                 "reward.terms=[brightness]", f"objective.name={objective}", f"optim.lr={lr}",
                 f"run.output_dir={output_dir}", f"run.iterations={iterations}", f"run.seed={seed}",
                 f"run.checkpoint_every={iterations}", "run.keep_last=1", "run.tensorboard=false",
                 "run.progress=false"]
    for key, value in (params or {}).items():
        overrides.append(f"objective.params.{key}={value}")
    return overrides


def make_batch(rollout, rewards: torch.Tensor, *, keep: torch.Tensor | None = None,
               weights: torch.Tensor | None = None):
    """An :class:`UpdateBatch` as the loop builds it: groups by prompt, flow_grpo advantages, ones as weights."""
    from visalign.objectives.base import UpdateBatch
    from visalign.rewards.advantages import AdvantageConfig, group_advantages, group_index

    groups = group_index(rollout.prompts, len(rollout))
    keep = torch.ones(len(rollout), dtype=torch.bool) if keep is None else keep
    weights = torch.ones(len(rollout)) if weights is None else weights
    advantages = group_advantages(rewards, rollout.prompts, AdvantageConfig()).advantages
    return UpdateBatch(rollout=rollout, rewards=rewards.float(), per_scorer={"reward": rewards.float()},
                       advantages=torch.where(keep, advantages, torch.zeros_like(advantages)), group_ids=groups,
                       weights=weights, keep=keep)


class GradRecorder:
    """``ctx.optimizer_step`` for unit tests: records each step's gradients (by parameter name), then zeroes them.

    ``perturb`` (optional) is called after recording, standing in for the parameter change an optimizer makes, so a
    later inner step runs at θ ≠ θ_old. The loop's real optimizer step is covered by the acceptance runs.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], perturb=None) -> None:
        self.named_params = named_params
        self.perturb = perturb
        self.grads: list[dict[str, torch.Tensor]] = []

    def __call__(self) -> float:
        grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                 for n, p in self.named_params.items()}
        self.grads.append(grads)
        for p in self.named_params.values():
            p.grad = None
        if self.perturb is not None:
            self.perturb()
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def make_context(adapter, steps, recorder: GradRecorder, seed: int = 0, scorers: dict | None = None):
    """The engine's :class:`UpdateContext` with a :class:`GradRecorder` as the optimizer step; ``scorers`` are the
    objective's own scorers (``Objective.scorer_specs``), built by the caller as the engine would."""
    from visalign.objectives.base import UpdateContext

    return UpdateContext(adapter, list(steps), recorder, torch.Generator().manual_seed(seed), scorers=scorers or {})
