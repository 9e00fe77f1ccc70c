"""Gradient accumulation (``optim.grad_accumulation``): the optimizer steps once per N objective micro-steps on
their MEAN gradient, leftovers are flushed at the end of each update, and N = 1 is the plain per-micro-step loop."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.conftest import FAST, TINY_RECIPE
from visalign.train.config import load_train_config
from visalign.train.distributed import Distributed, GradientSync, mean_over_processes
from visalign.train.logging import read_metrics

# One prompt × 2 samples (advantages ±1, both active), one inner epoch, one trained DDIM step. micro_batch=1 splits
# the two samples into two micro-steps; micro_batch=0 puts both into one. A small learning rate: AdamW's first step
# is lr·g/(|g|+eps), which turns float-rounding differences of a near-zero gradient element into differences of
# up to lr in the weights (1.5e-5 at lr = 1e-2, measured), and this test compares weights to 1e-6.
ONE_ITERATION = FAST + ["run.iterations=1", "eval.prompts=null", "objective.params.inner_epochs=1",
                        "optim.lr=1e-4"]


def _train(tiny_sd, out, *overrides: str):
    from visalign.train.loop import Trainer

    config = load_train_config(TINY_RECIPE, [*ONE_ITERATION, f"model.model={tiny_sd}", f"run.output_dir={out}",
                                             *overrides])
    trainer = Trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    trainer.run(resume=False)
    after = {n: p.detach().clone() for n, p in trainer.params.items()}
    return trainer, before, after, read_metrics(out)[-1]


def test_accumulating_two_micro_batches_equals_one_step_on_their_mean(tiny_sd, tmp_path):
    whole, before, one_step, whole_row = _train(tiny_sd, tmp_path / "whole", "objective.params.micro_batch=0")
    acc, _, accumulated, acc_row = _train(tiny_sd, tmp_path / "acc2", "objective.params.micro_batch=1",
                                          "optim.grad_accumulation=2")
    assert whole.optimizer_steps == 1 and acc.optimizer_steps == 1
    moved = [n for n in before if not torch.equal(before[n], one_step[n])]
    assert moved, "the reference step changed nothing; the comparison would be trivial"
    for name in one_step:
        torch.testing.assert_close(accumulated[name], one_step[name], atol=1e-6, rtol=0)
    # AdamW's first step is nearly scale-free, so the weights alone would not notice a missing 1/N: the logged
    # pre-clip norm is of the gradient the optimizer saw, and must be the mean's, not the sum's.
    assert acc_row["grad_norm"] == pytest.approx(whole_row["grad_norm"], rel=1e-5)
    assert acc_row["reward"] == whole_row["reward"]  # the same samples went in


def test_leftover_micro_steps_are_flushed_as_their_mean(tiny_sd, tmp_path):
    """N = 3 with only two micro-steps in the update: the flush at the end of ``update()`` steps on their mean, so
    the result is the N = 2 one and no gradient is left in ``.grad`` for the next iteration."""
    _, _, two, _ = _train(tiny_sd, tmp_path / "acc2", "objective.params.micro_batch=1", "optim.grad_accumulation=2")
    acc3, _, three, _ = _train(tiny_sd, tmp_path / "acc3", "objective.params.micro_batch=1",
                               "optim.grad_accumulation=3")
    assert acc3.optimizer_steps == 1
    assert all(p.grad is None for p in acc3.params.values()), "a gradient was carried past the update"
    for name in two:
        torch.testing.assert_close(three[name], two[name], atol=1e-6, rtol=0)


def test_without_accumulation_every_micro_step_steps(tiny_sd, tmp_path):
    _, _, accumulated, _ = _train(tiny_sd, tmp_path / "acc2", "objective.params.micro_batch=1",
                                  "optim.grad_accumulation=2")
    plain, _, stepped, row = _train(tiny_sd, tmp_path / "plain", "objective.params.micro_batch=1")
    assert plain.optimizer_steps == 2 and math.isfinite(row["grad_norm"])
    differs = [n for n in stepped if not torch.allclose(stepped[n], accumulated[n], atol=1e-6, rtol=0)]
    assert differs, "two optimizer steps gave the weights of one accumulated step: accumulation is not switched off"


# ---------------------------------------------------------------- GradientSync alone (no model)


def test_gradient_sync_steps_on_the_mean_and_reports_nan_while_accumulating():
    param = torch.nn.Parameter(torch.zeros(3))
    seen: list[torch.Tensor] = []

    def apply_step() -> float:
        seen.append(param.grad.clone())
        param.grad = None
        return float(len(seen))

    sync = GradientSync([param], Distributed(), accumulation=2, apply_step=apply_step)
    returned = []
    for grad in ([1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [10.0, 0.0, -10.0]):
        param.grad = (param.grad if param.grad is not None else torch.zeros(3)) + torch.tensor(grad)
        returned.append(sync.micro_step())
    sync.flush()
    sync.flush()  # nothing pending: no extra step
    assert math.isnan(returned[0]) and returned[1] == 1.0 and math.isnan(returned[2])
    assert [s.tolist() for s in seen] == [[2.0, 3.0, 4.0], [10.0, 0.0, -10.0]]
    assert sync.norms == [1.0, 2.0]


def test_gradient_sync_rejects_zero_accumulation():
    with pytest.raises(ValueError, match="grad_accumulation must be >= 1"):
        GradientSync([], Distributed(), accumulation=0, apply_step=lambda: 0.0)


def test_config_rejects_zero_accumulation():
    with pytest.raises(ValueError, match="optim.grad_accumulation must be >= 1"):
        load_train_config(TINY_RECIPE, ["model.model=tiny", "optim.grad_accumulation=0"])


def test_metrics_combine_over_processes():
    rows = [{"loss": 1.0, "nan_dropped": 1.0, "samples_per_second": 2.0, "clipfrac": float("nan")},
            {"loss": 3.0, "nan_dropped": 2.0, "samples_per_second": 3.0, "kl": 0.5, "clipfrac": 0.25}]
    out = mean_over_processes(rows)
    assert out == {"loss": 2.0, "nan_dropped": 3.0, "samples_per_second": 5.0, "clipfrac": 0.25, "kl": 0.5}
    assert math.isnan(mean_over_processes([{"x": float("nan")}, {"x": float("inf")}])["x"])
