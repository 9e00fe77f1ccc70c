"""``visalign train``: a tiny recipe end to end through the real CLI (progress, metrics, grids, checkpoints, a LoRA
that stock diffusers loads), and the bad inputs a user hits first, each with a message that says what to do."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.conftest import FAST, REPO, TINY_RECIPE
from visalign.cli import main
from visalign.config import to_dict
from visalign.train.config import load_train_config
from visalign.train.logging import read_metrics


@pytest.fixture(scope="module")
def cli_run(tiny_sd, tmp_path_factory):
    """One 3-iteration run of the shipped tiny recipe through ``python -m visalign train`` (progress bar on)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    overrides = [o for o in FAST if not o.startswith("run.")] + [
        f"model.model={tiny_sd}", f"run.output_dir={out}", "run.iterations=3", "run.checkpoint_every=2",
        "eval.every=2", "eval.max_prompts=2", "objective.params.beta=0.01", "optim.lr=1e-2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "visalign", "train", str(TINY_RECIPE), *overrides], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, overrides, done


def test_progress_and_summary_are_printed(cli_run):
    _, _, done = cli_run
    assert "reward=" in done.stderr and "3/3" in done.stderr  # the tqdm bar with the live reward
    assert "train reward (proxy)" in done.stdout and "eval/reward/saturation/mean" in done.stdout
    assert "final weights:" in done.stdout


def test_metrics_hold_every_training_signal(cli_run):
    out, _, _ = cli_run
    rows = read_metrics(out)
    train = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("reward/brightness/mean", "reward/brightness/std", "reward_std", "advantage_abs_mean",
                "advantage_std", "ratio", "clipfrac", "kl", "grad_norm", "lr", "time/sample", "time/score",
                "time/update", "time/iteration", "samples_per_second", "nan_dropped", "diversity"):
        assert all(isinstance(r[key], float) for r in train), key
    assert train[0]["ratio"] == pytest.approx(1.0, abs=1e-5)  # first inner step is on-policy
    assert train[0]["kl"] == 0.0 and train[1]["kl"] > 0  # KL to the LoRA-off reference once the policy moves
    assert train[1]["path_kl"] > 0  # the loop's own path-KL estimate at the eval iteration
    assert train[0]["lr"] == pytest.approx(1e-2)
    evals = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert all("eval/proxy/reward/brightness/mean" in r for r in evals)  # proxy vs held-out on the same samples
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())


def test_grids_checkpoints_config_and_summary(cli_run, tiny_sd):
    out, overrides, _ = cli_run
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["eval-000000.png", "eval-000002.png",
                                                                "eval-000003.png"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    saved = json.loads((out / "config.json").read_text())
    assert saved == json.loads(json.dumps(to_dict(load_train_config(TINY_RECIPE, overrides))))
    assert saved["run"]["iterations"] == 3 and saved["model"]["model"] == str(tiny_sd)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["final_weights"] == str(out / "final")
    assert set(summary["eval_before"]) == set(summary["eval_after"]) and summary["eval_after"]


def test_final_lora_loads_in_stock_diffusers_and_changes_the_output(cli_run, tiny_sd):
    from diffusers import StableDiffusionPipeline

    out, _, _ = cli_run
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), use_safetensors=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a red circle", num_inference_steps=2, height=16, width=16, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    before = image()
    pipe.load_lora_weights(str(out / "final"))
    assert pipe.get_active_adapters(), "no adapter was loaded"
    after = image()
    assert (after - before).abs().max() > 1e-4


# ---------------------------------------------------------------- bad input


def _train(capsys, *args: str) -> tuple[int, str]:
    rc = main(["train", str(TINY_RECIPE), *args])
    return rc, capsys.readouterr().err


def test_typo_in_recipe_names_key_and_fix(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(TINY_RECIPE.read_text().replace("images_per_prompt:", "image_per_prompt:"))
    rc = main(["train", str(recipe)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Unknown key 'sample.image_per_prompt'. Did you mean 'sample.images_per_prompt'?" in err


def test_too_few_prompts_for_a_step(tmp_path, capsys, tiny_sd):
    prompts = tmp_path / "two.txt"
    prompts.write_text("a red circle\na blue square\n")
    rc, err = _train(capsys, f"sample.prompts={prompts}", "sample.prompts_per_step=3", f"model.model={tiny_sd}",
                     f"run.output_dir={tmp_path / 'run'}")
    assert rc == 1
    assert f"sample.prompts_per_step is 3 but {prompts} has only 2 distinct prompts" in err
    assert "lower sample.prompts_per_step or add prompts" in err


def test_unwritable_output_folder(tmp_path, capsys, tiny_sd):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc, err = _train(capsys, f"model.model={tiny_sd}", f"run.output_dir={blocker / 'run'}")
    assert rc == 1
    assert f"Cannot write to run.output_dir {blocker / 'run'}" in err and "run.output_dir=PATH" in err


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed, so asking is valid")
def test_wandb_asked_but_missing(tmp_path, capsys, tiny_sd):
    rc, err = _train(capsys, f"model.model={tiny_sd}", "run.wandb=true", f"run.output_dir={tmp_path / 'run'}")
    assert rc == 1 and "pip install wandb, or set run.wandb=false" in err


def test_nan_for_some_samples_drops_them_and_training_continues(tmp_path, tiny_sd):
    from visalign.train.loop import Trainer

    prompts = tmp_path / "prompts.jsonl"  # metadata columns travel with each prompt's samples to the scorer
    prompts.write_text('{"prompt": "a red circle", "skip_odd": true}\n'
                       '{"prompt": "a blue square", "skip_odd": false}\n')
    out = tmp_path / "run"
    config = load_train_config(TINY_RECIPE, [*FAST, "sample.prompts_per_step=2",
                                             f"sample.prompts={prompts}", f"model.model={tiny_sd}",
                                             f"run.output_dir={out}", "run.iterations=2", "eval.prompts=null",
                                             "reward.terms=['tests.train.scorers:BrightnessOddNan']"])
    summary = Trainer(config).run()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    # The second red-circle sample abstains: dropped and counted. Its group keeps one sample (no comparison, so no
    # advantage) and the blue-square pair carries the update: half the batch.
    assert [r["nan_dropped"] for r in rows] == [1.0, 1.0]
    assert [r["active_fraction"] for r in rows] == [0.5, 0.5]
    assert all(r["grad_norm"] > 0 for r in rows)
    assert summary["nan_dropped"] == 2
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_nan_for_every_sample_stops_with_a_clear_error(tmp_path, capsys, tiny_sd):
    rc, err = _train(capsys, *FAST, f"model.model={tiny_sd}", f"run.output_dir={tmp_path / 'run'}",
                     "eval.prompts=null", "reward.terms=['tests.train.scorers:AlwaysNan']")
    assert rc == 1
    assert "Every sample's reward is NaN at iteration 0" in err and "alwaysnan" in err
    assert not (Path(tmp_path / "run") / "final").exists()


def test_resume_with_another_lora_rank_is_refused(cli_run, capsys):
    out, overrides, _ = cli_run
    rc, err = _train(capsys, *[o for o in overrides if not o.startswith("model.lora_rank")], "model.lora_rank=2",
                     "run.progress=false")
    assert rc == 1
    assert f"Checkpoint {out / 'checkpoints' / 'step-000003'} does not fit this model" in err
    assert "--no-resume" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
