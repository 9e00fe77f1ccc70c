"""Data-parallel training for real: two CPU processes (gloo) under ``accelerate launch`` run the tiny-SD GRPO recipe.

Checks that gradients are synchronised (both processes end with the same weights although they trained on
different prompts and noise), that only the main process writes the run folder, and that the logged reward is the
mean over both processes' samples.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import FAST, REPO, TINY_RECIPE
from visalign.train.checkpoint import latest_checkpoint, load_checkpoint
from visalign.train.logging import read_metrics

WORKER = REPO / "tests" / "train" / "ddp_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(records, *args: str) -> None:
    """Run the worker in two processes under ``accelerate launch``; fail with the workers' error lines."""
    # --multi_gpu is accelerate's name for its torchrun launcher; with model.device=cpu the processes use gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*launch, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if "Error" in line]  # the cause, not torchrun's trailer
    assert done.returncode == 0, "\n".join(errors[-4:]) or done.stderr[-3000:]


def test_two_processes_stay_in_sync_and_only_main_writes(tiny_sd, tmp_path):
    pytest.importorskip("accelerate")
    run, records = tmp_path / "run", tmp_path / "records"
    records.mkdir()
    # Two prompt groups per process: each step the processes draw consecutive, distinct prompts of one shared stream.
    overrides = [*FAST, "sample.prompts_per_step=2", f"model.model={tiny_sd}", f"run.output_dir={run}",
                 "run.iterations=2", "run.checkpoint_every=1", "run.keep_last=1", "eval.prompts=null",
                 "objective.params.micro_batch=1"]
    _launch(records, str(records), str(TINY_RECIPE), *overrides)

    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2], "the processes did not form one group of two"
    # Different prompts and noise on each process (else identical weights would prove nothing).
    for it in range(2):
        assert not set(ranks[0]["iterations"][it]["prompts"]) & set(ranks[1]["iterations"][it]["prompts"])
        assert ranks[0]["iterations"][it]["rewards"] != ranks[1]["iterations"][it]["rewards"]

    w0, w1 = load_file(str(records / "rank0.safetensors")), load_file(str(records / "rank1.safetensors"))
    assert w0.keys() == w1.keys() and len(w0) > 0
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"{name} differs between the processes: gradients not averaged"
    assert any(w0[n].abs().sum() > 0 for n in w0 if "lora_B" in n), "the LoRA did not move"

    # One writer: one row per iteration, one final folder, one checkpoint with both processes' RNG states.
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "final", "metrics.jsonl",
                                                      "summary.json"]
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    for row, *local in zip(rows, ranks[0]["iterations"], ranks[1]["iterations"], strict=True):
        both = [x for part in local for x in part["rewards"]]
        assert row["reward"] == pytest.approx(sum(both) / len(both), abs=1e-6)
        assert row["reward"] != pytest.approx(sum(local[0]["rewards"]) / len(local[0]["rewards"]), abs=1e-9)
        assert row["nan_dropped"] == 0.0
    _, _, extra, state = load_checkpoint(latest_checkpoint(run))
    assert state["num_processes"] == 2 and len(state["reward_other_ranks"]) == 1
    assert "torch_rng" in extra and "torch_rng.rank1" in extra


@pytest.mark.slow  # three 2-process launches: about 90 s of CPU
def test_two_process_resume_replays_the_uninterrupted_run(tiny_sd, tmp_path):
    """Each process restores its own RNG and running-zscore state: a 2-process run stopped after its iteration-2
    checkpoint and resumed to 3 iterations ends with the weights of an uninterrupted 3-iteration run."""
    pytest.importorskip("accelerate")
    common = [*FAST, f"model.model={tiny_sd}", "eval.prompts=null", "run.checkpoint_every=1", "run.seed=3",
              "reward.terms=[{scorer: brightness, transform: running-zscore}]", "sample.train_steps_per_update=1"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _launch(tmp_path / "a", str(tmp_path / "a"), str(TINY_RECIPE), *common, "run.iterations=3",
            f"run.output_dir={tmp_path / 'run-a'}")
    _launch(tmp_path / "b", str(tmp_path / "b"), str(TINY_RECIPE), *common, "run.iterations=2",
            f"run.output_dir={tmp_path / 'run-b'}")
    _launch(tmp_path / "b", "--resume", str(tmp_path / "b"), str(TINY_RECIPE), *common, "run.iterations=3",
            f"run.output_dir={tmp_path / 'run-b'}")
    for rank in (0, 1):
        a = load_file(str(tmp_path / "a" / f"rank{rank}.safetensors"))
        b = load_file(str(tmp_path / "b" / f"rank{rank}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), f"rank {rank} diverged"
    ref, res = read_metrics(tmp_path / "run-a"), read_metrics(tmp_path / "run-b")
    assert [r["step"] for r in res] == [1, 2, 3] and [r["reward"] for r in res] == [r["reward"] for r in ref]
