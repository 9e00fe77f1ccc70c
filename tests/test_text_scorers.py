"""Text scorers (visalign/scorers/text.py) and the TRL-callable wrapper, against hand-computed values.

The reward model is the tiny BERT of tests/tiny/text.py, loaded through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from tests.tiny.text import VOCAB, write_tiny_text_rm
from visalign.scorers import ScoreBatch, WeightsUnavailableError, get_scorer

PROMPTS = ["what colour is it ?", "two red squares", "is it a circle ?", "what shape"]
COMPLETIONS = ["red", "yes two red squares above a blue circle", "no", "it is a triangle . 3 : 4"]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> Path:
    return write_tiny_text_rm(tmp_path_factory.mktemp("text-rm") / "right")


@pytest.fixture(scope="module")
def model(rm_dir):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(rm_dir, use_safetensors=True).eval()


def ids_of(text: str) -> list[int]:
    """Whitespace split then WordLevel lookup, written out independently of the tokenizer."""
    return [VOCAB.get(word, VOCAB["[UNK]"]) for word in text.split()]


def hand_pair_logits(model, prompt: str, completion: str) -> torch.Tensor:
    """``[CLS] prompt [SEP] completion [SEP]`` with segment ids 0/1, one unpadded sequence → logits ``[L]``."""
    first = [VOCAB["[CLS]"], *ids_of(prompt), VOCAB["[SEP]"]]
    second = [*ids_of(completion), VOCAB["[SEP]"]]
    input_ids = torch.tensor([first + second])
    token_type_ids = torch.tensor([[0] * len(first) + [1] * len(second)])
    with torch.no_grad():
        return model(input_ids=input_ids, token_type_ids=token_type_ids).logits[0]


def rm(folder: Path, **params):
    return get_scorer("text-rm-deberta", weights=str(folder), params=params or None)


def batch(prompts=PROMPTS, texts=COMPLETIONS) -> ScoreBatch:
    return ScoreBatch(prompts=list(prompts), texts=list(texts))


# ---------------------------------------------------------------- sequence-classification reward model


def test_score_is_the_label_logit_of_the_text_pair(rm_dir, model):
    out = rm(rm_dir)(batch())
    expected = torch.stack([hand_pair_logits(model, p, c)[0] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    torch.testing.assert_close(out.raw, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.reward, torch.sigmoid(expected), atol=1e-5, rtol=0)
    assert expected.std() > 0.05  # the texts really score differently, so a mix-up of rows would be caught


def test_padding_side_saved_with_the_tokenizer_does_not_change_scores(rm_dir, tmp_path):
    from transformers import AutoTokenizer

    left_dir = write_tiny_text_rm(tmp_path / "left", padding_side="left")  # same seed, so the same weights
    left_tokenizer = AutoTokenizer.from_pretrained(left_dir)
    assert left_tokenizer.padding_side == "left"
    # Left padding really would move BERT's [CLS] and its positions: honouring it naively changes the scores.
    from transformers import BertForSequenceClassification

    naive_inputs = left_tokenizer(PROMPTS, COMPLETIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        naive = BertForSequenceClassification.from_pretrained(left_dir).eval()(**naive_inputs).logits[:, 0]
    right = rm(rm_dir)(batch()).raw
    assert not torch.allclose(naive, right, atol=1e-3)

    torch.testing.assert_close(rm(left_dir)(batch()).raw, right, atol=1e-5, rtol=0)
    one_by_one = torch.cat([rm(left_dir)(batch([p], [c])).raw for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    torch.testing.assert_close(one_by_one, right, atol=1e-5, rtol=0)


def test_chunked_forward_passes_match_one_pass(rm_dir):
    torch.testing.assert_close(rm(rm_dir, batch_size=3)(batch()).raw, rm(rm_dir, batch_size=16)(batch()).raw,
                               atol=1e-5, rtol=0)


def test_chat_template_formats_one_conversation_without_extra_special_tokens(rm_dir, model):
    out = rm(rm_dir, chat_template=True)(batch())
    expected = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True):
        # tests/tiny/text.py CHAT_TEMPLATE, rendered by hand; no [CLS]/[SEP] because the template writes none.
        text = f"user : {prompt} . assistant : {completion} . "
        with torch.no_grad():
            expected.append(model(input_ids=torch.tensor([ids_of(text)])).logits[0, 0])
    torch.testing.assert_close(out.raw, torch.stack(expected), atol=1e-5, rtol=0)


def test_label_by_name_or_index_picks_that_logit(tmp_path):
    from transformers import BertForSequenceClassification

    folder = write_tiny_text_rm(tmp_path / "two-labels", num_labels=2)
    two = BertForSequenceClassification.from_pretrained(folder).eval()
    expected = torch.stack([hand_pair_logits(two, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    torch.testing.assert_close(rm(folder, label="label_1")(batch()).raw, expected[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(rm(folder, label=0)(batch()).raw, expected[:, 0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"label 'good' is not among the model's labels \['label_0', 'label_1'\]"):
        rm(folder, label="good")(batch())
    with pytest.raises(ValueError, match="label index 2 is out of range"):
        rm(folder, label=2)(batch())


def test_missing_hub_weights_offline_raise_one_clear_error():
    scorer = get_scorer("text-rm-deberta")
    with pytest.raises(WeightsUnavailableError) as info:
        scorer(batch())
    message = str(info.value)
    for part in ("'text-rm-deberta'", "OpenAssistant/reward-model-deberta-v3-large-v2", "weights='/path/to/folder'",
                 "--weights text-rm-deberta=/path/to/folder"):
        assert part in message, (part, message)


def test_missing_local_folder_names_it(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does-not-exist.*does not exist"):
        rm(tmp_path / "does-not-exist")(batch())


def test_pickle_only_checkpoint_is_refused(rm_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickle-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((rm_dir / name).read_bytes())
    torch.save(load_file(rm_dir / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(WeightsUnavailableError, match="safetensors"):
        rm(folder)(batch())


def test_remote_code_runs_only_when_the_card_allows_it(rm_dir, tmp_path):
    folder = tmp_path / "custom-code"
    folder.mkdir()
    for path in rm_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "remote-code-ran"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig",
                          "AutoModelForSequenceClassification": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "class CustomConfig(BertConfig):\n    pass\n"
        "class CustomModel(BertForSequenceClassification):\n    config_class = CustomConfig\n")
    default = rm(folder)
    default(batch())
    assert not marker.exists() and type(default.model).__name__ == "BertForSequenceClassification"
    trusted = rm(folder, trust_remote_code=True)
    trusted(batch())
    assert marker.exists() and type(trusted.model).__name__ == "CustomModel"


# ---------------------------------------------------------------- regex format rules

THINK_ANSWER_CASES = [
    ("<think>2+2 is 4</think><answer>4</answer>", 1.0, "exact format"),
    ("  <think>\nstep 1\nstep 2\n</think>\n\n<answer>\n4\n</answer>\n", 1.0, "newlines inside and around (DOTALL)"),
    ("<think>hm</think>", 0.0, "no answer"),
    ("<answer>4</answer>", 0.0, "no reasoning"),
    ("<answer>4</answer><think>hm</think>", 0.0, "wrong order"),
    ("Sure! <think>hm</think><answer>4</answer>", 0.0, "text before the format"),
    ("<think>hm</think><answer>4</answer> anything else?", 0.0, "text after the format"),
    ("", 0.0, "empty completion"),
]


@pytest.mark.parametrize(("text", "expected", "why"), THINK_ANSWER_CASES, ids=[c[2] for c in THINK_ANSWER_CASES])
def test_think_answer_format(text, expected, why):
    out = get_scorer("text-format-think-answer")(ScoreBatch(prompts=["q"], texts=[text]))
    assert out.raw.item() == expected and out.reward.item() == expected, why


def weighted_regex(**overrides):
    patterns = [{"pattern": r"<answer>\d+</answer>", "mode": "search", "weight": 3.0},
                {"pattern": r"[a-z ]+", "mode": "fullmatch", "weight": 1.0}]
    return get_scorer("text-format-think-answer", params={"patterns": patterns, "flags": [], **overrides})


@pytest.mark.parametrize(("text", "expected"), [
    ("so <answer>12</answer>", 0.75),  # search finds the answer; the lower-case fullmatch fails on "<"
    ("just words", 0.25),
    ("<answer>x</answer>", 0.0),
])
def test_weighted_patterns_give_partial_credit(text, expected):
    assert weighted_regex()(ScoreBatch(prompts=[""], texts=[text])).raw.item() == pytest.approx(expected)


def test_ignorecase_flag_comes_from_the_card():
    scorer = get_scorer("text-format-think-answer", params={"patterns": [r"yes"], "flags": ["IGNORECASE"]})
    torch.testing.assert_close(scorer(ScoreBatch(prompts=["", ""], texts=["YES", "no"])).raw, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(("params", "message"), [
    ({"flags": ["VERBOSE_ISH"]}, "Unknown regex flag"),
    ({"patterns": [{"pattern": "a", "mode": "match"}]}, "mode 'match'"),
    ({"patterns": [{"pattern": "a", "weight": 0}]}, "weight 0.0"),
    ({"patterns": [{"pattern": "(unclosed"}]}, "Bad regex pattern"),
    ({"patterns": []}, "must list params.patterns"),
])
def test_bad_regex_cards_fail_when_built(params, message):
    with pytest.raises(ValueError, match=message):
        get_scorer("text-format-think-answer", params=params)


# ---------------------------------------------------------------- length rules


def words(n: int) -> str:
    return " ".join(["word"] * n)


# text-length-target: target 200 words, tolerance 50, falloff 150.
LENGTH_CASES = [(200, 1.0), (150, 1.0), (250, 1.0), (251, 1 - 1 / 150), (325, 0.5), (100, 1 - 50 / 150),
                (400, 0.0), (1000, 0.0), (0, 0.0)]


@pytest.mark.parametrize(("n_words", "expected"), LENGTH_CASES)
def test_length_target_rule(n_words, expected):
    out = get_scorer("text-length-target")(ScoreBatch(prompts=[""], texts=[words(n_words)]))
    assert out.raw.item() == n_words
    assert out.reward.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("unit", "text", "expected"), [
    ("characters", "ab cd", 5.0),
    ("characters", "", 0.0),
    ("words", "  two\n\twords  ", 2.0),
    ("words", "one", 1.0),
])
def test_length_units(unit, text, expected):
    scorer = get_scorer("text-length-target", params={"unit": unit})
    assert scorer(ScoreBatch(prompts=[""], texts=[text])).raw.item() == expected


def test_unknown_length_unit_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown length unit 'tokens'.*\['characters', 'words'\]"):
        get_scorer("text-length-target", params={"unit": "tokens"})


# ---------------------------------------------------------------- TRL-style callables


def answers_four(prompts, completions, **kwargs):
    """TRL-style reward: 1 if the completion says 4, abstains (None) when the prompt is not arithmetic."""
    return [None if "+" not in p else float("4" in c) for p, c in zip(prompts, completions, strict=True)]


def drops_one(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def counts_metadata(prompts, completions, metadata=None, **kwargs):
    return [float(m["bonus"]) for m in metadata]


def test_trl_callable_abstains_with_nan():
    scorer = get_scorer(answers_four, modality="text")
    assert scorer.modality == "text" and scorer.id == "answers-four"
    out = scorer(ScoreBatch(prompts=["2+2", "2+2", "name a colour"], texts=["4", "5", "red"]))
    assert out.raw[:2].tolist() == [1.0, 0.0] and math.isnan(out.raw[2]) and math.isnan(out.reward[2])
    assert out.reward.dtype == torch.float32


def test_trl_callable_returning_the_wrong_count_raises():
    scorer = get_scorer(drops_one, modality="text")
    with pytest.raises(ValueError, match="'drops-one' returned 1 values for 2 samples"):
        scorer(ScoreBatch(prompts=["a", "b"], texts=["x", "y"]))


def test_trl_callable_gets_metadata_and_survives_pickle():
    scorer = pickle.loads(pickle.dumps(get_scorer(counts_metadata, modality="text")))
    out = scorer(ScoreBatch(prompts=["a", "b"], texts=["x", "y"], metadata=[{"bonus": 2}, {"bonus": 0.5}]))
    torch.testing.assert_close(out.raw, torch.tensor([2.0, 0.5]))


def test_text_scorer_refuses_a_batch_without_texts():
    with pytest.raises(ValueError, match="scores texts"):
        get_scorer("text-length-target")(ScoreBatch(prompts=["a"], media=torch.rand(1, 3, 8, 8)))
