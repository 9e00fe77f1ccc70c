"""``visalign rm train`` / ``rm eval`` end to end on tiny data: a tiny random-init LLaVA judge behind a card file,
PNG tables written here, and the refusals of bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from visalign.cli import main
from visalign.media import save_image
from visalign.scorers import ScoreBatch, get_scorer

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def base_card(tiny_dir, tmp_path_factory):
    """A copy of the shapes-vlm card pointing at a tiny LLaVA folder: rm train's --base as a card path."""
    from tests.tiny.vlm import build_family

    folder = build_family("llava", tiny_dir)
    card = yaml.safe_load(open("scorers/shapes-vlm.yaml", encoding="utf-8"))
    card.update(id="tiny-base", weights={"local_dir": str(folder)})
    path = tmp_path_factory.mktemp("card") / "base.yaml"
    path.write_text(yaml.safe_dump(card), encoding="utf-8")
    return path


def write_pairs(folder, brightness: list[tuple[float, float]], tie: list[int] | None = None) -> str:
    """A pairs table of flat-grey PNGs with the given (chosen, rejected) grey levels, plus some texture."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for k, (c, r) in enumerate(brightness):
        for side, level in (("chosen", c), ("rejected", r)):
            image = (level + 0.05 * torch.rand(3, 16, 16, generator=g)).clamp(0, 1)
            save_image(image, folder / f"{k}_{side}.png")
        row = {"prompt": PROMPT, "chosen": f"{k}_chosen.png", "rejected": f"{k}_rejected.png"}
        if tie is not None:
            row["tie"] = tie[k]
        rows.append(json.dumps(row))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def test_train_writes_a_card_that_get_scorer_loads_and_eval_reports(base_card, tmp_path, capsys):
    data = write_pairs(tmp_path, [(0.9, 0.1), (0.8, 0.2), (0.7, 0.1), (0.9, 0.3)])
    out = tmp_path / "rm"
    assert main(["rm", "train", "--data", data, "--base", str(base_card), "--steps", "15", "--pairs-per-step",
                 "4", "--lr", "3e-3", "--out", str(out), "--id", "tiny-rm", "--no-progress"]) == 0
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["id"] == "tiny-rm" and card["params"]["template"].startswith("Does this figure show")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] == 4 and metrics["loss_last"] < metrics["loss_first"]
    scorer = get_scorer(str(out / "card.yaml"))
    bright, dark = torch.full((1, 3, 16, 16), 0.85), torch.full((1, 3, 16, 16), 0.15)
    with torch.no_grad():
        s = scorer(ScoreBatch(prompts=[PROMPT] * 2, media=torch.cat([bright, dark]))).raw
    assert s[0] > s[1]

    report = tmp_path / "eval.json"
    assert main(["rm", "eval", "--scorer", str(out / "card.yaml"), "--compare", str(base_card), "--data", data,
                 "--out", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["scorers"][str(out / "card.yaml")]["accuracy"] == 1.0
    assert set(result["agreement"]) == {"sign", "pearson"}
    assert "accuracy" in capsys.readouterr().out

    # `visalign score` takes the card path like an id.
    folder = tmp_path / "imgs"
    folder.mkdir()
    save_image(bright[0], folder / "a.png")
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n", encoding="utf-8")
    assert main(["score", "--scorer", str(out / "card.yaml"), "--images", str(folder), "--prompts",
                 str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "scores.jsonl"), "--no-progress"]) == 0
    row = json.loads((tmp_path / "scores.jsonl").read_text().splitlines()[0])
    assert 0 < row["raw"]["tiny-rm"] < 1


def test_eval_numbers_by_hand_with_a_rule_scorer(tmp_path, capsys):
    # brightness: 3 of the 4 non-tie pairs have the brighter image chosen; the last pair is a tie.
    data = write_pairs(tmp_path, [(0.9, 0.1), (0.2, 0.8), (0.7, 0.1), (0.6, 0.3), (0.5, 0.52)],
                       tie=[0, 0, 0, 0, 1])
    report = tmp_path / "eval.json"
    assert main(["rm", "eval", "--scorer", "brightness", "--compare", "brightness", "--data", data,
                 "--tie-eps", "0.1", "--out", str(report)]) == 0
    metrics = json.loads(report.read_text())["scorers"]["brightness"]
    assert metrics["pairs"] == 5 and metrics["ties"] == 1
    assert metrics["accuracy"] == pytest.approx(0.75)
    # |gap| ≤ 0.1 only for the tie pair (grey levels 0.5 vs 0.52 plus ≤ 0.05 noise): three-way 4/5 right.
    assert metrics["predicted_tie_rate"] == pytest.approx(0.2)
    assert metrics["tie_accuracy"] == pytest.approx(0.8)
    assert json.loads(report.read_text())["agreement"] == {"sign": 1.0, "pearson": pytest.approx(1.0)}


def test_pointwise_labels_train_with_cross_prompt_pairs(base_card, tmp_path):
    rows = ["prompt,image,label"]
    for k, (prompt, level, label) in enumerate([("a red circle", 0.9, 1), ("two blue squares", 0.8, 1),
                                                ("a red circle", 0.1, 0), ("two blue squares", 0.2, 0),
                                                ("one green triangle", 0.15, 0)]):
        save_image(torch.full((3, 16, 16), level), tmp_path / f"{k}.png")
        rows.append(f"{prompt},{k}.png,{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "rm"
    assert main(["rm", "train", "--data", str(tmp_path / "labels.csv"), "--base", str(base_card), "--steps", "2",
                 "--out", str(out), "--id", "tiny-pointwise", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["layout"] == "pointwise" and metrics["pairs"] == 2 * 3  # every good × every bad


def test_bad_input_is_refused_with_the_row_and_the_fix(base_card, tmp_path, capsys):
    data = write_pairs(tmp_path, [(0.9, 0.1), (0.8, 0.2)])
    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    rows[1]["rejected"] = rows[1]["chosen"]
    same = tmp_path / "same.jsonl"
    same.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    args = ["rm", "train", "--base", str(base_card), "--steps", "1", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args + ["--data", str(same)]) == 2
    err = capsys.readouterr().err
    assert "identical chosen and rejected" in err and "row 1" in err and "remove these rows" in err

    rows[1]["rejected"] = "missing.png"
    missing = tmp_path / "missing.jsonl"
    missing.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert main(args + ["--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "row 1 (rejected" in err and "missing.png" in err and "Fix or remove" in err

    assert main(args + ["--data", data, "--loss", "bt_ties"]) == 2
    assert "Unknown reward-model loss 'bt_ties'; close: ['bt-ties'" in capsys.readouterr().err

    tied = write_pairs(tmp_path, [(0.9, 0.1), (0.8, 0.2)], tie=[0, 1])
    assert main(args + ["--data", tied, "--loss", "bt"]) == 2
    assert "tie pair(s) (rows [1])" in capsys.readouterr().err

    config = tmp_path / "rm.yaml"
    config.write_text("data: x.jsonl\nstepz: 3\n", encoding="utf-8")
    assert main(["rm", "train", str(config)]) == 2
    assert "unknown key(s) ['stepz']" in capsys.readouterr().err
