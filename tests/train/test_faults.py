"""Faults (docs/architecture.md#faults): SIGTERM stops at a checkpoint with exit 0 and the resumed run ends where an
uninterrupted one does; a scorer failing every third call does not stop the run (retried, or its step skipped
and counted); a resume with a changed recipe is refused unless asked for; a full disk keeps the last checkpoint."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import time

import pytest
import torch

import visalign.train.checkpoint as ckpt
from tests.train.conftest import TINY_RECIPE
from tests.train.test_resume import STATEFUL, _env, _lora
from visalign.train.checkpoint import complete_checkpoints, latest_checkpoint
from visalign.train.config import load_train_config
from visalign.train.logging import read_metrics
from visalign.train.loop import Trainer, TrainingError

LONG = [*STATEFUL, "run.iterations=12", "run.checkpoint_every=5"]  # long enough to be signalled mid-run


def _cli(out, model):
    import sys

    return [sys.executable, "-m", "visalign", "train", str(TINY_RECIPE), *LONG, f"model.model={model}",
            f"run.output_dir={out}"]


def test_sigterm_mid_run_checkpoints_exits_0_and_the_resumed_run_equals_an_uninterrupted_one(tiny_sd, tmp_path):
    reference = tmp_path / "reference"  # uninterrupted, in this process (one thread, as the subprocesses)
    Trainer(load_train_config(TINY_RECIPE, [*LONG, f"model.model={tiny_sd}", f"run.output_dir={reference}"])).run()

    run = tmp_path / "stopped"
    proc = subprocess.Popen(_cli(run, tiny_sd), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, f"the run ended before its first iteration: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    assert not (run / "final").exists(), "the run finished before the signal; the test proves nothing"
    rows = read_metrics(run)
    stopped_at = rows[-1]["step"]
    assert stopped_at < 12 and latest_checkpoint(run).name == f"step-{stopped_at:06d}"  # the step in flight finished
    assert json.loads((run / "summary.json").read_text())["stopped_by"] == "SIGTERM"

    resumed = subprocess.run(_cli(run, tiny_sd), env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_weights, res_weights = _lora(reference), _lora(run)
    assert ref_weights.keys() == res_weights.keys() and len(ref_weights) > 0
    assert all(torch.equal(ref_weights[n], res_weights[n]) for n in ref_weights)
    assert [r["reward"] for r in read_metrics(run)] == [r["reward"] for r in read_metrics(reference)]


def _trainer(model, out, *overrides):
    return Trainer(load_train_config(TINY_RECIPE, [*STATEFUL, f"model.model={model}", f"run.output_dir={out}",
                                                   "reward.retry_backoff_s=0", *overrides]))


def test_a_scorer_failing_every_third_call_is_retried_or_its_step_skipped(tiny_sd, tmp_path):
    flaky = "reward.terms=[tests.train.scorers:FailsEveryThird]"
    skipping = _trainer(tiny_sd, tmp_path / "skip", flaky, "reward.retries=0", "run.iterations=7")
    summary = skipping.run(resume=False)
    assert summary["skipped_steps"] == 2 and summary["iterations"] == 7  # calls 3 and 6 failed: steps 3 and 6
    rows = read_metrics(tmp_path / "skip")
    assert [r["step"] for r in rows if r.get("step_skipped")] == [3, 6]
    assert all(r["reward"] is not None for r in rows if not r.get("step_skipped"))
    assert (tmp_path / "skip" / "final").is_dir()

    retrying = _trainer(tiny_sd, tmp_path / "retry", flaky, "reward.retries=1", "run.iterations=7")
    summary = retrying.run(resume=False)
    assert summary["skipped_steps"] == 0
    assert sum(r.get("score_retries", 0) for r in read_metrics(tmp_path / "retry")) == 3  # calls 3, 6 and 9 failed


def test_a_scorer_that_never_worked_or_keeps_failing_stops_the_run(tiny_sd, tmp_path):
    broken = _trainer(tiny_sd, tmp_path / "broken", "reward.terms=[tests.train.scorers:AlwaysFails]")
    with pytest.raises(RuntimeError, match="this scorer is broken"):
        broken.run(resume=False)
    flaky = _trainer(tiny_sd, tmp_path / "flaky", "reward.terms=[tests.train.scorers:FailsEveryThird]",
                     "reward.retries=0", "reward.max_consecutive_skips=0", "run.iterations=7")
    with pytest.raises(RuntimeError, match="1 steps in a row"):
        flaky.run(resume=False)


def test_resume_with_a_changed_recipe_is_refused_with_the_diff_unless_asked(tiny_sd, tmp_path):
    _trainer(tiny_sd, tmp_path, "run.iterations=2").run(resume=False)
    changed = _trainer(tiny_sd, tmp_path, "run.iterations=3", "optim.lr=1e-3", "sample.steps=3")
    with pytest.raises(TrainingError) as err:
        changed.run(resume=True)
    message = str(err.value)
    assert "optim.lr: 0.003 → 0.001" in message and "sample.steps: 2 → 3" in message
    assert "run.iterations" not in message  # a longer run is a resume, not a change
    longer = _trainer(tiny_sd, tmp_path, "run.iterations=3")
    assert longer.resume() and longer.iteration == 2
    forced = _trainer(tiny_sd, tmp_path, "run.iterations=3", "optim.lr=1e-3", "sample.steps=3")
    assert forced.run(resume=True, resume_changed=True)["iterations"] == 3


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_sd, tmp_path, monkeypatch):
    real_save = ckpt.save_file
    writes = {"n": 0}

    def full_after_first_checkpoint(tensors, filename, *args, **kwargs):
        writes["n"] += 1
        if writes["n"] > 3:  # the first checkpoint's three files fit; the disk is full from then on
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_after_first_checkpoint)
    trainer = _trainer(tiny_sd, tmp_path, "run.iterations=4")
    with pytest.raises(TrainingError, match="step-000004 .*No space left.*step-000002 is intact"):
        trainer.run(resume=False)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]
    monkeypatch.setattr(ckpt, "save_file", real_save)
    again = _trainer(tiny_sd, tmp_path, "run.iterations=4")
    assert again.run(resume=True)["iterations"] == 4
