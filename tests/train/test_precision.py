"""Mixed precision (docs/architecture.md#scale): bf16 autocasts the denoiser while the trainable weights, their
gradients and the scorers stay float32; fp16 engages the loss scaler (scaled backward, unscaled step, overflow
skipped); launch settings the loop cannot honour are refused, never ignored."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.conftest import FAST, TINY_RECIPE
from visalign.train.config import load_train_config
from visalign.train.loop import Trainer
from visalign.train.precision import check_launch_settings, resolve_precision

BASE = [*FAST, "eval.prompts=null", "run.iterations=2", "run.checkpoint_every=2"]


def _trainer(model, out, *overrides):
    return Trainer(load_train_config(TINY_RECIPE, [*BASE, f"model.model={model}", f"run.output_dir={out}",
                                                   *overrides]))


def _record_denoiser_dtypes(trainer) -> list[tuple[bool, torch.dtype]]:
    seen: list[tuple[bool, torch.dtype]] = []

    def hook(module, args, output):
        sample = output[0] if isinstance(output, tuple) else output
        seen.append((torch.is_grad_enabled(), sample.dtype))

    trainer.adapter.denoiser.register_forward_hook(hook)
    return seen


def _record_steps(trainer) -> list[dict]:
    steps: list[dict] = []
    real = trainer.precision.step

    def step(optimizer, params, max_norm):
        steps.append({"param_dtypes": {p.dtype for p in params},
                      "grad_dtypes": {p.grad.dtype for p in params if p.grad is not None}})
        return real(optimizer, params, max_norm)

    trainer.precision.step = step
    return steps


def test_bf16_autocasts_the_denoiser_and_keeps_weights_grads_and_scorers_float32(tiny_sd, tmp_path):
    trainer = _trainer(tiny_sd, tmp_path / "bf16", "model.mixed_precision=bf16")
    seen, steps = _record_denoiser_dtypes(trainer), _record_steps(trainer)
    summary = trainer.run(resume=False)
    assert {dtype for _, dtype in seen} == {torch.bfloat16}  # rollouts (no grad) and training passes alike
    assert any(grad for grad, _ in seen) and any(not grad for grad, _ in seen)
    assert steps and all(s["param_dtypes"] == {torch.float32} == s["grad_dtypes"] for s in steps)
    assert all(s.dtype == torch.float32 for s in trainer.reward.scorers.values())
    assert math.isfinite(summary["train_reward_last"])
    assert all(math.isfinite(r["policy_loss"]) and math.isfinite(r["grad_norm"]) for r in trainer.history)
    assert trainer.precision.scaler is None  # bf16 needs no loss scaling

    plain = _trainer(tiny_sd, tmp_path / "fp32")
    seen = _record_denoiser_dtypes(plain)
    plain.run(resume=False)
    assert {dtype for _, dtype in seen} == {torch.float32}


def test_reward_dtype_reaches_the_scorers(tiny_sd, tmp_path):
    trainer = _trainer(tiny_sd, tmp_path, "reward.dtype=bfloat16")
    assert all(s.dtype == torch.bfloat16 for s in trainer.reward.scorers.values())


def test_fp16_scales_the_backward_unscales_the_step_and_skips_an_overflow(tiny_sd, tmp_path):
    trainer = _trainer(tiny_sd, tmp_path, "model.mixed_precision=fp16", "run.iterations=3")
    scaler = trainer.precision.scaler
    assert scaler is not None and scaler.get_scale() == 65536.0
    seen = _record_denoiser_dtypes(trainer)
    ratios: list[float] = []
    real_unscale = scaler.unscale_

    def unscale(optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        before = torch.stack([p.grad.norm() for p in params]).norm()
        real_unscale(optimizer)
        after = torch.stack([p.grad.norm() for p in params]).norm()
        ratios.append(float(before / after) / scaler.get_scale())

    scaler.unscale_ = unscale
    trainer.run(resume=False)
    assert {dtype for grad, dtype in seen if not grad} == {torch.float16}  # rollouts: the autocast output
    assert {dtype for grad, dtype in seen if grad} == {torch.float32}  # training: cast exactly, for the scaled grad
    assert ratios and all(r == pytest.approx(1.0, rel=1e-3) for r in ratios)  # gradients arrived × the scale
    assert all(math.isfinite(r["policy_loss"]) and math.isfinite(r["grad_norm"]) for r in trainer.history)
    assert all(r["loss_scale"] > 0 for r in trainer.history)

    # A scale so large that the float16 gradient overflows: the step is skipped and the scale backs off.
    overflow = _trainer(tiny_sd, tmp_path / "overflow", "model.mixed_precision=fp16", "run.iterations=1")
    overflow.precision.scaler._scale.fill_(2.0**40)
    before = {n: p.detach().clone() for n, p in overflow.params.items()}
    overflow.run(resume=False)
    assert all(torch.equal(before[n], p.detach()) for n, p in overflow.params.items()), "an inf step was taken"
    assert overflow.precision.skipped >= 1 and overflow.precision.scaler.get_scale() < 2.0**40
    assert overflow.history[-1]["overflow_skipped_steps"] >= 1


def test_a_float16_lora_recipe_gets_loss_scaling_and_a_float16_full_finetune_is_refused():
    assert resolve_precision(None, "float16", full_finetune=False, env={}) == "fp16"
    with pytest.raises(ValueError, match="master weights"):
        resolve_precision(None, "float16", full_finetune=True, env={})
    assert resolve_precision(None, "float32", full_finetune=True, env={"ACCELERATE_MIXED_PRECISION": "bf16"}) == "bf16"
    with pytest.raises(ValueError, match="accelerate launch asked for 'fp16'"):
        resolve_precision("bf16", "float32", full_finetune=False, env={"ACCELERATE_MIXED_PRECISION": "fp16"})


@pytest.mark.parametrize(("name", "value", "advice"), [
    ("ACCELERATE_MIXED_PRECISION", "fp8", "fp8 is not supported"),
    ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "optim.grad_accumulation"),
    ("ACCELERATE_GRADIENT_CLIPPING", "1.0", "optim.max_grad_norm"),
    ("ACCELERATE_USE_DEEPSPEED", "true", "--use_deepspeed"),
    ("ACCELERATE_DYNAMO_BACKEND", "inductor", "--dynamo_backend no"),
])
def test_launch_settings_the_loop_cannot_honour_are_refused(name, value, advice):
    check_launch_settings({name: "no" if name == "ACCELERATE_MIXED_PRECISION" else "",
                           "ACCELERATE_DYNAMO_BACKEND": "no"})  # the values a plain launch sets pass
    with pytest.raises(ValueError, match=advice) as err:
        check_launch_settings({name: value})
    assert name in str(err.value)


def test_the_trainer_refuses_an_ignored_flag_and_follows_the_launchers_precision(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(ValueError, match="ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        _trainer(tiny_sd, tmp_path)
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert _trainer(tiny_sd, tmp_path).precision.mode == "bf16"


def test_resuming_under_another_launch_precision_is_a_refused_change(tiny_sd, tmp_path, monkeypatch):
    from visalign.train.loop import TrainingError

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    _trainer(tiny_sd, tmp_path, "run.iterations=1").run(resume=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(TrainingError, match="mixed precision .*'bf16' → 'no'"):
        _trainer(tiny_sd, tmp_path).run(resume=True)
