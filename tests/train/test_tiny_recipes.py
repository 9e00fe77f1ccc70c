"""The shipped tiny recipes of every objective run through the real loop: one model, two iterations each, and the
LoRA moves (the loop ↔ objective contract: UpdateBatch in, optimizer steps through ctx, scalar metrics out)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.conftest import FAST, REPO
from visalign.objectives.base import OBJECTIVES
from visalign.train.config import load_train_config
from visalign.train.logging import read_metrics


@pytest.mark.parametrize("objective", ["prdp", "dragon", "raft", "draft"])
def test_tiny_recipe_trains(objective, tiny_sd, tmp_path):
    from safetensors.torch import load_file

    from visalign.train.loop import Trainer

    try:
        OBJECTIVES.get(objective)
    except ImportError as err:
        pytest.skip(f"objective {objective!r} is not importable yet ({err})")
    out = tmp_path / "run"
    # 4 samples of one prompt: DRAGON's set-level FD credit needs at least 3 samples in the batch.
    config = load_train_config(REPO / "pipelines" / f"tiny-sd-{objective}.yaml", [
        *FAST, "sample.images_per_prompt=4", f"model.model={tiny_sd}", f"run.output_dir={out}",
        "run.iterations=2", "eval.prompts=null"])
    trainer = Trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    trainer.run()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["reward"]) for r in rows)
    moved = [n for n, p in trainer.params.items() if not torch.equal(p.detach(), before[n])]
    assert moved, f"{objective}: no trainable parameter changed in two iterations"
    saved = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    assert len(saved) == len(trainer.params)
