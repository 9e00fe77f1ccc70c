"""Objective state in checkpoints: DRAGON's frozen reference of a full fine-tune survives a resume."""

from __future__ import annotations

import torch

from tests.train.conftest import FAST, TINY_RECIPE
from visalign.train.config import load_train_config
from visalign.train.loop import Trainer

# Full fine-tune (no LoRA to switch off), so reference='base' is a frozen copy of the weights at the first update.
DRAGON = FAST + ["model.lora_rank=0", "objective.name=dragon", "objective.params={reference: base}",
                 "sample.images_per_prompt=4", "eval.prompts=null", "optim.lr=1e-2", "run.checkpoint_every=1",
                 "run.seed=3"]


def _trainer(model, out, iterations: int) -> Trainer:
    return Trainer(load_train_config(TINY_RECIPE, DRAGON + [f"model.model={model}", f"run.output_dir={out}",
                                                     f"run.iterations={iterations}"]))


def test_dragon_frozen_reference_survives_resume(tiny_sd, tmp_path):
    whole = _trainer(tiny_sd, tmp_path / "whole", 3)
    whole.run(resume=False)

    first = _trainer(tiny_sd, tmp_path / "split", 1)
    first.run(resume=False)
    frozen = {k: t.clone() for k, t in first.objective.state_tensors().items()}
    assert frozen, "DRAGON made no frozen reference on a full fine-tune"
    resumed = _trainer(tiny_sd, tmp_path / "split", 3)
    assert resumed.resume()
    restored = resumed.objective.state_tensors()
    assert restored.keys() == frozen.keys() and all(torch.equal(restored[k], frozen[k]) for k in frozen)
    # The restored reference is the base weights, not the resumed (already trained) ones.
    moved = [n for n, p in resumed.params.items() if not torch.equal(p.detach(), restored[f"frozen.{n}"])]
    assert moved
    resumed.run(resume=True)
    for name, p in whole.params.items():
        assert torch.equal(p.detach(), resumed.params[name].detach()), name
