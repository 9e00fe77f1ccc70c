"""The generic registry and the scorer lookup forms (id, import path, callable, instance)."""

from __future__ import annotations

import pickle

import pytest
import torch

from visalign.registry import Registry, UnknownIdError, import_object
from visalign.scorers import CallableScorer, ScoreBatch, get_scorer, list_scorers, scorer_card


class Alpha:
    pass


class Beta:
    pass


def test_registry_decorator_lazy_builtin_and_import_path():
    reg: Registry[type] = Registry("widget", builtin={"gamma": "collections:OrderedDict"})
    reg.register("alpha")(Alpha)
    assert reg.get("alpha") is Alpha
    from collections import OrderedDict

    assert reg.get("gamma") is OrderedDict
    assert reg.get("tests.test_registry:Beta") is Beta
    assert reg.list() == ["alpha", "gamma"]


def test_duplicate_id_bound_to_another_object_raises():
    reg: Registry[type] = Registry("widget", builtin={"gamma": "collections:OrderedDict"})
    reg.register("alpha")(Alpha)
    reg.register("alpha")(Alpha)  # the same object again is fine (module reloads)
    with pytest.raises(ValueError, match="already bound"):
        reg.register("alpha")(Beta)
    with pytest.raises(ValueError, match="built-in"):
        reg.register("gamma")(Beta)


def test_unknown_id_lists_close_matches_and_known_ids():
    reg: Registry[type] = Registry("widget", builtin={"alpha-one": "x:Y", "beta-two": "x:Z"})
    with pytest.raises(UnknownIdError) as info:
        reg.get("alpha-onee")
    text = str(info.value)
    assert "Did you mean 'alpha-one'" in text and "beta-two" in text and "pkg.module:Name" in text


def test_import_object_errors_name_the_path():
    with pytest.raises(ImportError, match="no attribute"):
        import_object("visalign.registry:NoSuchThing")
    with pytest.raises(ImportError, match="not an import path"):
        import_object("justaname")


def test_unknown_scorer_id_message():
    with pytest.raises(KeyError) as info:
        scorer_card("brigthness")
    assert "Did you mean 'brightness'" in str(info.value)
    assert "brightness" in str(info.value) and "callable" in str(info.value)


def test_list_scorers_is_sorted_and_contains_cards():
    ids = list_scorers()
    assert ids == sorted(ids) and "brightness" in ids


class MeanRed:
    """A picklable reward class (not a closure), as docs/extending.md#scorers-and-rewards asks."""

    def __call__(self, media, prompts, **kwargs):
        return media[:, 0].mean(dim=(1, 2))


def test_get_scorer_accepts_callable_import_path_and_instance():
    media = torch.rand(2, 3, 8, 8)
    batch = ScoreBatch(prompts=["a", "b"], media=media)
    from_callable = get_scorer(MeanRed())
    assert isinstance(from_callable, CallableScorer)
    torch.testing.assert_close(from_callable(batch).reward, media[:, 0].mean(dim=(1, 2)))
    assert get_scorer(from_callable) is from_callable
    from_path = get_scorer("tests.test_registry:MeanRed")
    torch.testing.assert_close(from_path(batch).raw, media[:, 0].mean(dim=(1, 2)))
    clone = pickle.loads(pickle.dumps(from_callable))
    torch.testing.assert_close(clone(batch).reward, from_callable(batch).reward)


def test_callable_returning_none_abstains_and_wrong_length_raises():
    batch = ScoreBatch(prompts=["a", "b"], media=torch.rand(2, 3, 4, 4))
    out = get_scorer(lambda media, prompts: [1.0, None])(batch)
    assert out.reward[0] == 1.0 and torch.isnan(out.reward[1])
    with pytest.raises(ValueError, match="returned 3 values for 2"):
        get_scorer(lambda media, prompts: [1.0, 2.0, 3.0])(batch)


def test_score_batch_validates_pairing():
    with pytest.raises(ValueError, match="2 samples but 1 prompts"):
        ScoreBatch(prompts=["only one"], media=torch.rand(2, 3, 4, 4))
    with pytest.raises(TypeError, match="list of strings"):
        ScoreBatch(prompts="a red circle", media=torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="needs media"):
        ScoreBatch(prompts=["x"])
