"""The loop's path-KL diagnostic on a scheduler whose last DDIM step is deterministic (``set_alpha_to_one``)."""

from __future__ import annotations

import math

import torch

from tests.train.conftest import REPO
from visalign.train.config import load_train_config
from visalign.train.loop import Trainer


def test_path_kl_is_finite_when_the_last_step_has_no_noise(tmp_path):
    # The shipped shapes-world SD saves a DDIMScheduler with set_alpha_to_one: its last step lands on ᾱ = 1 with
    # std 0, so that step has no density. The estimate must skip it (it used to return NaN there).
    overrides = [f"model.model={REPO / 'assets/shapes/t2i'}", f"run.output_dir={tmp_path / 'run'}",
                 "sample.prompts_per_step=1", "sample.images_per_prompt=2", "sample.steps=3", "optim.lr=1e-2",
                 "sample.train_fraction=0.67", "run.iterations=1"]
    trainer = Trainer(load_train_config(REPO / "pipelines/shapes-grpo-oracle.yaml", overrides))
    rollout = trainer.source.sample()
    assert not torch.isfinite(rollout.log_probs[:, -1]).any()  # the case under test is really exercised
    assert trainer.source.path_kl(rollout) == 0.0  # LoRA B starts at 0: the policy is the reference
    with torch.no_grad():
        for p in trainer.params.values():
            p.add_(0.05 * torch.randn_like(p))
    kl = trainer.source.path_kl(rollout)
    assert math.isfinite(kl) and kl > 0
