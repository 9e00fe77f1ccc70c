"""``visalign score`` end to end through main(): happy paths and every bad input the issue lists."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visalign.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "assets" / "samples"


def make_folder(tmp_path: Path, n: int = 4) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_scores_the_shipped_samples_to_csv_with_summary(tmp_path, capsys):
    out = tmp_path / "scores.csv"
    code = main(["score", "--scorer", "brightness", "--images", str(SAMPLES),
                 "--prompts", str(SAMPLES / "prompts.txt"), "--out", str(out), "--no-progress"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list(SAMPLES.glob("*.png")))
    assert rows[0]["prompt"] == (SAMPLES / "prompts.txt").read_text().splitlines()[0]
    assert all(0 <= float(r["brightness"]) <= 1 for r in rows)
    printed = capsys.readouterr().out
    assert "reward_mean" in printed and "brightness" in printed


def test_jsonl_output_and_batching_do_not_change_scores(tmp_path):
    folder = make_folder(tmp_path, 5)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["score", "--scorer", "brightness", "--images", str(folder), "--out", str(a), "--batch-size", "1",
                 "--no-progress"]) == 0
    assert main(["score", "--scorer", "brightness", "--images", str(folder), "--out", str(b), "--batch-size", "4",
                 "--no-progress"]) == 0
    ra = [json.loads(line)["reward"]["brightness"] for line in a.read_text().splitlines()]
    rb = [json.loads(line)["reward"]["brightness"] for line in b.read_text().splitlines()]
    assert len(ra) == 5 and np.allclose(ra, rb, atol=1e-6)


def test_corrupt_files_are_reported_and_skipped(tmp_path, capsys):
    folder = make_folder(tmp_path, 3)
    (folder / "empty.png").write_bytes(b"")
    (folder / "junk.jpg").write_bytes(b"not an image")
    good = (folder / "00.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "s.csv"
    code = main(["score", "--scorer", "brightness", "--images", str(folder), "--out", str(out), "--no-progress"])
    assert code == 3
    rows = list(csv.DictReader(out.open()))
    assert sorted(Path(r["file"]).name for r in rows) == ["00.png", "01.png", "02.png"]
    err = capsys.readouterr().err
    assert "skipped 3" in err and "empty.png" in err and "junk.jpg" in err and "truncated.png" in err


def test_strict_stops_at_first_bad_file(tmp_path, capsys):
    folder = make_folder(tmp_path, 2)
    (folder / "01b.png").write_bytes(b"")
    code = main(["score", "--scorer", "brightness", "--images", str(folder), "--out", str(tmp_path / "s.csv"),
                 "--strict", "--no-progress"])
    assert code == 1
    assert "01b.png" in capsys.readouterr().err


def run_error(args: list[str], capsys) -> str:
    code = main(args + ["--no-progress"])
    assert code == 2
    return capsys.readouterr().err


def test_folder_without_media(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    err = run_error(["score", "--scorer", "brightness", "--images", str(tmp_path), "--out", str(tmp_path / "s.csv")],
                    capsys)
    assert str(tmp_path) in err and "no image media" in err


def test_prompt_file_with_wrong_line_count(tmp_path, capsys):
    folder = make_folder(tmp_path, 3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    err = run_error(["score", "--scorer", "brightness", "--images", str(folder), "--prompts", str(prompts),
                     "--out", str(tmp_path / "s.csv")], capsys)
    assert "p.txt" in err and "2 prompt lines" in err and "3 media files" in err


def test_non_utf8_prompt_file(tmp_path, capsys):
    folder = make_folder(tmp_path, 2)
    prompts = tmp_path / "latin.txt"
    prompts.write_bytes("caf\xe9 au lait\nna\xefve\n".encode("latin-1"))
    err = run_error(["score", "--scorer", "brightness", "--images", str(folder), "--prompts", str(prompts),
                     "--out", str(tmp_path / "s.csv")], capsys)
    assert "latin.txt" in err and "UTF-8" in err and "line 1" in err


def test_unknown_scorer_id(tmp_path, capsys):
    folder = make_folder(tmp_path, 1)
    err = run_error(["score", "--scorer", "brigthness", "--images", str(folder), "--out", str(tmp_path / "s.csv")],
                    capsys)
    assert "Unknown scorer 'brigthness'" in err and "brightness" in err


def test_captions_table_pairs_by_file_name(tmp_path):
    folder = make_folder(tmp_path, 2)
    captions = tmp_path / "c.csv"
    captions.write_text("file,prompt,extra\n01.png,second,x\n00.png,first,y\n")
    out = tmp_path / "s.csv"
    assert main(["score", "--scorer", "brightness", "--images", str(folder), "--captions", str(captions),
                 "--out", str(out), "--no-progress"]) == 0
    rows = {Path(r["file"]).name: r["prompt"] for r in csv.DictReader(out.open())}
    assert rows == {"00.png": "first", "01.png": "second"}


def test_video_folder_of_frames(tmp_path):
    videos = tmp_path / "videos"
    for name, value in (("a", 40), ("b", 200)):
        (videos / name).mkdir(parents=True)
        for t in range(3):
            Image.new("RGB", (8, 8), (value, value, value)).save(videos / name / f"{t}.png")
    out = tmp_path / "v.csv"
    # brightness is an image scorer: on videos it scores every frame and averages
    code = main(["score", "--scorer", "brightness", "--videos", str(videos), "--out", str(out), "--no-progress"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [round(float(r["brightness"]), 2) for r in rows] == [round(40 / 255, 2), round(200 / 255, 2)]


def test_scorer_with_absent_weights_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = make_folder(tmp_path, 1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    err = run_error(["score", "--scorer", "pickscore", "--images", str(folder), "--prompts", str(prompts),
                     "--out", str(tmp_path / "s.csv")], capsys)
    assert "pickscore" in err and "--weights pickscore=" in err


def test_scorer_needing_prompts_without_prompts(tmp_path, capsys):
    folder = make_folder(tmp_path, 1)
    err = run_error(["score", "--scorer", "clip-vit-b32", "--images", str(folder), "--out", str(tmp_path / "s.csv")],
                    capsys)
    assert "needs prompts" in err and "--prompts" in err


def test_bare_scorers_command_lists_every_card(capsys):
    assert main(["scorers"]) == 0
    listed = capsys.readouterr().out
    assert "shapes-clip" in listed and "differentiable" in listed
    assert main(["scorers", "list", "--modality", "text"]) == 0
    assert "shapes-clip" not in capsys.readouterr().out


# ---------------------------------------------------------------- text completions


def write_completions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_scorers_score_a_completion_table_as_the_reward_of_a_text_recipe_does(tmp_path, capsys):
    """The same scorer ids serve ``visalign score --texts`` and a text recipe's RewardSpec: equal values, row by row;
    a TRL-style function (the text world's checker, by import path) included."""
    from visalign.rewards import RewardSpec
    from visalign.scorers import ScoreBatch

    rows = [{"prompt": "rev abc=", "completion": "cba"}, {"prompt": "sort cab=", "completion": "acb"},
            {"prompt": "rev ab=", "completion": ""}, {"prompt": "sort ba=", "completion": " ab "}]
    table = write_completions(tmp_path / "completions.jsonl", rows)
    out = tmp_path / "scores.csv"
    checker = "visalign.text.world:StringTaskReward"
    code = main(["score", "--scorer", f"{checker},text-length-target", "--texts", str(table), "--out", str(out),
                 "--batch-size", "3", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    scored = list(csv.DictReader(out.open()))
    assert [r["completion"] for r in scored] == [r["completion"] for r in rows]
    assert [r["row"] for r in scored] == ["1", "2", "3", "4"]
    assert [float(r["string-task-accuracy"]) for r in scored] == [1.0, 0.0, 0.0, 1.0]

    spec = RewardSpec.from_config({"terms": [checker, "text-length-target"], "modality": "text"})
    out_spec = spec(ScoreBatch(prompts=[r["prompt"] for r in rows], texts=[r["completion"] for r in rows]))
    for name in ("string-task-accuracy", "text-length-target"):
        assert [float(r[name]) for r in scored] == pytest.approx(out_spec.raw[name].tolist(), rel=1e-5)


def test_text_table_columns_reach_a_trl_function_and_bad_tables_are_named(tmp_path, capsys):
    rows = [{"prompt": "p", "completion": "abc", "target": 3}, {"prompt": "q", "completion": "a", "target": 2}]
    out = tmp_path / "scores.jsonl"
    code = main(["score", "--scorer", "tests.test_score_cli:length_matches_target", "--texts",
                 str(write_completions(tmp_path / "t.jsonl", rows)), "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert [json.loads(line)["reward"]["length-matches-target"] for line in out.open()] == [1.0, 0.0]

    bad = write_completions(tmp_path / "bad.jsonl", [{"prompt": "p", "text": "no completion column"}])
    assert main(["score", "--scorer", "text-length-target", "--texts", str(bad), "--out", str(out)]) == 2
    assert "row 1 needs 'prompt' and 'completion'" in capsys.readouterr().err
    assert main(["score", "--scorer", "brightness", "--texts", str(bad), "--out", str(out)]) == 2
    assert "scores images, not texts: pass --images DIR" in capsys.readouterr().err
    assert main(["score", "--scorer", "text-length-target", "--images", str(SAMPLES), "--out", str(out)]) == 2
    assert "scores texts, not images: pass --texts FILE" in capsys.readouterr().err


def length_matches_target(prompts: list[str], completions: list[str], target: list[int], **_: object) -> list[float]:
    """A TRL-style reward reading the table's ``target`` column."""
    return [float(len(c) == t) for c, t in zip(completions, target, strict=True)]
