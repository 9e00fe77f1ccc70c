"""Every shipped recipe stays loadable: it validates as a TrainConfig (no model is loaded), names a registered
objective and registered scorers, and points at prompt files that exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import REPO
from visalign.objectives.base import OBJECTIVES
from visalign.registry import import_object, is_import_path
from visalign.scorers import list_scorers
from visalign.train.config import load_train_config

RECIPES = sorted((REPO / "pipelines").glob("*.yaml"))
MODELS = ("sd15", "sdxl", "sd35-medium", "flux1-dev", "wan21-1.3b")


def _scorer_ids(terms: list) -> list[str]:
    return [t if isinstance(t, str) else t["scorer"] for t in terms]


def test_the_recipe_matrix_is_complete():
    names = {p.stem for p in RECIPES}
    wanted = {f"{m}-{o}" for m in MODELS for o in ("grpo", "prdp", "dragon")}
    wanted |= {f"tiny-sd-{o}" for o in ("grpo", "prdp", "dragon", "raft", "draft")}
    wanted |= {"shapes-grpo-clip", "sd15-alignprop"}
    assert wanted <= names, f"missing recipes: {sorted(wanted - names)}"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_and_names_known_components(recipe: Path):
    config = load_train_config(recipe)
    assert config.objective.name in OBJECTIVES, f"{recipe.name}: unknown objective {config.objective.name!r}"
    known = set(list_scorers())
    for scorer in _scorer_ids(config.reward.terms) + _scorer_ids(config.eval.scorers):
        if is_import_path(scorer):
            import_object(scorer)
        else:
            assert scorer in known, f"{recipe.name}: unknown scorer {scorer!r}"
    for prompts in (config.sample.prompts, config.eval.prompts):
        if prompts:
            assert Path(prompts).is_file(), f"{recipe.name}: prompt file {prompts} does not exist"
    assert config.run.output_dir.startswith("runs/"), "recipes write under runs/, never over each other"
    assert Path(config.run.output_dir).name == recipe.stem
    text = recipe.read_text()
    assert text.startswith("#") and "Memory" in text, f"{recipe.name}: no memory notes in its header comment"


@pytest.mark.parametrize("recipe", [p for p in RECIPES if not p.stem.startswith(("tiny", "shapes", "textworld"))],
                         ids=lambda p: p.stem)
def test_real_model_recipes_run_on_gpu_with_lora(recipe: Path):
    config = load_train_config(recipe)
    assert config.model.device == "cuda" and config.model.lora_rank > 0
    if "log_probs" in OBJECTIVES.get(config.objective.name).needs:
        assert config.sample.eta > 0, "log-probs need a stochastic sampler"
    assert config.eval.scorers and set(_scorer_ids(config.eval.scorers)).isdisjoint(
        _scorer_ids(config.reward.terms)), "held-out eval scorers must differ from the training proxy"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_objective_params_fit_the_objective(recipe: Path):
    config = load_train_config(recipe)
    name = config.objective.name
    try:
        cls = OBJECTIVES.get(name)
    except ImportError as err:  # prdp/dragon/raft land in their own commits; the id check above still runs
        pytest.skip(f"objective {name!r} is registered but its module is not importable yet ({err})")
    cls(config.objective.params)  # unknown or ill-typed params raise ConfigError naming objective.params.<key>
