"""``sample.sde_window``: the loop samples only the window with η and trains only there."""

from __future__ import annotations

import pytest
import torch

from tests.train.conftest import FAST, TINY_RECIPE
from visalign.config import ConfigError
from visalign.train.config import load_train_config
from visalign.train.loop import Trainer


def test_loop_trains_only_the_window_steps(tiny_sd, tmp_path):
    overrides = [*FAST, f"model.model={tiny_sd}", f"run.output_dir={tmp_path / 'run'}", "sample.steps=4",
                 "sample.sde_window=[0, 2]", "sample.train_fraction=1.0", "run.iterations=1"]
    trainer = Trainer(load_train_config(TINY_RECIPE, overrides))
    rollout = trainer.source.sample()
    assert torch.isfinite(rollout.log_probs).all(dim=0).tolist() == [True, True, False, False]
    assert trainer.source.train_steps(rollout) == [0, 1]  # the deterministic steps carry no density, so no update
    summary = trainer.run(resume=False)
    assert summary["iterations"] == 1


@pytest.mark.parametrize("window", ["[0, 5]", "[2, 2]", "[1]"])
def test_bad_window_names_the_key(window, tmp_path):
    with pytest.raises((ConfigError, ValueError), match="sde_window"):
        load_train_config(TINY_RECIPE, ["sample.steps=4", f"sample.sde_window={window}"])
