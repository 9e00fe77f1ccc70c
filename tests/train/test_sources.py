"""Experience sources on the engine: objectives and sources are matched when the config is read (before any model
loads), the pairs source trains Diffusion-DPO end to end and resumes exactly, and the eval hook's early stop keeps
the best weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.train.conftest import FAST, TINY_RECIPE
from visalign.objectives.base import Objective, OnlineBatch
from visalign.train.config import load_train_config
from visalign.train.loop import Trainer

MISSING_MODEL = "/nonexistent/model"  # a mismatch must be reported before this is ever opened


class TeacherObjective(Objective):
    """An objective that needs a teacher, which no source provides yet."""

    name = "needs-teacher"
    consumes = OnlineBatch
    needs = frozenset({"teacher"})


class ConstantReward:
    """A reward that never improves: 0.5 for every sample (a class, so it pickles)."""

    def __call__(self, media, prompts, **kwargs):
        return torch.full((len(prompts),), 0.5)


def write_pairs(folder: Path, rows: int = 6, corrupt: bool = True, identical: bool = False) -> Path:
    """A jsonl of ``rows`` pairs of 32-px images (bright chosen, dark rejected), plus one corrupt image row."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(rows):
        for name, lo in (("w", 160), ("l", 0)):
            pixels = (lo + torch.randint(0, 90, (32, 32, 3), generator=g)).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{name}{i}.png")
        lines.append({"prompt": f"prompt {i % 3}", "chosen": f"w{i}.png",
                      "rejected": f"w{i}.png" if identical and i == 1 else f"l{i}.png"})
    if corrupt:
        (folder / "broken.png").write_bytes(b"not a png at all")
        lines.append({"prompt": "prompt 0", "chosen": "broken.png", "rejected": "l0.png"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def dpo_overrides(model: Path | str, pairs: Path, out: Path, *extra: str) -> list[str]:
    return [*FAST, f"model.model={model}", "objective.name=diffusion-dpo", "objective.params={}",
            f"source.pairs.path={pairs}",
            "source.pairs.pairs_per_step=2", "sample.prompts=", "reward.terms=[]", "eval.prompts=null",
            "optim.lr=0.01", f"run.output_dir={out}", *extra]


@pytest.mark.parametrize(("overrides", "match"), [
    (["objective.name=diffusion-dpo", "objective.params={}", "source.name=online"],
     "consumes PairBatch, but source 'online' produces"),
    (["source.name=pairs", "source.pairs.path=x.jsonl"], "consumes OnlineBatch, but source 'pairs' produces"),
    ([f"objective.name={__name__}:TeacherObjective", "objective.params={}"], r"needs \['teacher'\]"),
    (["objective.name=grpo", "objective.params.anchor=shapes-oracle"], "cannot return gradients"),
])
def test_mismatches_fail_before_the_model_loads(tmp_path, overrides, match):
    config = load_train_config(TINY_RECIPE, [*FAST, f"model.model={MISSING_MODEL}",
                                             f"run.output_dir={tmp_path}", *overrides])
    with pytest.raises(ValueError, match=match):
        Trainer(config)


def test_a_pairs_objective_without_pairs_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="source.pairs.path is empty"):
        load_train_config(TINY_RECIPE, [*FAST, "objective.name=diffusion-dpo", "objective.params={}",
                                         f"run.output_dir={tmp_path}"])


def test_identical_pairs_are_refused_before_the_model_loads(tmp_path):
    pairs = write_pairs(tmp_path / "data", identical=True)
    config = load_train_config(TINY_RECIPE, dpo_overrides(MISSING_MODEL, pairs, tmp_path / "run"))
    with pytest.raises(ValueError, match="row 1"):
        Trainer(config)


def test_dpo_on_pairs_trains_and_lists_the_corrupt_row(tiny_sd, tmp_path, capsys):
    pairs = write_pairs(tmp_path / "data")
    out = tmp_path / "run"
    trainer = Trainer(load_train_config(TINY_RECIPE, dpo_overrides(tiny_sd, pairs, out, "run.iterations=3")))
    assert "6 pairs read" in capsys.readouterr().out and "broken.png" not in "".join(
        r.prompt for r in trainer.source.data.records)
    assert [s.path.endswith("broken.png") for s in trainer.source.data.skipped] == [True]
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    summary = trainer.run(resume=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["pairs"] == 2 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["epoch"] == 1.0  # 3 × 2 pairs = one epoch
    assert all(not torch.equal(before[n], p) for n, p in trainer.params.items() if "lora_B" in n)
    saved = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    assert saved and summary["iterations"] == 3


def test_pairs_run_resumed_from_a_checkpoint_matches_an_uninterrupted_one(tiny_sd, tmp_path):
    pairs = write_pairs(tmp_path / "data", corrupt=False)
    whole = tmp_path / "whole"
    Trainer(load_train_config(TINY_RECIPE, dpo_overrides(tiny_sd, pairs, whole, "run.iterations=4",
                                                         "run.checkpoint_every=2"))).run(resume=False)
    split = tmp_path / "split"
    Trainer(load_train_config(TINY_RECIPE, dpo_overrides(tiny_sd, pairs, split, "run.iterations=2",
                                                         "run.checkpoint_every=2"))).run(resume=False)
    Trainer(load_train_config(TINY_RECIPE, dpo_overrides(tiny_sd, pairs, split, "run.iterations=4",
                                                         "run.checkpoint_every=2"))).run(resume=True)
    a = load_file(str(whole / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stop_keeps_the_best_weights_when_the_metric_stops_improving(tiny_sd, tmp_path):
    out = tmp_path / "run"
    config = load_train_config(TINY_RECIPE, [*FAST, f"model.model={tiny_sd}", f"run.output_dir={out}",
                                             "run.iterations=6", "optim.lr=0.05", "eval.every=1",
                                             f"eval.scorers=['{__name__}:ConstantReward']", "eval.max_prompts=1",
                                             "eval.early_stop_metric=eval/reward", "eval.early_stop_patience=2"])
    trainer = Trainer(config)
    summary = trainer.run(resume=False)
    # The first evaluation (before training) is the best a constant can be; two more without improvement stop it.
    assert summary["iterations"] == 2 and summary["early_stop"]["stopped"] is True
    saved = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    assert all(float(t.abs().sum()) == 0 for k, t in saved.items() if "lora_B" in k)  # LoRA B starts at zero
    assert any(float(p.abs().sum()) > 0 for n, p in trainer.params.items() if "lora_B" in n)


def test_an_unknown_early_stop_metric_names_the_known_ones(tiny_sd, tmp_path):
    config = load_train_config(TINY_RECIPE, [*FAST, f"model.model={tiny_sd}", f"run.output_dir={tmp_path}",
                                             "run.iterations=2", "eval.every=1", "eval.max_prompts=1",
                                             "eval.early_stop_metric=eval/nope"])
    with pytest.raises(RuntimeError, match="eval/reward"):
        Trainer(config).run(resume=False)


def test_help_config_lists_each_objectives_typed_params():
    from visalign.commands.train import objective_param_lines

    text = "\n".join(objective_param_lines())
    dpo = text.split("objective.name=diffusion-dpo", 1)[1].split("objective.name=", 1)[0]
    assert "consumes PairBatch" in dpo and "objective.params.beta = 5000.0" in dpo and "sft_weight" in dpo
    assert "objective.params.clip_range" in text.split("objective.name=grpo", 1)[1].split("objective.name=", 1)[0]
