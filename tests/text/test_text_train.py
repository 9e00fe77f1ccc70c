"""`visalign train` on text recipes, the text-pairs source, the TRL reward bridge and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.text.helpers import text_recipe, trainer_of
from visalign.cli import main
from visalign.rewards import RewardSpec
from visalign.scorers import ScoreBatch, get_scorer
from visalign.text.pairs import TextPairDataError, read_text_pairs
from visalign.text.policy import ChatTemplateError
from visalign.text.rewards import as_reward_function
from visalign.text.world import StringTaskReward

REPO = Path(__file__).resolve().parents[2]


def test_visalign_train_runs_the_shipped_text_world_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(REPO / "pipelines/textworld-grpo.yaml"), f"run.output_dir={out}", "run.iterations=2",
                 "eval.max_prompts=8", "run.progress=false", "run.tensorboard=false"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval/reward" in rows[0] and "reward/string-task-accuracy/mean" in rows[1]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert "model.load_adapter" in capsys.readouterr().out


def test_text_dpo_trains_from_a_pair_table(tiny_lm, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "rev abc=", "chosen": "cba", "rejected": "abc", "source": "hand"},
            {"prompt": "sort cab=", "chosen": "abc", "rejected": ""}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = text_recipe(tmp_path, tiny_lm, objective={"name": "text-dpo", "params": {"beta": 0.1}},
                         source={"name": "", "pairs": {"path": str(pairs), "pairs_per_step": 2}},
                         run={"iterations": 2}, sample={"prompts": ""}, reward={"terms": []})
    trainer = trainer_of(recipe)
    assert trainer.source.name == "text-pairs"
    summary = trainer.run(resume=False)
    rows = [json.loads(line) for line in (Path(summary["final_weights"]).parent / "metrics.jsonl").open()]
    assert rows[0]["loss"] == pytest.approx(0.6931472, abs=1e-5) and rows[0]["pairs"] == 2.0


def test_pairs_with_identical_texts_or_missing_cells_are_refused(tmp_path):
    table = tmp_path / "pairs.jsonl"
    table.write_text(json.dumps({"prompt": "a=", "chosen": "x", "rejected": "x"}) + "\n")
    with pytest.raises(TextPairDataError, match=r"identical chosen and rejected texts \(rows \[0\]"):
        read_text_pairs(table)
    table.write_text(json.dumps({"prompt": "a=", "chosen": "x", "rejected": None}) + "\n")
    with pytest.raises(TextPairDataError, match="missing / non-string completion"):
        read_text_pairs(table)
    table.write_text(json.dumps({"prompt": "a=", "good": "x", "rejected": "y"}) + "\n")
    with pytest.raises(TextPairDataError, match=r"no column\(s\) \['chosen'\]"):
        read_text_pairs(table)


def test_a_tokenizer_without_chat_template_fails_before_training(tiny_lm, tmp_path):
    recipe = text_recipe(tmp_path, tiny_lm, text={"chat_template": True})
    with pytest.raises(ChatTemplateError, match="text.chat_template=false"):
        trainer_of(recipe)


def test_empty_completions_are_scored_and_counted(tiny_lm, tmp_path):
    trainer = trainer_of(text_recipe(tmp_path, tiny_lm, text={"max_new_tokens": 1}))
    batch = trainer.source.next()  # one token: EOS (empty) or a letter
    metrics = trainer.source.local_metrics(batch)
    empty = sum(t == "" for t in batch.rollout.texts) / len(batch)
    assert metrics["completions/empty_fraction"] == pytest.approx(empty)
    assert torch.isfinite(batch.rewards).all()  # count_a gives an empty completion 0, not an error


def test_a_text_scorer_is_a_trl_reward_function_and_back():
    scorer = get_scorer("text-length-target")
    fn = as_reward_function(scorer)
    prompts, completions = ["q", "q"], ["a" * 200, "a" * 10]
    spec = RewardSpec.from_config({"terms": [scorer], "modality": "text"})  # the same object, as a reward term
    direct = spec(ScoreBatch(prompts=prompts, texts=completions)).total.tolist()
    assert fn(prompts=prompts, completions=completions) == pytest.approx(direct)
    assert fn.__name__ == "text_length_target"
    assert fn(prompts=prompts, completions=[[{"role": "assistant", "content": c}] for c in completions]) \
        == pytest.approx(direct)
    world = get_scorer(StringTaskReward(), modality="text")  # a TRL function as a scorer; None abstains
    out = world(ScoreBatch(prompts=["rev abc=", "hello"], texts=["cba", "x"]))
    assert out.reward[0] == 1.0 and torch.isnan(out.reward[1])
    with pytest.raises(ValueError, match="needs a text scorer"):
        as_reward_function("brightness")


def test_trl_functions_get_table_columns_as_keywords():
    scorer = get_scorer("tests.text.rewards:bonus_column", modality="text")
    out = scorer(ScoreBatch(prompts=["a", "b"], texts=["x", "y"], metadata=[{"bonus": 2}, {"bonus": 0.5}]))
    torch.testing.assert_close(out.raw, torch.tensor([2.0, 0.5]))


@pytest.mark.slow
def test_grpo_on_the_shipped_text_world_gains_fifteen_points_held_out(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(REPO / "pipelines/textworld-grpo.yaml"), f"run.output_dir={out}", "run.progress=false",
                 "run.tensorboard=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"]["eval/reward"], summary["eval_after"]["eval/reward"]
    assert after >= before + 0.15, (before, after)
