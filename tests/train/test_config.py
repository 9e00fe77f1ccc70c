"""Recipe → TrainConfig: unknown keys with "did you mean", type errors naming the key, overrides, round trip."""

from __future__ import annotations

import json

import pytest

from tests.train.conftest import TINY_RECIPE
from visalign.config import ConfigError, apply_overrides, from_dict, help_lines, load_yaml, to_dict
from visalign.train.config import TrainConfig, load_train_config

BASE = {"model": {"model": "some/folder"}, "sample": {"prompts": "p.txt"}, "reward": {"terms": ["brightness"]}}


def _with(**sections: dict) -> dict:
    data = json.loads(json.dumps(BASE))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


@pytest.mark.parametrize("data, path, suggestion", [
    ({**BASE, "optimm": {"lr": 1e-3}}, "'optimm'", "'optim'"),
    (_with(sample={"prompt_per_step": 2}), "'sample.prompt_per_step'", "'sample.prompts_per_step'"),
    (_with(reward={"advantage": {"normalise_std": False}}), "'reward.advantage.normalise_std'",
     "'reward.advantage.normalize_std'"),
    (_with(run={"checkpoint_evry": 3}), "'run.checkpoint_evry'", "'run.checkpoint_every'"),
])
def test_typo_names_the_full_key_path_and_a_suggestion(data, path, suggestion):
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, data)
    message = str(err.value)
    assert f"Unknown key {path}" in message
    assert f"Did you mean {suggestion}?" in message


def test_unknown_key_without_close_match_lists_known_keys():
    with pytest.raises(ConfigError, match=r"Unknown key 'optim.zzz'\. Known keys of optim: \[.*'lr'.*\]"):
        from_dict(TrainConfig, _with(optim={"zzz": 1}))


@pytest.mark.parametrize("section, values, message", [
    ("optim", {"lr": "fast"}, "optim.lr must be a number; got 'fast'"),
    ("run", {"iterations": 2.5}, "run.iterations must be an integer; got 2.5"),
    ("run", {"tensorboard": "yes"}, "run.tensorboard must be true or false; got 'yes'"),
    ("model", {"lora_targets": "to_q"}, "model.lora_targets must be a list; got 'to_q'"),
    ("optim", {"betas": [0.9]}, "optim.betas must have 2 items"),
    ("sample", {"images_per_prompt": 1}, "sample.images_per_prompt must be >= 2"),
    ("model", {"lora_rank": -1}, "model.lora_rank must be >= 0"),
])
def test_wrong_types_and_values_name_the_key(section, values, message):
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, _with(**{section: values}))
    assert message in str(err.value)


def test_a_section_given_as_a_scalar_is_refused():
    with pytest.raises(ConfigError, match="optim must be a mapping of OptimConfig fields"):
        from_dict(TrainConfig, {**BASE, "optim": 3})


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides(BASE, ["optim.lr=3e-4", "sample.steps=7", "eval.prompts=held.txt",
                                  "model.lora_targets=[to_q, to_v]", "run.wandb=true", "objective.params.beta=0.01"])
    config = from_dict(TrainConfig, data)
    assert config.optim.lr == pytest.approx(3e-4) and isinstance(config.optim.lr, float)
    assert config.sample.steps == 7
    assert config.eval.prompts == "held.txt"
    assert config.model.lora_targets == ["to_q", "to_v"]
    assert config.run.wandb is True
    assert config.objective.params == {"beta": 0.01}
    assert BASE["sample"] == {"prompts": "p.txt"}  # the input mapping is not mutated


@pytest.mark.parametrize("override, message", [
    ("optim.lr", "must look like section.key=value"),
    ("=3", "must look like section.key=value"),
    ("optim.lr.x=1", "'lr' is not a section"),
])
def test_malformed_overrides(override, message):
    data = apply_overrides(BASE, ["optim.lr=0.1"])
    with pytest.raises(ConfigError, match=message):
        apply_overrides(data, [override])


def test_override_typo_goes_through_the_same_check():
    with pytest.raises(ConfigError, match="Did you mean 'optim.lr'"):
        load_train_config(TINY_RECIPE, ["optim.lrr=0.1"])


def test_recipe_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # somewhere the recipe's relative paths do not exist
    config = load_train_config(TINY_RECIPE, ["optim.lr=1e-3"])
    assert config.sample.prompts == str(TINY_RECIPE.parent / "prompts" / "tiny-train.txt")
    assert config.optim.lr == pytest.approx(1e-3)


def test_missing_section_and_bad_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {model: x}\nsample: {prompts: p.txt}\n")
    with pytest.raises(ValueError, match="reward.terms is empty"):  # an online run without a reward
        load_train_config(recipe)
    recipe.write_text("sample: {prompts: p.txt}\nreward: {terms: [brightness]}\n")
    with pytest.raises(ValueError, match="no 'model' section"):
        load_train_config(recipe)
    recipe.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(recipe)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_json():
    """config.json (what every run writes) rebuilds the same config: nothing is lost or stringly typed."""
    config = load_train_config(TINY_RECIPE, ["optim.betas=[0.8, 0.9]", "optim.ema_decay=0.95", "run.seed=3"])
    saved = json.loads(json.dumps(to_dict(config)))
    assert saved["optim"]["betas"] == [0.8, 0.9] and saved["run"]["seed"] == 3
    assert from_dict(TrainConfig, saved) == config


def test_help_lists_every_field_with_its_help():
    lines = help_lines(TrainConfig)
    assert any(line.startswith("optim.lr = 0.0001: AdamW learning rate") for line in lines)
    assert any(line.startswith("reward.advantage.clip = 5.0") for line in lines)
    assert all(":" in line for line in lines)


def test_help_config_prints_the_schema(capsys):
    from visalign.cli import main

    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "sample.images_per_prompt = 4: Samples per prompt" in out and "run.checkpoint_every = 10" in out
