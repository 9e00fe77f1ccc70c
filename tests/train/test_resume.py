"""Checkpoints: a run SIGKILLed after a checkpoint and resumed ends with the same LoRA weights, bit for bit, as an
uninterrupted run; a crash mid-write never leaves a checkpoint that resume would pick up half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import visalign.train.checkpoint as ckpt
from tests.train.conftest import FAST, REPO, TINY_RECIPE
from visalign.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

# Everything that carries state across iterations is switched on, so a resume that forgets one of them diverges:
# EMA, a running-zscore reward transform, LR warm-up, a random subset of trained steps, shuffled micro-batches
# over two inner epochs (objective RNG) and the prompt stream (2 of 8 prompts per step, so it wraps an epoch).
STATEFUL = FAST + ["sample.prompts_per_step=2", "sample.train_steps_per_update=1", "optim.ema_decay=0.9",
                   "optim.warmup_steps=3", "objective.params.inner_epochs=2", "objective.params.micro_batch=2",
                   "reward.terms=[{scorer: brightness, transform: running-zscore}]", "eval.prompts=null",
                   "run.iterations=5", "run.checkpoint_every=2", "run.keep_last=2", "run.seed=5"]


def _cli(out: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "visalign", "train", str(TINY_RECIPE), *STATEFUL, f"model.model={model}",
            f"run.output_dir={out}"]


def _env() -> dict[str, str]:
    # One thread in every run: CPU kernels may reduce in a different order with another thread count, and on a
    # loaded machine idle OpenMP workers spin and burn CPU.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO)}


def _lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))


def test_sigkill_after_checkpoint_then_resume_is_bit_exact(tiny_sd, tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(_cli(reference, tiny_sd), env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(run, tiny_sd), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while latest_checkpoint(run) is None:
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists(), "the run finished before it was killed; the test proves nothing"
    killed_at = int(latest_checkpoint(run).name.split("-")[1])
    assert killed_at < 5

    # What a crash can leave behind: a temp folder killed after its COMPLETE marker but before the rename, and a
    # newer step folder that never got its marker. Both hold garbage that would break the result if loaded.
    junk = {name: torch.full((2,), 7.0) for name in load_file(str(latest_checkpoint(run) / "weights.safetensors"))}
    for folder, marker in ((f"step-{killed_at + 1:06d}.tmp-1", True), (f"step-{killed_at + 1:06d}", False)):
        path = run / "checkpoints" / folder
        path.mkdir()
        save_file(junk, str(path / "weights.safetensors"))
        if marker:
            (path / "COMPLETE").write_text("1")

    resumed = subprocess.run(_cli(run, tiny_sd), env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ref_weights, res_weights = _lora(reference), _lora(run)
    assert ref_weights.keys() == res_weights.keys() and len(ref_weights) > 0
    for name in ref_weights:
        assert torch.equal(ref_weights[name], res_weights[name]), f"{name} differs after resume"
    # The LoRA moved (else equality is trivial): B ("up") matrices start at zero under peft's gaussian init.
    ups = [n for n in ref_weights if "lora_B" in n or "lora.up" in n]
    assert ups and any(ref_weights[n].abs().sum() > 0 for n in ups)

    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    res_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in res_rows] == [1, 2, 3, 4, 5], "rows after the checkpoint must not repeat"
    assert [r["reward"] for r in res_rows] == [r["reward"] for r in ref_rows]
    assert [r["lr"] for r in res_rows] == [r["lr"] for r in ref_rows]
    assert json.loads((run / "summary.json").read_text())["train_reward_first"] == pytest.approx(
        json.loads((reference / "summary.json").read_text())["train_reward_first"])
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["step-000004", "step-000005"], f"junk and old checkpoints are cleaned up: {left}"


# ---------------------------------------------------------------- the checkpoint files alone (no model)


def _trained_optimizer(steps: int = 3) -> tuple[dict[str, torch.nn.Parameter], torch.optim.AdamW]:
    torch.manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.randn(4, 3)), "b": torch.nn.Parameter(torch.randn(5))}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        sum((p**2).sum() for p in params.values()).backward()
        opt.step()
    return params, opt


def _save(run: Path, step: int, params: dict, opt: torch.optim.Optimizer, keep_last: int = 3) -> Path:
    return save_checkpoint(run, step, params=params, optimizer=opt, extra_tensors={"rng": torch.get_rng_state()},
                           state={"iteration": step}, keep_last=keep_last)


def test_adamw_state_round_trips_exactly_through_safetensors(tmp_path):
    params, opt = _trained_optimizer()
    path = _save(tmp_path, 3, params, opt)
    loaded_params, opt_state, extra, state = load_checkpoint(path)
    assert state["iteration"] == 3 and torch.equal(extra["rng"], torch.get_rng_state())
    clone = {n: torch.nn.Parameter(t.clone()) for n, t in loaded_params.items()}
    opt2 = torch.optim.AdamW(clone.values(), lr=0.5)  # wrong hyper-parameters: the checkpoint must restore them
    opt2.load_state_dict(opt_state)
    assert opt2.param_groups[0]["lr"] == 1e-2 and tuple(opt2.param_groups[0]["betas"]) == (0.8, 0.95)
    step = opt2.state[clone["a"]]["step"]
    assert isinstance(step, torch.Tensor) and float(step) == 3.0  # AdamW's step count stays a tensor
    for o, ps in ((opt, params), (opt2, clone)):  # one more step each: identical results
        o.zero_grad()
        sum((p**3).sum() for p in ps.values()).backward()
        o.step()
    for name in params:
        assert torch.equal(params[name], clone[name])


def test_failure_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    params, opt = _trained_optimizer()
    _save(tmp_path, 2, params, opt)
    real_save = ckpt.save_file
    calls = {"n": 0}

    def dies_on_second_file(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", dies_on_second_file)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, 4, params, opt)
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"], "the torn folder is gone"
    loaded, _, _, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["iteration"] == 2 and all(torch.equal(loaded[n], params[n].detach()) for n in params)
    monkeypatch.setattr(ckpt, "save_file", real_save)
    _save(tmp_path, 6, params, opt)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000006"]


def test_only_complete_step_folders_count(tmp_path):
    params, opt = _trained_optimizer()
    _save(tmp_path, 2, params, opt)
    root = tmp_path / "checkpoints"
    (root / "step-000009.tmp-77").mkdir()
    (root / "step-000009.tmp-77" / "COMPLETE").write_text("9")  # killed between the marker and the rename
    (root / ".trash-step-000001-5").mkdir()  # killed while pruning
    (root / "step-000008").mkdir()  # no marker
    (root / "notes.txt").write_text("x")
    assert latest_checkpoint(tmp_path).name == "step-000002"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(root / "step-000008")
    _save(tmp_path, 3, params, opt)  # the next save sweeps every leftover of a crash, and only those
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-000002", "step-000003"]


def test_keep_last_prunes_oldest(tmp_path):
    params, opt = _trained_optimizer()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, params, opt, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
