"""FSDP2 full fine-tunes for real: two CPU processes (gloo) under ``accelerate launch`` with
``pipelines/accelerate/cpu-2proc-fsdp2.yaml`` run the tiny-SD GRPO recipe with ``model.lora_rank=0``
(docs/architecture.md#fsdp).

The prompt table makes the processes' micro-batch counts differ: ``BrightnessOddNan`` abstains on the second
sample of a ``skip_odd`` prompt, which leaves that group one sample and no advantage. With ``run.seed=0``, process
1 draws only ``skip_odd`` prompts in iteration 1, so it has no micro-batch of its own there and runs padding passes
only (FSDP's collectives would hang, or mix up blocks, if it ran fewer denoiser calls than process 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import FAST, REPO, TINY_RECIPE
from tests.train.test_distributed import _free_port, _launch
from visalign.train.checkpoint import latest_checkpoint, load_checkpoint
from visalign.train.logging import read_metrics

WORKER = REPO / "tests" / "train" / "ddp_worker.py"
FSDP_CONFIG = REPO / "pipelines" / "accelerate" / "cpu-2proc-fsdp2.yaml"
LR = 1e-4
PROMPTS = [("a red circle", True), ("a blue square", False), ("a green star", True), ("a pink heart", True)]


def _launch_fsdp(*args: str) -> None:
    """The worker in two processes under the FSDP2 launch config; fail with the workers' error lines."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
              "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*launch, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if "Error" in line]
    assert done.returncode == 0, "\n".join(errors[-4:]) or done.stderr[-3000:]


def _overrides(tiny_sd, tmp_path, run: str, iterations: int, *extra: str) -> list[str]:
    table = tmp_path / "prompts.jsonl"
    table.write_text("".join(json.dumps({"prompt": p, "skip_odd": s}) + "\n" for p, s in PROMPTS))
    return [*FAST, "sample.prompts_per_step=2", f"sample.prompts={table}", f"model.model={tiny_sd}",
            "model.lora_rank=0", "reward.terms=['tests.train.scorers:BrightnessOddNan']", "eval.prompts=null",
            "objective.params.micro_batch=1", f"optim.lr={LR}", "run.seed=0", "run.checkpoint_every=1",
            f"run.iterations={iterations}", f"run.output_dir={tmp_path / run}", *extra]


def _check_same_update(after: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                       before: dict[str, torch.Tensor]) -> None:
    """``after`` and ``reference`` made the same update from ``before``: the update differs by < 0.1% in norm, and
    no weight by more than 2·lr.

    Why not elementwise to 1e-6: the sharded forward and backward run on all-gathered weights in other buffers,
    so CPU kernels round differently in the last bits, and AdamW turns a gradient that is zero analytically (a
    conv bias followed by GroupNorm) but rounding noise (≫ eps) in practice into a step of ±lr, whose sign is that
    noise's. A wrong gradient (a lost process, a non-zero padding pass) changes the whole update instead.
    """
    names = list(reference)
    assert after.keys() == reference.keys() and len(names) > 100
    step = torch.cat([(reference[n].float() - before[n].float()).flatten() for n in names])
    diff = torch.cat([(after[n].float() - reference[n].float()).flatten() for n in names])
    assert float((step != 0).float().mean()) > 0.5, "the reference update hardly moved the weights"
    assert float(diff.norm() / step.norm()) < 1e-3, float(diff.norm() / step.norm())
    assert float(diff.abs().max()) <= 2 * LR


def _records(folder) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2], "the processes did not form one group of two"
    return ranks, [load_file(str(folder / f"rank{r}.safetensors")) for r in (0, 1)]


def test_fsdp_two_processes_match_one_process_on_the_same_global_batch(tiny_sd, tmp_path):
    """Iteration 1's global batch is process 0's (process 1's groups carry no advantage), and process 0 draws what
    a single process draws: the sharded 2-process step must give the single-process weights. Also: ``final/`` is
    a stock diffusers pipeline, and the checkpoint has the single-process format."""
    pytest.importorskip("accelerate")
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from visalign.train.config import load_train_config
    from visalign.train.loop import Trainer

    records = tmp_path / "records"
    records.mkdir()
    _launch_fsdp(str(records), str(TINY_RECIPE), *_overrides(tiny_sd, tmp_path, "fsdp", 1))
    ranks, (w0, w1) = _records(records)
    assert [r["iterations"][0]["active"] for r in ranks] == [2, 0], "the padding case is not the one exercised"

    single = Trainer(load_train_config(TINY_RECIPE, _overrides(tiny_sd, tmp_path, "single", 1)))
    before = {n: p.detach().clone() for n, p in single.params.items()}
    single.run(resume=False)
    assert single.fsdp is None
    assert all(torch.equal(w0[n], w1[n]) for n in w0), "the processes gathered different weights"
    _check_same_update(w0, {n: p.detach() for n, p in single.params.items()}, before)
    fsdp_row, single_row = read_metrics(tmp_path / "fsdp")[-1], read_metrics(tmp_path / "single")[-1]
    assert fsdp_row["grad_norm"] == pytest.approx(single_row["grad_norm"], rel=1e-5)  # the mean, not the sum

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "fsdp" / "final")  # stock diffusers, no visalign code
    assert type(pipe.unet) is UNet2DConditionModel
    saved = pipe.unet.state_dict()
    assert all(torch.equal(saved[n], w0[n]) for n in w0), "final/ does not hold the trained weights"
    params, optimizer, _, state = load_checkpoint(latest_checkpoint(tmp_path / "fsdp"))
    assert params.keys() == w0.keys() and all(torch.equal(params[n], w0[n]) for n in w0)
    assert sorted(optimizer["state"]) == list(range(len(w0)))  # indexed like optimizer.state_dict()
    assert optimizer["state"][0]["exp_avg"].shape == w0[next(iter(single.params))].shape
    assert state["num_processes"] == 2


@pytest.mark.slow  # two 2-process launches of two iterations: about 60 s of CPU
def test_fsdp_matches_the_all_reduce_path_with_uneven_micro_batches(tiny_sd, tmp_path):
    """Two iterations in which the processes' micro-batch counts differ: the sharded run follows the all-reduce
    data-parallel run (the same samples on each process, the same mean gradient at every step)."""
    pytest.importorskip("accelerate")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _launch_fsdp(str(tmp_path / "a"), str(TINY_RECIPE), *_overrides(tiny_sd, tmp_path, "fsdp", 2))
    _launch(tmp_path / "b", str(tmp_path / "b"), str(TINY_RECIPE), *_overrides(tiny_sd, tmp_path, "ddp", 2))
    (fsdp, (f0, _)), (ddp, (d0, d1)) = _records(tmp_path / "a"), _records(tmp_path / "b")
    counts = [[r["iterations"][it]["active"] for r in fsdp] for it in range(2)]
    assert any(a != b for a, b in counts), f"micro-batch counts {counts} are even: padding is not exercised"
    assert [r["iterations"][0]["rewards"] for r in fsdp] == [r["iterations"][0]["rewards"] for r in ddp]
    assert all(torch.equal(d0[n], d1[n]) for n in d0)
    _check_same_update(f0, d0, load_file(str(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")))
    for a, b in zip(read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "ddp"), strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["active_fraction"] == b["active_fraction"]


@pytest.mark.slow  # three 2-process launches: about 75 s of CPU
def test_fsdp_resume_replays_the_uninterrupted_run(tiny_sd, tmp_path):
    """A sharded run stopped after its iteration-1 checkpoint and resumed to 2 iterations ends with the weights
    and metrics of an uninterrupted one: the full weights, AdamW moments, EMA and early-stop best weights are
    sharded back exactly. Evaluation (every process samples, the main one scores) runs every iteration."""
    pytest.importorskip("accelerate")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    evals = tmp_path / "eval.jsonl"  # the proxy evaluation scores with the training reward: it needs the column
    evals.write_text("".join(json.dumps({"prompt": p, "skip_odd": False}) + "\n" for p in ("a cat", "a dog")))
    more = [f"eval.prompts={evals}", "eval.scorers=[saturation]",
            "eval.every=1", "optim.ema_decay=0.9", "eval.early_stop_metric=eval/reward", "eval.early_stop_patience=5"]
    _launch_fsdp(str(tmp_path / "a"), str(TINY_RECIPE), *_overrides(tiny_sd, tmp_path, "run-a", 2, *more))
    _launch_fsdp(str(tmp_path / "b"), str(TINY_RECIPE), *_overrides(tiny_sd, tmp_path, "run-b", 1, *more))
    _launch_fsdp("--resume", str(tmp_path / "b"), str(TINY_RECIPE),
                 *_overrides(tiny_sd, tmp_path, "run-b", 2, *more))
    (_, (a, _)), (_, (b, _)) = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), "the resumed run diverged"
    ref, res = read_metrics(tmp_path / "run-a"), read_metrics(tmp_path / "run-b")
    # Iteration rows (they have lr) and the final evaluation; run b's 1-iteration leg also logged a final one.
    keys = ("step", "reward", "grad_norm", "eval/reward")
    rows_b = [[r.get(k) for k in keys] for r in [*(r for r in res if "lr" in r), res[-1]]]
    rows_a = [[r.get(k) for k in keys] for r in [*(r for r in ref if "lr" in r), ref[-1]]]
    assert len(rows_a) == 3 and rows_a[-1][3] is not None and rows_b == rows_a
    final_a = load_file(str(tmp_path / "run-a" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    final_b = load_file(str(tmp_path / "run-b" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(final_a[n], final_b[n]) for n in final_a)  # best / EMA weights, resumed exactly


def test_fsdp_launch_settings_the_loop_cannot_honour_are_refused():
    from visalign.objectives.base import build_objective
    from visalign.train.sharding import fsdp_launch

    grpo, dpo = build_objective("grpo"), build_objective("diffusion-dpo")
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}
    launch = fsdp_launch(env, full_finetune=True, objective=grpo, mixed_precision="bf16")
    assert launch is not None and not launch.reshard_after_forward
    assert fsdp_launch({}, full_finetune=False, objective=dpo, mixed_precision="fp16") is None
    cases = {"LoRA run": ({}, False, grpo, "no"), "all-reduce": ({}, False, grpo, "no"),
             "--fsdp_version 2": ({"FSDP_VERSION": "1"}, True, grpo, "no"),
             "--fsdp_offload_params false": ({"FSDP_OFFLOAD_PARAMS": "true"}, True, grpo, "no"),
             "FULL_STATE_DICT": ({"FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, True, grpo, "no"),
             "objective 'diffusion-dpo'": ({}, True, dpo, "no"), "--mixed_precision bf16": ({}, True, grpo, "fp16")}
    for needle, (extra, full, objective, precision) in cases.items():
        with pytest.raises(ValueError, match="refused rather than ignored") as err:
            fsdp_launch({**env, **extra}, full_finetune=full, objective=objective, mixed_precision=precision)
        assert needle in str(err.value), (needle, str(err.value))


def test_each_block_of_the_unet_is_sharded_once(tiny_sd):
    from diffusers import UNet2DConditionModel

    from visalign.train.sharding import shard_blocks

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    blocks = shard_blocks(unet)
    assert [id(b) for b in blocks] == [id(b) for b in [*unet.down_blocks, *unet.up_blocks, unet.mid_block]]
