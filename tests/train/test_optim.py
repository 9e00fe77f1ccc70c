"""Optimizer and schedule by name: diffusers' get_scheduler names drive the logged learning rate; a decaying schedule
without a length and 8-bit Adam without bitsandbytes are refused with what to do."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from tests.train.conftest import FAST, TINY_RECIPE
from visalign.train.config import OptimConfig, load_train_config
from visalign.train.loop import Trainer
from visalign.train.optim import build_optimizer, build_scheduler


def test_a_cosine_schedule_by_name_sets_the_logged_learning_rate(tiny_sd, tmp_path):
    trainer = Trainer(load_train_config(TINY_RECIPE, [
        *FAST, f"model.model={tiny_sd}", f"run.output_dir={tmp_path}", "eval.prompts=null", "run.iterations=4",
        "optim.lr=1e-3", "optim.lr_scheduler=cosine", "optim.lr_schedule_steps=8", "optim.warmup_steps=2"]))
    trainer.run(resume=False)
    steps = trainer.optimizer_steps
    assert steps >= 4
    expected = (0.5 * (1 + math.cos(math.pi * (steps - 2) / 6)) if steps < 8 else 0.0) * 1e-3
    assert trainer.history[-1]["lr"] == pytest.approx(expected)


def test_unknown_or_incomplete_schedules_and_missing_8bit_adam_are_refused():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr_schedule_steps"):
        build_scheduler(torch.optim.SGD(params, lr=0.1), OptimConfig(lr_scheduler="linear"))
    with pytest.raises(ValueError, match="use null or one of"):
        build_scheduler(torch.optim.SGD(params, lr=0.1), OptimConfig(lr_scheduler="exponential"))
    constant = build_scheduler(torch.optim.SGD(params, lr=0.1), OptimConfig(lr_scheduler="constant"))
    assert constant.get_last_lr() == [0.1]
    with pytest.raises(ValueError, match="use one of"):
        build_optimizer(params, OptimConfig(optimizer="lion"))
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="pip install bitsandbytes"):
            build_optimizer(params, OptimConfig(optimizer="adamw-8bit"))


def test_report_to_picks_the_trackers_and_refuses_unknown_ones(tiny_sd, tmp_path):
    from visalign.train.loop import TrainingError

    base = [*FAST, f"model.model={tiny_sd}", "eval.prompts=null", "run.iterations=1"]
    Trainer(load_train_config(TINY_RECIPE, [*base, f"run.output_dir={tmp_path / 'tb'}",
                                            "run.report_to=[tensorboard]"])).run(resume=False)
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    Trainer(load_train_config(TINY_RECIPE, [*base, f"run.output_dir={tmp_path / 'none'}",
                                            "run.report_to=[]", "run.tensorboard=true"])).run(resume=False)
    assert not (tmp_path / "none" / "tensorboard").exists()  # report_to wins over the switch
    with pytest.raises(TrainingError, match="the trackers are"):
        Trainer(load_train_config(TINY_RECIPE, [*base, f"run.output_dir={tmp_path / 'x'}", "run.report_to=[comet]"]))
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(TrainingError, match="pip install wandb"):
            Trainer(load_train_config(TINY_RECIPE, [*base, f"run.output_dir={tmp_path / 'w'}",
                                                    "run.report_to=[wandb]", "run.wandb_project=p"]))
